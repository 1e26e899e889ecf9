"""Every Beam entry point on Beam's portable job API, against DirectRunner's results.

A job service and an EXTERNAL worker pool run as separate processes (`tests/portable.py`), as a
Flink or Dataflow job would: the launcher submits a pipeline proto and the workers share
nothing with it but the files. Preprocessing gives the same counts and cells; the distributed
trainer (both exchanges, with its evaluation and new-visitor scoring) the same factors and
metrics as the local trainer; distributed batch prediction the same lines as the local one; and
a distributed run killed mid-way resumes from its checkpoint.
"""

from __future__ import annotations

import glob
import json
import os
from collections import Counter

import numpy as np
import pytest
from conftest import read_cells
from portable import PortableRunner

from pipeline import preprocess, synthetic
from trainer import batch_predict, task

ITERS = 3
HYPER = ["--num_iters", str(ITERS), "--latent_factors", "6", "--no_progress"]
COUNTS = (
    "nusers",
    "nitems",
    "train_interactions",
    "eval_interactions",
    "eval_dropped_unknown",
    "heldout_visitors",
    "heldout_foldin_interactions",
    "heldout_target_interactions",
    "heldout_dropped_unknown",
    "counters",
)


@pytest.fixture(scope="module")
def portable():
    with PortableRunner() as runner:
        yield runner


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("portable") / "sessions.json.gz")
    synthetic.write_sessions(path, num_sessions=700, seed=17, bad_lines=3)
    return path


def _preprocess(sample: str, out: str, *flags: str) -> dict:
    return preprocess.run(
        ["--input", sample, "--output_dir", out, "--holdout_visitors", "0.15", *flags]
    )


@pytest.fixture(scope="module")
def direct_dataset(sample, tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("direct") / "preprocessed")
    return out, _preprocess(sample, out)


@pytest.fixture(scope="module")
def portable_dataset(sample, portable, tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("portable_pre") / "preprocessed")
    return out, _preprocess(sample, out, *portable.flags)


@pytest.fixture(scope="module")
def local_model(direct_dataset, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("local") / "model")
    task.run(["--input_dir", direct_dataset[0], "--output_dir", out, *HYPER])
    return out


def _factors(model_dir: str) -> list[np.ndarray]:
    return [
        np.load(os.path.join(model_dir, "model", f"{side}_factors.npy"))
        for side in ("user", "item")
    ]


def _metrics(model_dir: str) -> dict:
    with open(os.path.join(model_dir, task.METRICS_FILE)) as handle:
        return json.load(handle)


def _assert_same_model(expected: str, got: str) -> None:
    for want, have in zip(_factors(expected), _factors(got)):
        np.testing.assert_allclose(have, want, rtol=0, atol=1e-4 * np.abs(want).max())
    want, have = _metrics(expected), _metrics(got)
    for model in ("wals", "popularity"):
        for name in ("recall@20", "ndcg@20"):
            assert have[model][name] == pytest.approx(want[model][name], abs=1e-3)
    assert have["new_visitors"]["visitors"] == want["new_visitors"]["visitors"] > 0
    for name in ("recall@20", "ndcg@20"):
        assert have["new_visitors"]["wals"][name] == pytest.approx(
            want["new_visitors"]["wals"][name], abs=1e-3
        )


def test_preprocessing_gives_directrunners_counts_and_cells(direct_dataset, portable_dataset):
    (direct_dir, direct), (portable_dir, got) = direct_dataset, portable_dataset
    assert {key: got[key] for key in COUNTS} == {key: direct[key] for key in COUNTS}
    assert got["counters"]["lines_rejected"] == 3
    for split in ("train", "eval"):
        assert read_cells(portable_dir, split) == read_cells(direct_dir, split)


@pytest.mark.parametrize("exchange", ["broadcast", "join"])
def test_distributed_training_equals_local_training(
    portable, portable_dataset, local_model, tmp_path, exchange
):
    out = str(tmp_path / "model")
    task.run(
        [
            "--input_dir", portable_dataset[0], "--output_dir", out, *HYPER, "--distributed",
            "--block_rows", "60", "--factor_exchange", exchange,
            "--temp_location", str(tmp_path / "temp"), *portable.flags,
        ]
    )  # fmt: skip
    _assert_same_model(local_model, out)


