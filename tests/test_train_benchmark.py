"""Tests of the training benchmark: the synthetic matrices (fast) and the small run (slow).

The slow test runs `python -m benchmarks.train_benchmark --size small` in a subprocess, the real
entry point, so that TensorFlow's thread pools and the Spark JVM start fresh:

    ./run_tests.sh -m slow tests/test_train_benchmark.py
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import matrices, train_benchmark

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (600, 200)
NNZ = 6_000


@pytest.fixture(scope="module")
def matrix():
    return matrices.synthetic_matrix(*SHAPE, NNZ, seed=3)


def _cells(m) -> set[tuple[int, int]]:
    return set(zip(m.row_ids().tolist(), m.indices.tolist(), strict=True))


def test_synthetic_matrix_shape_nnz_values_and_determinism(matrix):
    assert matrix.shape == SHAPE
    assert matrix.nnz == NNZ
    assert matrix.values.min() > 0 and matrix.values.max() <= 1
    assert np.median(matrix.values) == pytest.approx(matrices.MEDIAN_RATING, rel=0.05)
    # Rows are CSR-sorted with distinct columns.
    keys = matrix.row_ids() * SHAPE[1] + matrix.indices
    assert np.all(np.diff(keys) > 0)

    again = matrices.synthetic_matrix(*SHAPE, NNZ, seed=3)
    np.testing.assert_array_equal(again.indptr, matrix.indptr)
    np.testing.assert_array_equal(again.indices, matrix.indices)
    np.testing.assert_array_equal(again.values, matrix.values)
    other = matrices.synthetic_matrix(*SHAPE, NNZ, seed=4)
    assert _cells(other) != _cells(matrix)


def test_synthetic_matrix_popularity_is_skewed(matrix):
    counts = np.sort(matrix.col_counts())[::-1]
    top_decile_share = counts[: SHAPE[1] // 10].sum() / matrix.nnz
    assert top_decile_share > 0.3  # Uniform popularity would give about 0.1.
    assert counts[0] > 10 * np.median(counts)
    flat = matrices.synthetic_matrix(*SHAPE, NNZ, seed=3, popularity_exponent=0.0, noise=1.0)
    flat_counts = np.sort(flat.col_counts())[::-1]
    assert flat_counts[: SHAPE[1] // 10].sum() / flat.nnz < 0.15


def test_synthetic_matrix_has_planted_low_rank_structure():
    """Beyond the first singular direction (popularity x activity), the energy of the next
    rank - 1 = 3 directions of the 0/1 matrix is about twice that of popularity-only views."""
    planted = matrices.synthetic_matrix(400, 200, 4_000, seed=0, rank=4, noise=0.0)
    popularity_only = matrices.synthetic_matrix(400, 200, 4_000, seed=0, rank=4, noise=1.0)

    def topic_energy(m) -> float:
        singular = np.linalg.svd((m.to_dense() > 0).astype(np.float64), compute_uv=False) ** 2
        return float(singular[1:4].sum() / singular.sum())

    assert topic_energy(planted) > 1.5 * topic_energy(popularity_only)


def test_synthetic_matrix_rejects_impossible_requests():
    with pytest.raises(ValueError):
        matrices.synthetic_matrix(10, 10, 60, seed=0)
    with pytest.raises(ValueError):
        matrices.synthetic_matrix(0, 10, 1, seed=0)


def test_split_cells_is_a_deterministic_partition_by_cell(matrix):
    train, heldout = matrices.split_cells(matrix, 0.2, seed=7)
    assert train.shape == heldout.shape == matrix.shape
    assert train.nnz + heldout.nnz == matrix.nnz
    assert _cells(train) | _cells(heldout) == _cells(matrix)
    assert not _cells(train) & _cells(heldout)
    assert heldout.nnz / matrix.nnz == pytest.approx(0.2, abs=0.03)
    dense = matrix.to_dense()
    np.testing.assert_array_equal(train.to_dense() + heldout.to_dense(), dense)

    again_train, again_heldout = matrices.split_cells(matrix, 0.2, seed=7)
    assert _cells(again_heldout) == _cells(heldout)
    assert _cells(matrices.split_cells(matrix, 0.2, seed=8)[1]) != _cells(heldout)
    # By cell: a cell's side does not depend on the other cells of the matrix.
    first_rows = matrix.row_slice(0, 100)
    padded = type(matrix)(
        np.concatenate([first_rows.indptr, np.full(SHAPE[0] - 100, first_rows.nnz)]),
        first_rows.indices,
        first_rows.values,
        SHAPE,
    )
    sub_heldout = matrices.split_cells(padded, 0.2, seed=7)[1]
    assert _cells(sub_heldout) == {cell for cell in _cells(heldout) if cell[0] < 100}


def test_split_cells_edges(matrix):
    train, heldout = matrices.split_cells(matrix, 0.0, seed=1)
    assert (train.nnz, heldout.nnz) == (matrix.nnz, 0)
    train, heldout = matrices.split_cells(matrix, 1.0, seed=1)
    assert (train.nnz, heldout.nnz) == (0, matrix.nnz)
    with pytest.raises(ValueError):
        matrices.split_cells(matrix, 1.5, seed=1)


def test_grids_have_an_interior_on_every_axis_and_edges_are_found():
    tb = train_benchmark

    for name, grid in tb.GRIDS.items():
        for axis, values in grid.items():
            assert len(values) >= 3, (name, axis)  # else every point is on an edge
            assert list(values) == sorted(set(values)), (name, axis)
    grid = {"regularization": (1.0, 3.0, 10.0), "alpha": (3.0, 10.0, 40.0), "fixed": (2.0,)}
    assert tb.edge_axes({"regularization": 3.0, "alpha": 10.0, "fixed": 2.0}, grid) == []
    assert tb.edge_axes({"regularization": 10.0, "alpha": 10.0, "fixed": 2.0}, grid) == [
        "regularization"
    ]
    assert tb.edge_axes({"regularization": 1.0, "alpha": 3.0, "fixed": 2.0}, grid) == [
        "regularization",
        "alpha",
    ]


def test_timed_rows_are_medians_of_the_repeats_and_tuning_is_skipped_when_chosen(monkeypatch):
    """benchmark_model with a stub fit: each figure is the median of the runs, with min and max;
    given chosen params, nothing is tuned; --tune_only stops after the tuning."""
    import contextlib

    tb = train_benchmark

    train, heldout = matrices.split_cells(matrices.synthetic_matrix(60, 40, 600, seed=1), 0.2, 0)
    splits = {"small": (train, heldout), "tune": (train, heldout), "large": (train, heldout)}
    calls = []
    # Seconds of the timed fits, in call order: CG's 3 runs, then Cholesky's.
    timed_seconds = iter([3.0, 1.0, 2.0, 5.0, 4.0, 9.0])

    def fit(matrix, params, solver, k, iters, seed):
        calls.append((params["regularization"], solver, iters, seed))
        timed = matrix is train and iters == 10 and len(calls) > 2 + 12
        rng = np.random.default_rng(seed)
        return tb.Fitted(
            rng.standard_normal((matrix.shape[0], k)).astype(np.float32),
            rng.standard_normal((matrix.shape[1], k)).astype(np.float32),
            next(timed_seconds) if timed else 0.5,
        )

    monkeypatch.setattr(tb, "_fitter", lambda name: contextlib.nullcontext(fit))
    chosen, grid, rows = tb.benchmark_model(tb.OURS, splits, "large", 4, 10, 3, seed=7)
    n_points = len(tb.grid_points(tb.GRIDS[tb.OURS]))
    assert len(grid) == n_points == 12
    assert chosen == max(grid, key=lambda point: point["ndcg@20"])["params"]
    cg, cholesky = rows
    assert (cg["seconds_per_iter"], cg["seconds_per_iter_min"], cg["seconds_per_iter_max"]) == (
        0.2,
        0.1,
        0.3,
    )
    assert cholesky["seconds_per_iter"] == 0.5 and cholesky["all_seconds"] == [5.0, 4.0, 9.0]
    assert cg["ndcg@20_min"] <= cg["ndcg@20"] <= cg["ndcg@20_max"]
    # The runs of a solver start from seeds 7, 8, 9.
    assert [seed for _, solver, iters, seed in calls if iters == 10][-3:] == [7, 8, 9]

    calls.clear()
    timed_seconds = iter([1.0] * 6)
    given = {"regularization": 300.0, "alpha": 10.0}
    chosen, grid, rows = tb.benchmark_model(tb.OURS, splits, "large", 4, 10, 3, 7, chosen=given)
    assert chosen == given and grid == [] and len(rows) == 2
    assert {reg for reg, _, iters, _ in calls if iters == 10} == {300.0}

    calls.clear()
    chosen, grid, rows = tb.benchmark_model(tb.OURS, splits, "large", 4, 10, 3, 7, tune_only=True)
    assert len(grid) == n_points and rows == []
    assert len(calls) == 1 + n_points  # one warm-up, the grid, no timed fit


def _run_benchmark(tmp_path, size: str) -> tuple[dict, dict, str]:
    """Runs the benchmark at `size`; returns ({(model, solver): row}, the result, stdout)."""
    pytest.importorskip("scipy")
    pytest.importorskip("implicit")
    # Spark is optional: left out without pyspark or a Java runtime to run it on.
    has_java = shutil.which("java") or os.environ.get("JAVA_HOME")
    skip = [] if importlib.util.find_spec("pyspark") and has_java else ["--skip", "spark"]
    out = tmp_path / f"{size}.json"
    command = [
        sys.executable,
        "-m",
        "benchmarks.train_benchmark",
        "--size",
        size,
        "--json_out",
        str(out),
        *skip,
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    completed = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "NDCG@20" in completed.stdout
    result = json.loads(out.read_text())

    rows = {(row["model"], row["solver"]): row for row in result["rows"]}
    expected = {
        ("ours", "cg"),
        ("ours", "cholesky"),
        ("implicit", "cg"),
        ("implicit", "cholesky"),
        ("popularity", "-"),
    }
    if not skip:
        expected.add(("spark", "cholesky"))
    assert set(rows) == expected
    assert set(result["chosen"]) == {model for model, _ in expected} - {"popularity"}
    for name, grid in result["grids"].items():
        assert len(grid) == len(train_benchmark.grid_points(train_benchmark.GRIDS[name])), name

    return rows, result, completed.stdout


def _best_peer_ndcg(rows: dict) -> float:
    return max(row["ndcg@20"] for (model, _), row in rows.items() if model in ("implicit", "spark"))


@pytest.mark.slow
def test_small_benchmark_end_to_end(tmp_path):
    """On the small matrix, ours reaches 90% of the best peer's NDCG@20."""
    rows, _, stdout = _run_benchmark(tmp_path, "small")
    assert rows["ours", "cg"]["ndcg@20"] >= 0.9 * _best_peer_ndcg(rows), stdout


