"""The training kernels' speed bars against implicit (issue 9), measured in one run.

    flock /tmp/ga-heavy.lock python -m pytest -m slow tests/test_solver_speed.py

Slow (about 3 minutes on 2 cores), so skipped by default: `benchmarks.solver_speed` on the
100K x 20K x 5M synthetic matrix at k = 64, 3 rounds in which the solvers take turns.
"""

from __future__ import annotations

import statistics

import pytest

from benchmarks import solver_speed


@pytest.mark.slow
def test_our_cg_is_no_slower_than_implicits_and_our_cholesky_is_ahead():
    seconds = solver_speed.main(["--repeats", "3"])
    ratios = {
        key: statistics.median(a / b for a, b in zip(times, seconds["implicit", "cg"]))
        for key, times in seconds.items()
    }
    assert ratios["ours", "cg"] <= 1.0, ratios
    assert ratios["ours", "cholesky"] < ratios["implicit", "cholesky"], ratios