def test_distributed_batch_prediction_equals_local(portable, local_model, tmp_path):
    flags = ["--model_dir", local_model, "--k", "5", "--format", "jsonl"]
    local = str(tmp_path / "local.jsonl")
    count = batch_predict.run([*flags, "--output", local, "--no_progress"])
    out = str(tmp_path / "distributed")
    written = batch_predict.run(
        [*flags, "--output", out, "--distributed", "--block_rows", "40", *portable.flags]
    )
    assert written == count > 0
    with open(local, "rb") as handle:
        expected = Counter(handle.read().decode("utf-8").split("\n")[:-1])
    got = Counter()
    for name in sorted(os.listdir(out)):
        if name.endswith(".jsonl"):
            with open(os.path.join(out, name), "rb") as handle:
                got.update(handle.read().decode("utf-8").split("\n")[:-1])
    assert got == expected


def test_a_killed_distributed_run_resumes_where_it_stopped(
    portable, portable_dataset, local_model, tmp_path, caplog
):
    out = str(tmp_path / "model")
    argv = ["--input_dir", portable_dataset[0], "--output_dir", out, *HYPER, "--distributed"]
    argv += ["--block_rows", "60", "--temp_location", str(tmp_path / "temp"), *portable.flags]
    with pytest.raises(Exception, match="test fault injected after half-sweep 3"):
        task.run([*argv, "--test_fail_after_sweep", "3"])
    assert not os.path.exists(out)
    caplog.set_level("INFO")
    task.run(argv)
    assert any("resuming from" in record.getMessage() for record in caplog.records)
    _assert_same_model(local_model, out)


def test_scheduled_run_distributed_publishes_directrunners_model(portable, tmp_path):
    """`pipeline.run --distributed` (every stage a job on the runner) on the portable job API
    publishes the model, counts and predictions that DirectRunner's run of the same date does."""
    from pipeline import runstate
    from pipeline.scheduled import launch

    date = "2017-08-01"
    inputs = tmp_path / "ga360"
    inputs.mkdir()
    synthetic.write_sessions(
        str(inputs / "ga_sessions_20170801.json.gz"), 500, seed=3, num_visitors=150, date=date
    )
    pattern = str(inputs / "ga_sessions_{date_nodash}.json.gz")
    flags = ["--latent_factors", "4", "--num_iters", "2", "--eval_ks", "20", "--distributed"]
    flags += ["--gate_min_lift", "0.5"]  # a tiny sample: the gate is not under test here
    roots = {}
    for name, runner in (("direct", []), ("portable", portable.flags)):
        roots[name] = str(tmp_path / name)
        argv = ["--date", date, "--input", pattern, "--root", roots[name], *flags, *runner]
        assert launch.main(argv) == 0
        assert runstate.published(roots[name]) == f"runs/{date}"
    direct, got = (os.path.join(roots[n], "runs", date) for n in ("direct", "portable"))
    with open(os.path.join(direct, "preprocessed", "summary.json")) as handle:
        want_summary = json.load(handle)
    with open(os.path.join(got, "preprocessed", "summary.json")) as handle:
        got_summary = json.load(handle)
    assert {k: got_summary[k] for k in COUNTS} == {k: want_summary[k] for k in COUNTS}
    for want, have in zip(
        _factors(os.path.join(direct, "train")), _factors(os.path.join(got, "train"))
    ):
        np.testing.assert_allclose(have, want, rtol=0, atol=1e-4 * np.abs(want).max())

    def prediction_lines(run_dir: str) -> Counter:
        lines = Counter()
        for path in sorted(glob.glob(os.path.join(run_dir, "predictions*", "*.tsv"))):
            with open(path, "rb") as handle:
                lines.update(handle.read().decode("utf-8").split("\n")[1:-1])  # no header
        return lines

    assert prediction_lines(got) == prediction_lines(direct) != Counter()
    assert os.path.isdir(os.path.join(got, "serving"))
