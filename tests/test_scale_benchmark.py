"""The scale benchmark (`benchmarks.scale`): its attribution of RSS samples to stages, the
growth its workers' flags allow, its verdict and tables (fast); and one run of the real thing at
a tiny size (slow, about 3 minutes: two `pipeline.run --distributed` runs on the portable
runner):

    ./run_tests.sh -m slow tests/test_scale_benchmark.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from benchmarks import scale, scale_report, worker_bounds
from benchmarks.process_memory import (
    STARTUP,
    WHOLE_RUN,
    WORKER,
    WorkerSeen,
    stage_of,
    stage_peaks,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 2**20
BEAM_STAGES = {"preprocess": 1, "train": 3, "gate": 1, "predict": 1}


def test_a_time_belongs_to_the_last_stage_started_at_or_before_it():
    starts = [(1.0, "a"), (3.0, "b")]
    assert [stage_of(t, starts) for t in (0.0, 0.999, 1.0, 2.9, 3.0, 9.0)] == [
        STARTUP,
        STARTUP,
        "a",
        "a",
        "b",
        "b",
    ]


def test_samples_go_to_their_stage_and_workers_to_the_stage_that_started_them():
    samples = [
        (0.5, {"launcher": 100 * MB}),
        (1.5, {"launcher": 300 * MB, "job service": 50 * MB}),
        (2.5, {"launcher": 200 * MB, "worker pool": 20 * MB, "worker:7": 90 * MB}),
        (3.5, {"launcher": 150 * MB, "worker:7": 400 * MB, "worker:8": 10 * MB}),
        (6.0, {"launcher": 999 * MB}),  # after the end
    ]
    workers = {
        7: WorkerSeen(7, 2.5, "python -c worker_0", 400 * MB),  # started in a, ran into b
        8: WorkerSeen(8, 3.5, "python -c worker_1", 10 * MB),
        9: WorkerSeen(9, 5.5, "python -c worker_2", 999 * MB),  # after the end
    }
    got = stage_peaks(samples, workers, [(3.0, "b"), (1.0, "a")], begin=0.0, end=5.0)
    assert list(got) == [STARTUP, "a", "b", WHOLE_RUN]
    assert got[STARTUP] == {"seconds": 1.0, "peak_mb": {"launcher": 100.0}, "workers": []}
    assert got["a"] == {
        "seconds": 2.0,
        "peak_mb": {"launcher": 300.0, "job service": 50.0, "worker pool": 20.0, WORKER: 400.0},
        "workers": [{"pid": 7, "peak_mb": 400.0}],
    }
    assert got["b"] == {
        "seconds": 2.0,
        "peak_mb": {"launcher": 150.0, WORKER: 10.0},
        "workers": [{"pid": 8, "peak_mb": 10.0}],
    }
    assert got[WHOLE_RUN]["seconds"] == 5.0
    assert got[WHOLE_RUN]["peak_mb"] == {
        "launcher": 300.0,
        "job service": 50.0,
        "worker pool": 20.0,
        WORKER: 400.0,
    }
    assert [w["pid"] for w in got[WHOLE_RUN]["workers"]] == [7, 8]


def test_a_stage_named_twice_is_one_stage():
    got = stage_peaks(
        [(0.5, {"launcher": MB}), (2.5, {"launcher": 2 * MB})],
        {},
        [(0.0, "a"), (1.0, "b"), (2.0, "a")],
        begin=0.0,
        end=3.0,
    )
    assert got["a"]["seconds"] == 2.0 and got["a"]["peak_mb"] == {"launcher": 2.0}
    assert got["b"]["peak_mb"] == {}


def test_the_sampler_reads_named_processes_and_each_child_of_the_pool():
    pytest.importorskip("psutil")
    from benchmarks.process_memory import RssSampler

    hold = "import time; held = bytearray(60 * 2**20); time.sleep(30)"
    parent = (
        "import subprocess, sys, time; "
        f"child = subprocess.Popen([sys.executable, '-c', {hold!r}]); time.sleep(30)"
    )
    process = subprocess.Popen([sys.executable, "-c", parent])
    try:
        sampler = RssSampler({"pool": (process.pid, False)}, workers_of=process.pid)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            rss = sampler.sample()
            if any(w.peak_bytes >= 60 * MB for w in sampler.workers.values()):
                break
            time.sleep(0.1)
        assert 0 < rss["pool"] < 60 * MB
        (worker,) = sampler.workers.values()
        assert worker.peak_bytes >= 60 * MB and "bytearray" in worker.command
        assert 0 < rss[f"{WORKER}:{worker.pid}"] <= worker.peak_bytes
        assert [t for t, _ in sampler.samples] == sorted(t for t, _ in sampler.samples)
    finally:
        import psutil

        for child in psutil.Process(process.pid).children(recursive=True):
            child.kill()
        process.kill()
        process.wait()


SMALL = {
    "nusers": 1000,
    "nitems": 500,
    "train_interactions": 20_000,
    "eval_interactions": 2_000,
    "pairs": 25_000,
    "heldout_visitors": 100,
    "buckets": 16,
    "groups": 32,
}
BIG = {
    "nusers": 8000,
    "nitems": 4000,
    "train_interactions": 160_000,
    "eval_interactions": 16_000,
    "pairs": 200_000,
    "heldout_visitors": 800,
    "buckets": 16,
    "groups": 32,
}
FLAGS = {
    "latent_factors": 32,
    "block_rows": 512,
    "factor_exchange": "broadcast",
    "eval_block_rows": 4096,
    "num_iters": 3,
    "interval": 0.2,
}


def test_the_growth_a_workers_flags_allow():
    train = worker_bounds.allowed_growth("train", SMALL, BIG, FLAGS)
    # 1 table kept x (8000 - 1000) rows x 32 x 4 bytes; 16 bytes x 3.2 x 2 x (160K - 20K) slots;
    # a bundle's parsed rows, 12 bytes a cell and 32 cells' worth a row (the larger side).
    packs = 12 * ((160_000 + 32 * 8000) - (20_000 + 32 * 1000))
    # The model's seen items: one part (all 160K cells here), 38 bytes a cell while it is built.
    seen = 38 * 140_000
    assert train["terms_mb"] == pytest.approx(
        {
            "broadcast tables": 7000 * 128 / MB,
            "cached problems": 16 * 3.2 * 2 * 140_000 / MB,
            "row packs": packs / MB,
            "seen part": seen / MB,
        }
    )
    assert train["allowed_mb"] == pytest.approx(64 + (896_000 + 14_336_000 + packs + seen) / MB)
    # The packs stop growing at MAX_PACKED_CELLS (then they are emitted), a seen part at
    # PART_BYTES of 8-byte cells.
    huge = worker_bounds.allowed_growth("train", BIG, {**BIG, "train_interactions": 1 << 30}, FLAGS)
    assert huge["terms_mb"]["row packs"] == pytest.approx(12 * ((1 << 20) - 416_000) / MB)
    assert huge["terms_mb"]["seen part"] == pytest.approx(38 * ((32 << 20) / 8 - 160_000) / MB)
    evaluate = worker_bounds.allowed_growth("evaluate", SMALL, BIG, FLAGS)
    # 3 copies of float32 scores of a block (1000 users, then 4096 of 8000) x a chunk of items,
    # capped at the bytes a chunk may take (`chunked_topk.DEFAULT_SCORE_BYTES`).
    from trainer.core.chunked_topk import DEFAULT_SCORE_BYTES

    big_chunk = min(4096 * 4000 * 4, DEFAULT_SCORE_BYTES)
    assert evaluate["terms_mb"]["scores"] == pytest.approx((big_chunk - 1000 * 500 * 4) * 3 / MB)
    capped = worker_bounds.allowed_growth("evaluate", SMALL, {**BIG, "nitems": 40_000}, FLAGS)
    assert capped["terms_mb"]["scores"] == pytest.approx(
        (DEFAULT_SCORE_BYTES - 1000 * 500 * 4) * 3 / MB
    )
    assert evaluate["terms_mb"]["item table"] == pytest.approx(3500 * 128 / MB)
    assert evaluate["terms_mb"]["item counts"] == pytest.approx(8 * 3500 / MB)
    # The train rows and the eval rows are packed: 12 bytes a cell and 32 cells' worth a row.
    eval_packs = 12 * ((160_000 + 16_000 + 32 * 8000) - (20_000 + 2_000 + 32 * 1000))
    assert evaluate["terms_mb"]["row packs"] == pytest.approx(eval_packs / MB)
    new = worker_bounds.allowed_growth("new visitors", SMALL, BIG, FLAGS)
    assert new["terms_mb"]["scores"] == pytest.approx((800 * 4000 - 100 * 500) * 12 / MB)
    preprocess = worker_bounds.allowed_growth("preprocess", SMALL, BIG, FLAGS)
    assert preprocess["terms_mb"] == pytest.approx(
        {
            "per-pair sums": 300 * 175_000 / 16 / MB,
            "bundle sums": 300 * 175_000 / MB,  # every pair: both sizes under the 2^20 cap
            "matrix groups": 60 * 140_000 / 32 / MB,
            "bundle cells": 60 * 140_000 / MB,
            "vocabularies": 200 * (12_800 - 1_600) / MB,  # users, items, held-out visitors
        }
    )
    assert preprocess["runner_mb"] == {}  # no runner named: the job's terms alone
    # A bundle's partial sums stop growing at MAX_BUFFERED_PAIRS pairs (then they are shuffled).
    huge = worker_bounds.allowed_growth("preprocess", BIG, {**BIG, "pairs": 5 << 20}, FLAGS)
    assert huge["terms_mb"]["bundle sums"] == pytest.approx(300 * ((1 << 20) - 200_000) / MB)
    join = worker_bounds.allowed_growth("train", SMALL, BIG, {**FLAGS, "factor_exchange": "join"})
    # A block's share of the cells: 512 of min(U, I) rows (at S all 500 items are one block).
    want = 128 * (160_000 * 512 / 4000 - 20_000) / MB
    assert join["terms_mb"]["received vectors"] == pytest.approx(want)
    # Nothing that the flags bound grows with the same data: the slack alone.
    same = worker_bounds.allowed_growth("predict", BIG, BIG, FLAGS)
    assert same["allowed_mb"] == worker_bounds.SLACK_MB


def test_the_local_portable_runner_s_part_is_named_apart_and_counts_the_redistributed_lines():
    small, big = (
        {**SMALL, "redistributed_bytes": 100 * MB},
        {**BIG, "redistributed_bytes": 800 * MB},
    )
    local = worker_bounds.LOCAL_PORTABLE
    got = worker_bounds.allowed_growth("preprocess", small, big, FLAGS, runner=local)
    ours = worker_bounds.allowed_growth("preprocess", small, big, FLAGS)
    assert got["terms_mb"] == ours["terms_mb"]
    assert got["runner_mb"] == {"redistributed lines": worker_bounds.RUNNER_COPIES * 700.0}
    assert got["allowed_mb"] == pytest.approx(
        ours["allowed_mb"] + got["runner_mb"]["redistributed lines"]
    )
    # The train and evaluate jobs hand their grouped rows over whole as well.
    grouped = {"grouped_bytes": {"train": 10 * MB, "evaluate": 12 * MB}}
    small, big = (
        {**small, **grouped},
        {**big, "grouped_bytes": {"train": 80 * MB, "evaluate": 96 * MB}},
    )
    for job, growth in (("train", 70), ("evaluate", 84)):
        held = worker_bounds.allowed_growth(job, small, big, FLAGS, runner=local)["runner_mb"]
        assert held == {"grouped rows": pytest.approx(worker_bounds.RUNNER_COPIES * growth)}
    # Other jobs, and other runners (Dataflow, Flink: bounded bundles), hold nothing more.
    assert (
        worker_bounds.allowed_growth("predict", small, big, FLAGS, runner=local)["runner_mb"] == {}
    )
    assert worker_bounds.allowed_growth("train", small, big, FLAGS)["runner_mb"] == {}
    other = worker_bounds.allowed_growth("preprocess", small, big, FLAGS, runner="DataflowRunner")
    assert other["runner_mb"] == {}


def _size(label: str, shape: dict, launcher: float, workers: dict[str, list[float]]) -> dict:
    stages = {}
    for stage in ("preprocess", "train", "gate", "predict"):
        peaks = workers.get(stage, [])
        entry = {"seconds": 2.0, "peak_mb": {"launcher": launcher, "job service": 200.0}}
        entry["workers"] = [{"pid": i, "peak_mb": peak} for i, peak in enumerate(peaks)]
        if peaks:
            entry["peak_mb"][WORKER] = max(peaks)
        stages[stage] = entry
    whole = {"seconds": 8.0, "peak_mb": {"launcher": launcher + 10, "job service": 200.0}}
    whole["workers"] = [w for entry in stages.values() for w in entry["workers"]]
    stages[WHOLE_RUN] = whole
    requested = {"sessions": 10, "visitors": 3, "items": 2}
    return {"label": label, "shape": shape, "stages": stages, "requested": requested, "seconds": 9}


def test_the_verdict_pairs_each_job_with_its_worker_and_judges_the_launchers_growth():
    small = _size("S", SMALL, 800.0, {"preprocess": [900], "train": [800, 850, 860]})
    big = _size(
        "8S",
        BIG,
        1000.0,
        # train's worker grows by 100 MB: more than 64 + 24.4; evaluate's by 200 < 64 + 188.
        {"preprocess": [950], "train": [900, 1050, 870], "predict": [700, 710]},
    )
    result = scale_report.compare(small, big, FLAGS, launcher_limit_mb=64)
    assert result["growth_mb"]["train"] == {"launcher": 200.0, "job service": 0.0, WORKER: 190.0}
    assert result["launcher"] == {"growth_mb": 200.0, "limit_mb": 64, "passed": False}
    checks = [
        (c["stage"], c["job"], c["peak_mb"], c["passed"]) for c in result["workers"]["checks"]
    ]
    assert checks == [
        ("preprocess", "preprocess", [900, 950], True),
        ("train", "train", [800, 900], False),
        ("train", "evaluate", [850, 1050], True),
        ("train", "new visitors", [860, 870], True),
    ]  # predict ran no worker at S: nothing to compare
    assert result["workers"]["passed"] is False
    report = scale_report.format_report(result)
    assert "x8.0 users, x8.0 items, x8.0 cells" in report
    assert "launcher: the whole run's peak grows by +200 MB per 8x (target < 64 MB): FAIL" in report
    assert "workers: grown past what their flags allow: train/train +100 > +88 MB: FAIL" in report
    train = scale_report.stage_table(result, "train").splitlines()
    assert train[0] == "train: S 2.0 s, 8S 2.0 s"
    assert train[2].split() == ["launcher", "800", "1000", "+200", "<", "+64:", "FAIL"]
    assert train[4].split() == ["worker", "(train)", "800", "900", "+100", "<=", "+88:", "FAIL"]
    assert train[7].split() == ["workers", "started", "3", "3"]
    # Another number of workers than jobs: the stage's largest peaks against the most allowed.
    big["stages"]["train"]["workers"].append({"pid": 99, "peak_mb": 500.0})
    (train_check,) = [
        c for c in scale_report.worker_checks(small, big, FLAGS) if c["stage"] == "train"
    ]
    assert train_check["job"] == "evaluate" and train_check["peak_mb"] == [860, 1050]
    # On the local portable runner the preprocessing worker may also hold the reshuffled lines
    # (4.3 x 700 MB more at 8S), printed apart from what its flags allow.
    small["shape"], big["shape"] = (
        {**SMALL, "redistributed_bytes": 100 * MB},
        {**BIG, "redistributed_bytes": 800 * MB},
    )
    big["stages"]["preprocess"]["workers"] = [{"pid": 0, "peak_mb": 3500.0}]
    local = scale_report.compare(small, big, FLAGS, 64, runner=worker_bounds.LOCAL_PORTABLE)
    (pre,) = [c for c in local["workers"]["checks"] if c["stage"] == "preprocess"]
    assert pre["growth_mb"] == 2600 and pre["passed"] and not pre["within_flags_alone"]
    assert not scale_report.compare(small, big, FLAGS, 64)["workers"]["checks"][0]["passed"]
    report = scale_report.format_report(local)
    assert "the runner's: redistributed lines +3010.0" in report
    assert (
        "grouped input whole): preprocess/preprocess +3010 MB (its growth past what its flags "
        "alone allow)" in report
    )
    within = [c["within_flags_alone"] for c in result["workers"]["checks"]]
    assert within == [c["passed"] for c in result["workers"]["checks"]]  # no runner: the same
    # Within the limit, and every worker within its allowance: both pass.
    big = _size("8S", BIG, 850.0, {"preprocess": [950], "train": [800, 850, 860]})
    result = scale_report.compare(small, big, FLAGS, launcher_limit_mb=64)
    assert result["launcher"]["passed"] and result["workers"]["passed"]
    assert "workers: 4 of 4 within what their flags allow: PASS" in scale_report.format_report(
        result
    )


@pytest.mark.slow
def test_repeated_runs_of_a_size_give_the_median_of_every_figure():
    runs = [
        _size("S", SMALL, launcher, {"train": [800 + d, 850 + d, 860 + d]})
        for launcher, d in ((800.0, 0), (790.0, 40), (830.0, 10))
    ]
    runs[1]["stages"]["train"]["workers"].pop()  # a run that started one worker fewer
    merged = scale.median_size(runs)
    assert merged["runs"] == 3 and merged["shape"] == SMALL
    train = merged["stages"]["train"]
    assert train["peak_mb"]["launcher"] == 800.0  # median of 800, 790, 830
    assert [w["peak_mb"] for w in train["workers"]] == [810, 860]  # the workers all runs have
    assert merged["stages"][WHOLE_RUN]["peak_mb"]["launcher"] == 810.0
    assert scale.median_size(runs[:1])["runs"] == 1


def test_the_benchmark_runs_pipeline_run_at_two_sizes_and_attributes_every_stage(tmp_path):
    pytest.importorskip("psutil")
    out = tmp_path / "scale.json"
    command = [sys.executable, "-m", "benchmarks.scale", "--sessions", "400", "--visitors", "100"]
    command += ["--items", "60", "--latent_factors", "8", "--num_iters", "2", "--block_rows", "32"]
    command += ["--work_dir", str(tmp_path / "work"), "--output", str(out)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    completed = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(out.read_text())
    small, big = result["sizes"]
    assert [small["label"], big["label"]] == ["S", "8S"]
    for size in (small, big):
        assert size["run_status"] == "published"
        stages = [s for s in size["stages"] if s not in (STARTUP, WHOLE_RUN)]
        assert sorted(stages) == sorted(size["run_json_stages"])  # every stage seen
        for stage in stages:
            entry = size["stages"][stage]
            assert entry["peak_mb"]["launcher"] > 100 and entry["peak_mb"]["job service"] > 0
            assert len(entry["workers"]) == BEAM_STAGES.get(stage, 0), stage
        whole = size["stages"][WHOLE_RUN]
        for label in ("launcher", "job service", "worker pool", WORKER):
            assert whole["peak_mb"][label] == max(
                size["stages"][s]["peak_mb"].get(label, 0) for s in [STARTUP, *stages]
            )
    assert 6 <= big["shape"]["nusers"] / small["shape"]["nusers"] <= 10
    assert 6 <= big["shape"]["nitems"] / small["shape"]["nitems"] <= 10
    for stage, growth in result["growth_mb"].items():
        for label, grew in growth.items():
            want = big["stages"][stage]["peak_mb"][label] - small["stages"][stage]["peak_mb"][label]
            assert grew == pytest.approx(want)
    assert len(result["workers"]["checks"]) == 6
    assert "launcher: the whole run's peak grows by" in completed.stdout
    assert "train: S " in completed.stdout and "worker (evaluate)" in completed.stdout


def test_runner_memory_matches_a_fused_stage_across_runs_of_the_same_graph():
    """`benchmarks.runner_memory.stage_key`: the same fused stage of the evaluation at S and at
    8S (names from two real runs: Beam numbered the transforms and PCollections differently)
    has one key; another stage's differs."""
    from benchmarks.runner_memory import stage_key

    small = (
        "((((ref_AppliedPTransform_ItemFactorsPath-Impulse_33)+(ref_AppliedPTransform_"
        "LoadItemFactors_37))+(ref_PCollection_PCollection_23/Write)"
    )
    big = (
        "(((ref_AppliedPTransform_LoadItemFactors_44)+(ref_AppliedPTransform_ItemFactorsPath-"
        "Impulse_40))+(ref_PCollection_PCollection_28/Write)"
    )
    grouped = (
        "(ReadEvalBlocks/GroupRows/CoGroupByKeyImpl/Flatten/Read)+(ReadEvalBlocks/GroupRows/"
        "CoGroupByKeyImpl/GroupByKey/Write)"
    )
    assert (
        stage_key(small)
        == stage_key(big)
        == ("ref_AppliedPTransform_ItemFactorsPath-Impulse ref_AppliedPTransform_LoadItemFactors")
    )
    assert stage_key(grouped) != stage_key(big)
