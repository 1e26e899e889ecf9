"""Distributed batch prediction (`trainer.batch_predict --distributed`, `trainer.beam.predict`)
against the local one, line for line, on DirectRunner multi_processing with 2 workers."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
from retried_metrics import report_retried_metrics

from common import cli, staging
from trainer import batch_predict
from trainer.beam import predict as beam_predict
from trainer.serving import predictions

MULTI = ["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"]


def lines(path: str) -> list[str]:
    with open(path, "rb") as handle:  # split on '\n' only: IDs may hold U+2028 and the like
        return [line.decode("utf-8") for line in handle]


@pytest.mark.parametrize(
    "output_format, targeting, block_rows, chunk",
    [("tsv", False, 16, 7), ("jsonl", False, 1000, 0), ("tsv", True, 50, 3), ("jsonl", True, 7, 0)],
)
def test_distributed_predictions_equal_local_line_for_line(
    tiny_model, tmp_path, output_format, targeting, block_rows, chunk
):
    """Any block size, and any --score_item_chunk (candidates scored at once; 0: automatic)."""
    flags = ["--model_dir", tiny_model, "--format", output_format, "--k", "5"]
    flags += ["--targeting"] if targeting else []
    local = str(tmp_path / f"local.{output_format}")
    count = batch_predict.run([*flags, "--output", local, "--no_progress"])
    out = str(tmp_path / "distributed")
    written = batch_predict.run(
        [
            *flags,
            *("--output", out, "--distributed", "--block_rows", str(block_rows)),
            *("--score_item_chunk", str(chunk), *MULTI),
        ]
    )

    assert written == count > 0
    expected = lines(local)
    shards = beam_predict.shard_paths(out)
    assert shards and all(s.endswith(f".{output_format}") for s in shards)
    body = Counter()
    for shard in shards:
        shard_lines = lines(shard)
        if output_format == "tsv":  # every shard is a predictions file of its own
            assert shard_lines[0] == expected[0]
            shard_lines = shard_lines[1:]
            assert len(list(predictions.read_predictions(shard))) == len(shard_lines)
        body.update(shard_lines)
    assert body == Counter(expected[1:] if output_format == "tsv" else expected)

    with open(os.path.join(out, beam_predict.MARKER)) as handle:
        manifest = json.load(handle)
    assert manifest["lines"] == count
    assert manifest["shards"] == [os.path.basename(s) for s in shards]
    assert (manifest["format"], manifest["targeting"], manifest["k"]) == (
        output_format,
        targeting,
        5,
    )
    assert not [name for name in os.listdir(tmp_path) if ".incomplete-" in name]


def test_manifest_counts_lines_as_pipeline_output_not_metrics(tiny_model, tmp_path, monkeypatch):
    """A runner that reports only attempted metrics counts a retried bundle twice: here every
    counter reads double, and the manifest's line count, a pipeline output, is still exact."""
    flags = ["--model_dir", tiny_model, "--k", "4"]
    count = batch_predict.run([*flags, "--output", str(tmp_path / "local.tsv"), "--no_progress"])
    results = report_retried_metrics(monkeypatch)
    out = tmp_path / "distributed"
    assert batch_predict.run([*flags, "--output", str(out), "--distributed"]) == count > 0
    reported = results[0].metrics().query()["counters"]
    assert [c.attempted for c in reported if c.key.metric.name == "lines"] == [2 * count]
    with open(out / beam_predict.MARKER) as handle:
        manifest = json.load(handle)
    assert manifest["lines"] == count
    published = {beam_predict.MARKER, staging.STAGING_MARKER, *manifest["shards"]}
    assert set(os.listdir(out)) == published, "the counts' scratch file is not published"


def test_reruns_replace_their_output_but_never_foreign_files(tiny_model, tmp_path):
    out = tmp_path / "distributed"
    flags = ["--model_dir", tiny_model, "--output", str(out), "--distributed", "--k", "3"]
    first = batch_predict.run(flags)
    assert batch_predict.run([*flags, "--format", "jsonl"]) == first
    shards = set(os.listdir(out)) - {beam_predict.MARKER, staging.STAGING_MARKER}
    assert shards and all(name.endswith(".jsonl") for name in shards), "the TSV shards are gone"

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(cli.UsageError, match="not written by this project"):
        batch_predict.run([*flags[:3], str(foreign), *flags[4:]])
    assert os.listdir(foreign) == ["notes.txt"]


def test_bad_flags_are_usage_errors(tiny_model, tmp_path):
    base = ["--model_dir", tiny_model, "--output", str(tmp_path / "p")]
    with pytest.raises(cli.UsageError, match="--direct_num_workers"):
        batch_predict.run([*base, "--direct_num_workers", "2"])  # Beam flags need --distributed
    with pytest.raises(cli.UsageError, match="--no_such_flag"):
        batch_predict.run([*base, "--distributed", "--no_such_flag", "1"])
    with pytest.raises(cli.UsageError, match="block_rows"):
        batch_predict.run([*base, "--distributed", "--block_rows", "0"])
    with pytest.raises(cli.UsageError, match="no trained model"):
        batch_predict.run(
            ["--model_dir", str(tmp_path), "--output", str(tmp_path / "q"), "--distributed"]
        )


def test_read_npy_rows_reads_a_slice(tmp_path):
    import numpy as np

    array = np.arange(60, dtype=np.float32).reshape(20, 3)
    np.save(tmp_path / "a.npy", array)
    np.testing.assert_array_equal(
        beam_predict.read_npy_rows(str(tmp_path / "a.npy"), 5, 9), array[5:9]
    )
    np.testing.assert_array_equal(beam_predict.read_npy_rows(str(tmp_path / "a.npy")), array)
    with pytest.raises(ValueError, match="outside"):
        beam_predict.read_npy_rows(str(tmp_path / "a.npy"), 5, 21)


def test_a_vocabulary_that_disagrees_with_the_factors_fails_on_the_worker(tiny_model, tmp_path):
    """The launcher reads only the arrays' headers; the worker that loads the content
    vocabulary checks it holds one ID per item row, and nothing is published."""
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model, model_dir)
    vocab = model_dir / "model" / "vocab_items.txt"
    ids = vocab.read_bytes().split(b"\n")
    vocab.write_bytes(b"\n".join(ids[:2]) + b"\n")
    out = tmp_path / "out"
    with pytest.raises(Exception, match="has 2 IDs, the item factors"):
        batch_predict.run(["--model_dir", str(model_dir), "--output", str(out), "--distributed"])
    assert not out.exists()
