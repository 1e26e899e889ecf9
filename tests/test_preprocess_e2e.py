"""End to end: synthetic GA360 sessions -> pipeline.preprocess -> TFRecords, against the oracle."""

from __future__ import annotations

import collections
import gzip
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import reference
from conftest import read_cells, read_sparse_records, read_vocabulary
from retried_metrics import report_retried_metrics

from common import cli
from pipeline import options as preprocess_options
from pipeline import preprocess, synthetic
from transforms import examples, features

EVAL_FRACTION = 0.2


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("input") / "sessions.json.gz"
    synthetic.write_sessions(
        str(path), num_sessions=600, seed=5, num_items=150, num_topics=6, bad_lines=14
    )
    return str(path)


def _lines(path: str) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return handle.read().splitlines()


def _run(sample: str, output_dir: str, *extra: str) -> dict:
    return preprocess.run(
        [
            "--input",
            sample,
            "--output_dir",
            output_dir,
            "--eval_fraction",
            str(EVAL_FRACTION),
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def preprocessed(sample, tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("out") / "preprocessed")
    return out, _run(sample, out)


def test_matrix_equals_plain_python_reference(sample, preprocessed):
    out, summary = preprocessed
    events, _ = reference.reference_events(_lines(sample))
    train, evaluation, exact_median = reference.reference_matrix(
        events, EVAL_FRACTION, median=summary["median"]
    )
    got_train = read_cells(out, features.TRAIN_DIR)
    got_eval = read_cells(out, features.EVAL_DIR)
    assert got_train.keys() == train.keys()
    assert got_eval.keys() == evaluation.keys()
    for got, want in ((got_train, train), (got_eval, evaluation)):
        keys = sorted(want)
        np.testing.assert_allclose([got[k] for k in keys], [want[k] for k in keys], rtol=1e-6)
    # The approximate median is a train value within 1% rank error of the exact one.
    values = sorted(value for pair, value in events.items() if pair in train)
    rank = np.searchsorted(values, summary["median"])
    assert abs(rank - len(values) / 2) <= 0.01 * len(values) + 1
    assert summary["median"] == pytest.approx(exact_median, rel=0.05)


def test_rows_and_columns_hold_the_same_cells(preprocessed):
    out, summary = preprocessed
    for split, count in (
        (features.TRAIN_DIR, "train_interactions"),
        (features.EVAL_DIR, "eval_interactions"),
    ):
        rows = read_sparse_records(os.path.join(out, split), features.ITEMS_FOR_USER)
        columns = read_sparse_records(os.path.join(out, split), features.USERS_FOR_ITEM)
        by_row = {(u, int(i), float(v)) for u, (ii, vv) in rows.items() for i, v in zip(ii, vv)}
        by_col = {(int(u), i, float(v)) for i, (uu, vv) in columns.items() for u, v in zip(uu, vv)}
        assert by_row == by_col
        assert len(by_row) == summary[count]
        for indices, _ in rows.values():
            assert np.all(np.diff(indices) > 0), "indices are sorted and unique"


def test_vocabularies_cover_train_sorted_by_frequency(preprocessed):
    out, summary = preprocessed
    users = read_vocabulary(out, features.USER_VOCAB)
    items = read_vocabulary(out, features.ITEM_VOCAB)
    assert (len(users), len(items)) == (summary["nusers"], summary["nitems"])
    train = read_cells(out, features.TRAIN_DIR)
    user_counts = collections.Counter(visitor for visitor, _ in train)
    item_counts = collections.Counter(content for _, content in train)
    assert set(users) == set(user_counts) and set(items) == set(item_counts)
    assert [user_counts[u] for u in users] == sorted(user_counts.values(), reverse=True)
    assert [item_counts[i] for i in items] == sorted(item_counts.values(), reverse=True)


def test_counts_add_up_and_rejects_match_the_reference(sample, preprocessed):
    out, summary = preprocessed
    lines = _lines(sample)
    counters = summary["counters"]
    assert counters["lines_read"] == len(lines)
    assert counters["lines_read"] == counters["records_parsed"] + counters["lines_rejected"]
    _, reasons = reference.reference_events(lines)
    assert counters["rejected_by_reason"] == dict(reasons)
    assert counters["lines_rejected"] == 14
    rejected = []
    for name in os.listdir(os.path.join(out, features.REJECTED_DIR)):
        with open(os.path.join(out, features.REJECTED_DIR, name), encoding="utf-8") as handle:
            rejected += [json.loads(line) for line in handle]
    assert collections.Counter(r["reason"] for r in rejected) == reasons
    assert {r["line"] for r in rejected} <= set(lines), "rejected lines are kept verbatim"
    assert not [d for d in os.listdir(os.path.dirname(out)) if ".incomplete-" in d]


def _reference_counters(lines: list[str], holdout_visitors: float = 0.0) -> dict:
    """summary["counters"] by plain Python, one line at a time: the parse counts from each
    line's JSON and `reference._session_events`, the matrix and held-out counts from
    `reference.reference_holdout`; zero counts left out, as the pipeline leaves them out."""
    counters: collections.Counter = collections.Counter()
    reasons: collections.Counter = collections.Counter()
    for line in lines:
        counters["lines_read"] += 1
        try:
            session = reference._session_events(line, "customDimension:10", 14_400_000, 256)
        except reference.Rejected as rejection:
            counters["lines_rejected"] += 1
            reasons[rejection.args[0]] += 1
            continue
        counters["records_parsed"] += 1
        hits = json.loads(line)["hits"]
        counters["hits"] += len(hits)
        counters["page_hits"] += sum(hit.get("type") == "PAGE" for hit in hits)
        per_content: collections.Counter = collections.Counter()
        for _, content, duration in session:
            per_content[content] += duration
        counters["events"] += sum(total > 0 for total in per_content.values())
    events, _ = reference.reference_events(lines)
    ref = reference.reference_holdout(events, EVAL_FRACTION, holdout_visitors, 0.8)
    kept = [
        (v, c)
        for v, c in events
        if reference._unit_hash(f"holdout-visitor\x1f{v}") >= holdout_visitors
    ]
    eval_pairs = sum(reference.split_is_eval(v, c, EVAL_FRACTION) for v, c in kept)
    counters["train_interactions"] = len(ref["train"])
    counters["eval_interactions"] = len(ref["eval"])
    counters["eval_dropped_out_of_vocabulary"] = eval_pairs - len(ref["eval"])
    counters["heldout_visitors"] = len(ref["heldout_visitors"])
    counters["heldout_foldin_interactions"] = len(ref["foldin"])
    counters["heldout_target_interactions"] = len(ref["target"])
    counters["heldout_dropped_unknown_content"] = ref["heldout_dropped"]
    plain = {name: count for name, count in sorted(counters.items()) if count}
    return {**plain, "rejected_by_reason": dict(reasons)}


def _assert_counts(summary: dict, counters: dict) -> None:
    """summary.json's counts, top level and "counters", are `counters` (from
    `_reference_counters`)."""
    assert summary["counters"] == counters
    for key, name in (
        ("train_interactions", "train_interactions"),
        ("eval_interactions", "eval_interactions"),
        ("eval_dropped_unknown", "eval_dropped_out_of_vocabulary"),
        ("heldout_visitors", "heldout_visitors"),
        ("heldout_foldin_interactions", "heldout_foldin_interactions"),
        ("heldout_target_interactions", "heldout_target_interactions"),
        ("heldout_dropped_unknown", "heldout_dropped_unknown_content"),
    ):
        assert summary[key] == counters.get(name, 0), key


def test_every_count_equals_the_plain_python_count(sample, preprocessed):
    _, summary = preprocessed
    counters = _reference_counters(_lines(sample))
    assert counters["lines_rejected"] > 0
    _assert_counts(summary, counters)


def test_counts_are_pipeline_outputs_not_metrics(tmp_path, monkeypatch):
    """A runner that reports only attempted metrics counts a retried bundle twice: here every
    counter reads double, and summary.json, whose counts are pipeline outputs, is still exact.
    Many rare items, so that eval and held-out cells of unknown content are dropped too."""
    sample = str(tmp_path / "rare.json.gz")
    synthetic.write_sessions(sample, num_sessions=300, seed=3, num_items=3000, bad_lines=4)
    results = report_retried_metrics(monkeypatch)
    summary = _run(sample, str(tmp_path / "out"), "--holdout_visitors", "0.2")
    counters = _reference_counters(_lines(sample), 0.2)
    reported = results[0].metrics().query()["counters"]
    lines_read = [c.attempted for c in reported if c.key.metric.name == "lines_read"]
    assert lines_read == [2 * counters["lines_read"]], "the metrics are inflated"
    assert counters["eval_dropped_out_of_vocabulary"] > 0
    assert counters["heldout_visitors"] > 0 and counters["heldout_dropped_unknown_content"] > 0
    _assert_counts(summary, counters)


def test_multiprocessing_runner_gives_identical_output(sample, preprocessed, tmp_path):
    out, summary = preprocessed
    out2 = str(tmp_path / "mp")
    summary2 = _run(
        sample, out2, "--direct_num_workers", "2", "--direct_running_mode", "multi_processing"
    )
    for key in ("nusers", "nitems", "train_interactions", "eval_interactions", "median"):
        assert summary2[key] == summary[key]
    assert summary2["counters"] == summary["counters"]
    for split in (features.TRAIN_DIR, features.EVAL_DIR):
        assert read_cells(out2, split) == read_cells(out, split)


def test_workers_and_launcher_freeze_their_long_lived_objects(monkeypatch):
    frozen = []
    monkeypatch.setattr(preprocess.gc, "freeze", lambda: frozen.append("freeze"))
    preprocess._ScaleStatsFn().setup()
    assert frozen == ["freeze"]
    monkeypatch.setattr(preprocess.cli, "main_with_usage_errors", lambda *args: 0)
    assert preprocess.main(["--input", "unused"]) == 0
    assert frozen == ["freeze", "freeze"]


def _written_rows(out: str) -> dict[str, list[tuple]]:
    """{split/file name: its records as (key, indices, values) lists, sorted} of a dataset's
    matrix TFRecords."""
    import tensorflow as tf

    written = {}
    for split in (features.TRAIN_DIR, features.EVAL_DIR):
        for name in sorted(os.listdir(os.path.join(out, split))):
            dataset = tf.data.TFRecordDataset(os.path.join(out, split, name), "GZIP")
            parsed = (examples.parse_sparse_example(record.numpy()) for record in dataset)
            written[f"{split}/{name}"] = sorted(
                (key, indices.tolist(), values.tolist()) for key, indices, values in parsed
            )
    return written


def test_shuffle_keys_do_not_change_the_output(sample, preprocessed, tmp_path):
    out, summary = preprocessed
    assert preprocess_options.shuffle_keys(_options(sample)) == (16, 32)
    # More keys than visitors: every visitor, row and column its own key.
    out2 = str(tmp_path / "keys")
    summary2 = _run(sample, out2, "--shuffle_keys", "997")
    assert summary2["counters"] == summary["counters"]
    for name in (features.USER_VOCAB, features.ITEM_VOCAB):
        assert read_vocabulary(out2, name) == read_vocabulary(out, name)
    written = _written_rows(out)
    assert written == _written_rows(out2)
    assert len(written) == 4 and all(written.values())


def _options(sample: str, *extra: str) -> preprocess_options.PreprocessOptions:
    return cli.parse_options(
        ["--input", sample, "--output_dir", "/tmp/x", *extra], preprocess_options.PreprocessOptions
    ).view_as(preprocess_options.PreprocessOptions)


def test_shuffle_keys_scale_with_the_input():
    auto = preprocess_options.auto_shuffle_keys
    assert auto(0, "ga360") == 1
    assert auto(53_157_667, "ga360") == 2  # The 1M-PAGE-hit benchmark input: 0.77M pairs.
    assert auto(100 * 10**9, "ga360") == 3125  # 100 GB: at most 3.1e9 pairs, 1M per key.
    assert auto(10**9, "csv") == 250
    assert auto(10**15, "movielens") == preprocess_options.MAX_SHUFFLE_KEYS


def test_shuffle_keys_flag_and_bigquery_default(sample):
    assert preprocess_options.shuffle_keys(_options(sample, "--shuffle_keys", "5")) == (5, 5)
    bigquery = cli.parse_options(
        ["--bigquery_table", "p:d.t", "--output_dir", "/tmp/x"],
        preprocess_options.PreprocessOptions,
    ).view_as(preprocess_options.PreprocessOptions)
    keys = preprocess_options.BIGQUERY_SHUFFLE_KEYS
    assert preprocess_options.shuffle_keys(bigquery) == (keys, keys)


def test_csv_input_with_page_path_free_format(tmp_path):
    path = tmp_path / "events.csv"
    rows = ["visitorId,contentId,session_duration"]
    rows += [f"v{v},c{(v * 7 + k) % 23},{1000 * (k + 1)}" for v in range(40) for k in range(5)]
    rows += ["v1,c1", "v2,c2,abc"]
    path.write_text("\n".join(rows) + "\n")
    out = str(tmp_path / "out")
    summary = preprocess.run(
        [
            "--input",
            str(path),
            "--output_dir",
            out,
            "--input_format",
            "csv",
            "--eval_fraction",
            "0.0",
        ]
    )
    assert summary["counters"]["lines_rejected"] == 2
    assert summary["counters"]["header_lines"] == 1
    events = {}
    for row in rows[1:-2]:
        visitor, content, value = row.split(",")
        events[(visitor, content)] = events.get((visitor, content), 0.0) + float(value)
    train, _, _ = reference.reference_matrix(events, 0.0, median=summary["median"])
    assert read_cells(out, features.TRAIN_DIR) == pytest.approx(train)


def test_movielens_unit_scaling(tmp_path):
    path = tmp_path / "ratings.dat"
    lines = [f"{u}::{m}::{(u + m) % 5 + 1}::{1000 + u}" for u in range(1, 30) for m in range(1, 9)]
    path.write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "out")
    summary = preprocess.run(
        [
            "--input",
            str(path),
            "--output_dir",
            out,
            "--input_format",
            "movielens",
            "--eval_fraction",
            "0",
        ]
    )
    assert summary["scale_stats"] == {"min": 1.0, "max": 5.0}
    cells = read_cells(out, features.TRAIN_DIR)
    assert cells[("3", "4")] == pytest.approx(((3 + 4) % 5 + 1 - 1) / 4)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--output_dir", "/tmp/x"], "exactly one of --input"),
        (["--input", "/nonexistent/*.json", "--output_dir", "/tmp/x"], "matches no files"),
        (
            ["--input", "{sample}", "--output_dir", "/tmp/x", "--input_format", "xml"],
            "--input_format 'xml'",
        ),
        (
            ["--input", "{sample}", "--output_dir", "/tmp/x", "--eval_fraction", "1.5"],
            "--eval_fraction",
        ),
        (
            ["--input", "{sample}", "--output_dir", "/tmp/x", "--content_id_source", "dim:3"],
            "--content_id_source",
        ),
        (
            ["--input", "{sample}", "--output_dir", "/tmp/x", "--evalfraction", "0.5"],
            "unknown flag",
        ),
        (
            ["--input", "{sample}", "--output_dir", "/tmp/x", "--shuffle_keys", "-1"],
            "--shuffle_keys must be >= 0",
        ),
    ],
)
def test_bad_flags_stop_before_the_pipeline(sample, flags, message):
    flags = [flag.replace("{sample}", sample) for flag in flags]
    with pytest.raises(cli.UsageError, match=message):
        preprocess.run(flags)


