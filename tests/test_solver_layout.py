"""The stacked tile layout of `trainer.core.tiling` and `trainer.core.plans` (sub-tiles stacked T
at a time, padding sub-tiles skipped), solved by `trainer.core.kernels`, against the dense NumPy
oracle in `dense_wals.py` and against other layouts.

Every fast path is checked: the XLA-compiled CG kernel with its loop over sub-tiles (and its
early stop at `count`), the same kernel without XLA, and the exact solvers on stacked tiles.
"""

from __future__ import annotations

import pathlib
import pickle
import subprocess
import sys

import dense_wals  # tests/ is on sys.path (pytest's rootdir-less "prepend" import mode)
import numpy as np
import pytest
import tensorflow as tf

from trainer.core import host_arrays, kernels, objective, plans, problem, solver, tiling
from trainer.core.sparse import CsrMatrix

F64 = tf.float64
ON_GPU = bool(tf.config.list_logical_devices("GPU"))
# Small sub-tiles stacked a few at a time: long rows span several lines, runs of sub-tiles
# fill several tiles, and the last tile of a run holds padding sub-tiles.
STACKED = tiling.TileShape(max_width=4, tile_slots=16, max_rows=4, stack_slots=256)
UNSTACKED = tiling.TileShape(max_width=4, tile_slots=16, max_rows=4)


def power_law(n: int = 60, m: int = 25, seed: int = 0) -> CsrMatrix:
    """A random matrix whose row lengths span 0 to m: rows of 1 to a few lines of width 4."""
    rng = np.random.default_rng(seed)
    density = np.clip(rng.pareto(1.0, n)[:, None] * 0.1, 0, 1)
    dense = np.where(rng.random((n, m)) < density, rng.uniform(0.1, 1.0, (n, m)), 0.0)
    dense[3] = 0.0  # an empty row
    dense[5] = rng.uniform(0.1, 1.0, m)  # a full row: 7 lines of width 4
    rows, cols = np.nonzero(dense)
    return CsrMatrix.from_triples(rows, cols, dense[rows, cols], dense.shape)


@pytest.fixture(scope="module")
def problem_data():
    matrix = power_law()
    rng = np.random.default_rng(1)
    k, w0 = 3, 0.3
    config = objective.WALSConfig(weighting="confidence", confidence_alpha=3.0)
    weights = objective.observed_weights(config, matrix.col_counts())
    f = weights.f(matrix.indices, matrix.values).astype(np.float32)
    reg = rng.uniform(0.05, 0.5, matrix.shape[0])
    y = rng.normal(size=(matrix.shape[1], k))
    x0 = rng.normal(size=(matrix.shape[0], k))
    w = np.full(matrix.shape, w0)
    w[matrix.row_ids(), matrix.indices] += f.astype(np.float64)
    exact = dense_wals.solve_rows(matrix.to_dense(), w, y, reg)
    return matrix, f, reg, w0, y, x0, exact


def test_the_stacked_layout_has_several_sub_tiles_per_tile_and_padding(problem_data):
    matrix, f, reg, w0, *_ = problem_data
    plan = plans.plan_rows(matrix, f, reg, w0, "cg", F64, tile_shape=STACKED)
    assert any(tile.count > 1 for tile in plan.tiles)
    assert any(tile.count < tile.cols.shape[0] for tile in plan.tiles)  # padding sub-tiles
    assert any(tile.multi_line for tile in plan.tiles)
    # Every non-empty row is in exactly one sub-tile, with all of its entries.
    rows = np.concatenate([tile.rows.ravel() for tile in plan.tiles])
    real = rows[rows < matrix.shape[0]]
    np.testing.assert_array_equal(np.sort(real), np.flatnonzero(matrix.row_counts()))
    assert sum(int((tile.f > 0).sum()) for tile in plan.tiles) == int((f > 0).sum())
    assert plan.solved_slots <= plan.padded_slots