@pytest.mark.slow
def test_large_benchmark_bars(tmp_path):
    """On the 100K x 20K x 5M matrix (about 30 minutes, most of it Spark's tuning): ours (CG)
    at most implicit CG's seconds per iteration (issue 9; measured 0.75x, ranges apart), and
    NDCG@20 at least 95% of the best peer's."""
    rows, result, stdout = _run_benchmark(tmp_path, "large")
    assert not any(result["edges"].values()), stdout  # every best point inside its grid
    assert rows["ours", "cg"]["ndcg@20"] >= 0.95 * _best_peer_ndcg(rows), stdout
    ours, theirs = rows["ours", "cg"], rows["implicit", "cg"]
    assert ours["seconds_per_iter"] <= theirs["seconds_per_iter"], stdout


def test_table_shows_medians_ranges_and_edges_and_chosen_from_checks_the_settings(tmp_path):
    tb = train_benchmark
    row = {"model": "ours", "solver": "cg", "seconds_per_iter": 1.5, "ratio_to_implicit_cg": 1.2}
    row.update({"seconds_per_iter_min": 1.25, "seconds_per_iter_max": 2.0, "recall@20": 0.3})
    row.update({"ndcg@20": 0.2, "ndcg@20_min": 0.19, "ndcg@20_max": 0.21})
    result = {
        "size": "large",
        "shape": [10, 5],
        "train_nnz": 30,
        "heldout_nnz": 8,
        "k": 4,
        "iters": 10,
        "threads": 2,
        "repeats": 3,
        "seed": 0,
        "tuned_on": "validation",
        "holdout_users": 0.1,
        "chosen": {"ours": {"regularization": 3000.0, "alpha": 10.0}},
        "edges": {"ours": ["regularization"]},
        "grids": {"ours": []},
        "rows": [row],
    }
    table = tb.format_table(result)
    assert "medians of 3 run(s)" in table
    assert "1.5000 (1.2500-2.0000)" in table and "0.2000 (0.1900-0.2100)" in table
    assert "ON THE EDGE of regularization" in table

    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(result))
    args = ["--size", "large", "--k", "4", "--chosen_from", str(path)]
    assert tb._read_chosen(str(path), tb.build_parser().parse_args(args))[0] == result["chosen"]
    with pytest.raises(ValueError, match="--seed"):
        tb._read_chosen(str(path), tb.build_parser().parse_args([*args, "--seed", "1"]))


@pytest.mark.slow
def test_per_iteration_evaluation_costs_at_most_a_fifth_of_an_iteration(tmp_path):
    """On the 100K x 20K x 5M matrix (about 2 minutes): trainer.task's per-iteration evaluation
    (its default sample of users) takes at most 20% of a training iteration of the same run."""
    out = tmp_path / "eval_speed.json"
    command = [sys.executable, "-m", "benchmarks.eval_speed", "--json_out", str(out)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    completed = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(out.read_text())
    iteration, evaluation = result["iteration"]["median"], result["eval_sampled"]["median"]
    assert evaluation <= 0.2 * iteration, completed.stdout