def test_existing_output_needs_overwrite(sample, preprocessed):
    out, _ = preprocessed
    with pytest.raises(cli.UsageError, match="--overwrite"):
        _run(sample, out)


def test_overwrite_replaces_a_dataset_we_wrote(sample, preprocessed, tmp_path):
    out, summary = preprocessed
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    again = _run(sample, copy, "--overwrite")
    assert again["train_interactions"] == summary["train_interactions"]
    assert read_cells(copy, features.TRAIN_DIR) == read_cells(out, features.TRAIN_DIR)
    assert os.listdir(tmp_path) == ["copy"]


def test_overwrite_refuses_a_directory_it_did_not_write(sample, tmp_path, capsys):
    out = tmp_path / "d"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    argv = ["--input", sample, "--output_dir", str(out), "--overwrite"]
    assert preprocess.main(argv) == 2
    error = capsys.readouterr().err
    assert f"error: refusing to replace {out}" in error and "notes.txt" in error
    assert (out / "notes.txt").read_text() == "keep"
    assert os.listdir(out) == ["notes.txt"] and os.listdir(tmp_path) == ["d"]


def test_cli_exit_status_and_message(sample, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.preprocess",
            "--input",
            sample,
            "--output_dir",
            str(tmp_path / "o"),
            "--input_format",
            "xml",
        ],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert result.returncode == 2
    assert "error: --input_format 'xml' is not one of ga360, csv, movielens" in result.stderr
    assert not (tmp_path / "o").exists()


def test_help_lists_the_pipeline_flags(capsys):
    assert preprocess.main(["--help"]) == 0
    printed = capsys.readouterr().out
    for flag in ("--input", "--output_dir", "--content_id_source", "--eval_fraction", "--scaling"):
        assert flag in printed