def test_tile_shapes_do_not_depend_on_the_block():
    """Each tile shape is one XLA compile per process, so the shapes of a block's tiles must
    come from a set shared by all blocks: blocks of any rows and row count stack each sub-tile
    shape (B, W, R) T = full or T = full / 8 at a time, never a count of their own."""
    matrix = power_law(n=400, m=40, seed=5)
    f = np.ones(matrix.nnz, np.float32)
    rng = np.random.default_rng(6)
    stacks = {}
    for n_rows in (37, 101, 163, 250, 400):
        rows = np.sort(rng.choice(matrix.shape[0], n_rows, replace=False))
        block = matrix.take_rows(rows)
        plan = plans.plan_rows(
            block, f[: block.nnz], np.ones(n_rows), 0.3, "cg", F64, tile_shape=STACKED
        )
        for n_tiles, *sub_tile in plan.tile_shapes:
            stacks.setdefault(tuple(sub_tile), set()).add(n_tiles)
    assert len(stacks) > 3
    for (size, width, _), counts in stacks.items():
        full = STACKED.stack_slots // (size * width)
        assert counts <= {full, max(1, full // 8)}, (size, width, counts)


@pytest.mark.parametrize("tile_shape", [STACKED, UNSTACKED, None])
@pytest.mark.parametrize("chunk_rows", [7, 1 << 18])
def test_kernel_shapes_from_the_lengths_alone_are_the_plans(tile_shape, chunk_rows):
    """`kernel_shapes` (what a Beam worker compiles ahead) must be exactly the shapes the plan
    of the same rows has, or a worker would compile too little or too much."""
    matrix = power_law(n=300, m=60, seed=7)
    f = np.ones(matrix.nnz, np.float32)
    plan = plans.plan_rows(
        matrix, f, np.ones(300), 0.3, "cg", chunk_rows=chunk_rows, tile_shape=tile_shape
    )
    shapes = tiling.kernel_shapes(matrix.row_counts(), "cg", chunk_rows, tile_shape)
    assert shapes == plan.kernel_shapes
    assert any(multi_line for *_, multi_line in shapes)


def test_a_solver_compiles_ahead_exactly_the_shapes_of_its_plans(problem_data):
    matrix, f, reg, w0, y, x0, _ = problem_data
    chosen = solver.ConjugateGradientSolver(dtype=F64, tile_shape=STACKED, steps=3)
    plan = chosen.plan(problem.RowProblem(matrix, f, reg, w0))
    shapes = chosen.kernel_shapes(matrix.row_counts())
    assert shapes == plan.kernel_shapes
    before = chosen.solve(plan, y, x0=x0).numpy()
    chosen.warm_up(shapes, matrix.shape[1], y.shape[1])
    np.testing.assert_array_equal(chosen.solve(plan, y, x0=x0).numpy(), before)


def test_warmed_up_kernels_solve_as_before(problem_data):
    matrix, f, reg, w0, y, x0, _ = problem_data
    plan = plans.plan_rows(matrix, f, reg, w0, "cg", F64, tile_shape=STACKED)
    g = kernels.gramian(y, F64)
    before = kernels.solve_planned(plan, y, g, "cg", x0, 3).numpy()
    kernels.warm_up(plan.kernel_shapes, matrix.shape[1], y.shape[1], F64, cg_steps=3)
    np.testing.assert_array_equal(kernels.solve_planned(plan, y, g, "cg", x0, 3).numpy(), before)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_stacked_cg_reaches_the_dense_solution(problem_data, jit_compile):
    matrix, f, reg, w0, y, x0, exact = problem_data
    plan = plans.plan_rows(matrix, f, reg, w0, "cg", F64, tile_shape=STACKED)
    g = kernels.gramian(y, F64)
    x = kernels.solve_planned(plan, y, g, "cg", x0, 30, jit_compile).numpy()
    np.testing.assert_allclose(x, exact, rtol=1e-8, atol=1e-10)
    assert np.all(x[3] == 0)


@pytest.mark.parametrize("name", tiling.SOLVERS)
def test_stacking_and_tiles_in_flight_do_not_change_the_solution(problem_data, name):
    matrix, f, reg, w0, y, x0, exact = problem_data
    g = kernels.gramian(y, F64)

    def solve(shape, jit_compile=False, in_flight=2):
        plan = plans.plan_rows(matrix, f, reg, w0, name, F64, tile_shape=shape)
        return kernels.solve_planned(plan, y, g, name, x0, 3, jit_compile, in_flight).numpy()

    reference = solve(UNSTACKED)
    np.testing.assert_allclose(solve(STACKED), reference, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(solve(STACKED, True, 1), reference, rtol=1e-10, atol=1e-12)
    if name == tiling.CHOLESKY:
        np.testing.assert_allclose(reference, exact, rtol=1e-8, atol=1e-12)


def test_default_float32_cg_plan_matches_float64(problem_data):
    """The default (large) tile shapes on a small block: one padded tile per shape."""
    matrix, f, reg, w0, y, x0, _ = problem_data
    g64 = kernels.gramian(y, F64)
    plan64 = plans.plan_rows(matrix, f, reg, w0, "cg", F64, tile_shape=UNSTACKED)
    reference = kernels.solve_planned(plan64, y, g64, "cg", x0, 3, False).numpy()
    plan = plans.plan_rows(matrix, f, reg, w0, "cg")
    y32 = y.astype(np.float32)
    x = kernels.solve_planned(plan, y32, kernels.gramian(y32), "cg", x0.astype(np.float32), 3)
    assert x.dtype == tf.float32
    np.testing.assert_allclose(x.numpy(), reference, rtol=1e-4, atol=1e-4)


def test_a_plan_pickles_without_its_cached_tensors(problem_data):
    matrix, f, reg, w0, y, x0, _ = problem_data
    plan = plans.plan_rows(matrix, f, reg, w0, "cg", F64, tile_shape=STACKED)
    g = kernels.gramian(y, F64)
    before = kernels.solve_planned(plan, y, g, "cg", x0, 3, False).numpy()
    assert all("_tensors" in tile.__dict__ for tile in plan.tiles)
    copy = pickle.loads(pickle.dumps(plan))
    assert not any("_tensors" in tile.__dict__ for tile in copy.tiles)
    np.testing.assert_array_equal(kernels.solve_planned(copy, y, g, "cg", x0, 3, False), before)


def _address(tensor: tf.Tensor) -> int:
    """Where a CPU tensor's data lies (DLPack)."""

    class Exported:
        def __dlpack__(self, **_):
            return tf.experimental.dlpack.to_dlpack(tensor)

        def __dlpack_device__(self):
            return (1, 0)  # kDLCPU

    return np.from_dlpack(Exported()).ctypes.data


@pytest.mark.parametrize("name", ["cg", "cholesky"])
def test_a_kept_plan_is_held_once_its_tensors_read_the_tiles_in_place(problem_data, name):
    """A worker keeps every block's plan (`trainer.beam.block_problems`) and the tensors its
    solves made of the tiles (`kernels._tensors`): those must be the tiles' own memory, not a
    second copy of every cached plan. Measured at 8S of `benchmarks.scale`: with copies, a
    worker's RSS grew by 0.67 MB per block solved for the first time (+58 MB per 8x)."""
    if ON_GPU:
        pytest.skip("tensors on a GPU are device copies")
    matrix, f, reg, w0, y, x0, _ = problem_data
    plan = plans.plan_rows(matrix, f, reg, w0, name, np.float32, tile_shape=STACKED)
    for tile in plan.tiles:
        for array in (tile.rows, tile.cols, tile.f, tile.c, tile.line_rows, tile.reg):
            assert host_arrays.is_aligned(array)
    kernels.solve_planned(plan, y.astype(np.float32), kernels.gramian(y), name, x0, 3, False)
    tiles = plan.tiles if name == "cg" else [tile.flat() for tile in plan.tiles]
    shared = 0
    for tile in tiles:
        for array_name, tensor in tile.__dict__["_tensors"].items():
            array = getattr(tile, array_name)
            if host_arrays.is_aligned(array):
                assert _address(tensor) == array.ctypes.data, array_name
                shared += array.nbytes
    slots = plan.padded_slots
    assert shared >= slots * 12  # cols, f and c: 4 bytes a slot each, never copied


def test_rows_longer_than_a_sub_tile_are_packed_and_solved_exactly():
    """Rows of more than one sub-tile's lines share sub-tiles (first-fit decreasing) up to
    _LONG_BIN sub-tiles' lines; longer ones get their own, padded by 1.5x steps."""
    rng = np.random.default_rng(3)
    n, m, k, w0 = 12, 120, 3, 0.3
    lengths = [100, 70, 40, 33, 30, 24, 20, 18, 17, 9, 3, 0]  # entries; lines of width 4
    dense = np.zeros((n, m))
    for row, length in enumerate(lengths):
        dense[row, rng.choice(m, length, replace=False)] = rng.uniform(0.1, 1.0, length)
    rows, cols = np.nonzero(dense)
    matrix = CsrMatrix.from_triples(rows, cols, dense[rows, cols], dense.shape)
    f = rng.uniform(0.0, 2.0, matrix.nnz)
    reg = rng.uniform(0.05, 0.5, n)
    y = rng.normal(size=(m, k))
    x0 = rng.normal(size=(n, k))
    w = np.full(matrix.shape, w0)
    w[matrix.row_ids(), matrix.indices] += f
    exact = dense_wals.solve_rows(matrix.to_dense(), w, y, reg)
    g = kernels.gramian(y, F64)
    plan = plans.plan_rows(matrix, f, reg, w0, "cg", F64, tile_shape=STACKED)
    line_cap = STACKED.tile_slots // STACKED.max_width
    bin_lines = tiling._LONG_BIN * line_cap
    packed = [tile for tile in plan.tiles if tile.reg.shape[1] == tiling._LONG_BIN]
    assert sum(tile.count for tile in packed) >= 2  # rows of 17 to 64 entries, several bins
    assert any(((tile.rows[0] < n).sum() > 1) for tile in packed)  # rows share a sub-tile
    own = {tile.cols.shape[1] for tile in plan.tiles if tile.cols.shape[1] > bin_lines}
    assert own == {24, 32}  # 100 and 70 entries: 25 and 18 lines, 1.5x steps above 16
    assert all(tile.cols.shape[1] <= bin_lines for tile in packed)
    for jit_compile in (False, True):
        x = kernels.solve_planned(plan, y, g, "cg", x0, 40, jit_compile).numpy()
        np.testing.assert_allclose(x, exact, rtol=1e-8, atol=1e-10)
        assert np.all(x[n - 1] == 0)
    plan = plans.plan_rows(matrix, f, reg, w0, "cholesky", F64, tile_shape=STACKED)
    x = kernels.solve_planned(plan, y, g, "cholesky").numpy()
    np.testing.assert_allclose(x, exact, rtol=1e-8, atol=1e-10)


def test_the_padded_fixed_length_is_the_next_power_of_two():
    """The join exchange's table length: the smallest power of two >= m (1 for an empty
    table), by counting up rather than by bit arithmetic."""
    for m in [*range(0, 70), 1000, 1023, 1024, 1025, (1 << 20) + 1]:
        expected = 1
        while expected < m:
            expected *= 2
        assert tiling.padded_fixed_length(m) == expected, m


def test_tiling_and_plans_do_not_load_tensorflow():
    """A planner (a Beam worker, the benchmarks) lays rows out without TensorFlow's import."""
    code = (
        "import sys, trainer.core.tiling, trainer.core.plans, trainer.core.xla; "
        "print('tensorflow' in sys.modules)"
    )
    root = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
