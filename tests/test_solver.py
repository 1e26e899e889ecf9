"""The WALS math (the solvers of `trainer.core.solver`, the loss of `trainer.core.loss`,
`trainer.core.objective`, `trainer.core.sparse`) and the local trainer (`trainer.local.train`)
against the dense NumPy oracle in `dense_wals.py`.

Fixtures are tiny: a 7 x 5 matrix with an empty row and an empty column, and a random 30 x 20
matrix. Exact checks run in float64.
"""

from __future__ import annotations

import dataclasses
import os
import pickle

import dense_wals  # tests/ is on sys.path (pytest's rootdir-less "prepend" import mode)
import numpy as np
import pytest
import tensorflow as tf

from trainer.core import loss as wals_loss
from trainer.core import objective, problem, seeding, solver, xla
from trainer.core.foldin import fold_in
from trainer.core.objective import WALSConfig
from trainer.core.problem import ITEMS, USERS
from trainer.core.sparse import CsrMatrix
from trainer.local import train as local_train

F64 = tf.float64
# XLA compiles each tile shape once (about 0.5 s); float64 checks mostly run the same kernels
# without it, and `test_tiling_does_not_change_the_solution` compares the two.
NO_XLA = {"jit_compile": False}
SCHEMES = {
    "uniform": {},
    "column_frequency": {"column_weight_scale": 2.0, "column_weight_exponent": -1.0},
    "inverse_frequency": {"inverse_frequency_exponent": 0.5},
    "confidence": {"confidence_alpha": 3.0},
}

# Row 2 and column 3 are empty.
SMALL = np.array(
    [
        [1.0, 0.0, 0.5, 0.0, 0.0],
        [0.0, 2.0, 0.0, 0.0, 1.0],
        [0.0, 0.0, 0.0, 0.0, 0.0],
        [0.3, 0.7, 0.2, 0.0, 0.9],
        [0.0, 0.0, 1.5, 0.0, 0.0],
        [0.4, 0.0, 0.0, 0.0, 0.6],
        [0.0, 0.8, 0.1, 0.0, 0.0],
    ]
)


def observed_f(matrix: CsrMatrix, scheme: str, **params) -> np.ndarray:
    """f_ui of every entry of a whole training matrix, by `trainer.core.objective`: float32."""
    weights = objective.observed_weights(
        WALSConfig(weighting=scheme, **params), matrix.col_counts()
    )
    return weights.f(matrix.indices, matrix.values).astype(np.float32)


def regularization(counts: np.ndarray, lam: float, w0: float, n_other: int, exponent: float):
    """λ_u by `trainer.core.objective.row_regularization`: float64 [n]."""
    config = WALSConfig(regularization=lam, unobserved_weight=w0, regularization_exp=exponent)
    return objective.row_regularization(config, counts, n_other)


def seeded(n: int, m: int, config: WALSConfig) -> tuple[np.ndarray, np.ndarray]:
    """The initial factors `local_train.fit` starts from when it is given no IDs."""
    k, sigma, seed = config.latent_factors, config.init_stddev, config.seed
    return (
        seeding.initial_factors(seeding.index_keys(n), k, sigma, seed, USERS),
        seeding.initial_factors(seeding.index_keys(m), k, sigma, seed, ITEMS),
    )


def from_dense(dense: np.ndarray) -> CsrMatrix:
    rows, cols = np.nonzero(dense)
    return CsrMatrix.from_triples(rows, cols, dense[rows, cols], dense.shape)


def random_matrix(n: int = 30, m: int = 20, density: float = 0.3, seed: int = 0) -> CsrMatrix:
    rng = np.random.default_rng(seed)
    dense = np.where(rng.random((n, m)) < density, rng.uniform(0.1, 1.0, (n, m)), 0.0)
    dense[n // 2] = 0.0  # one user without observations
    return from_dense(dense)


def weight_matrix(matrix: CsrMatrix, f: np.ndarray, w0: float) -> np.ndarray:
    """Dense W with the solver's own (float32) f, so the oracle checks the solve, not rounding."""
    dense = np.full(matrix.shape, w0)
    dense[matrix.row_ids(), matrix.indices] += f.astype(np.float64)
    return dense


def solve_rows(fixed, rows, f, reg, w0, name="cholesky", x0=None, steps=3, **options):
    """x of a block through the one solver interface, chosen from a config: NumPy [n_rows, k]."""
    config = WALSConfig(solver=name, cg_steps=steps)
    chosen = solver.solver_for(config, F64, **options)
    plan = chosen.plan(problem.RowProblem(rows, f, reg, w0))
    return chosen.solve(plan, fixed, x0=x0).numpy()


@pytest.fixture(scope="module")
def matrix() -> CsrMatrix:
    return random_matrix()


# --- sparse -------------------------------------------------------------------------------------


def test_from_triples_sorts_and_sums_duplicates():
    m = CsrMatrix.from_triples([2, 0, 0, 2], [1, 3, 1, 1], [1.0, 2.0, 3.0, 4.0], (3, 4))
    np.testing.assert_array_equal(m.indptr, [0, 2, 2, 3])
    np.testing.assert_array_equal(m.indices, [1, 3, 1])
    np.testing.assert_array_equal(m.values, [3.0, 2.0, 5.0])
    np.testing.assert_array_equal(m.row_counts(), [2, 0, 1])
    np.testing.assert_array_equal(m.col_counts(), [0, 2, 0, 1])


def test_transpose_round_trips_and_carries_per_entry_arrays():
    m = from_dense(SMALL)
    t, perm = m.transpose_with_perm()
    np.testing.assert_array_equal(t.to_dense(), m.to_dense().T)
    np.testing.assert_array_equal(t.values, m.values[perm])
    np.testing.assert_array_equal(t.row_counts(), m.col_counts())
    back = t.transpose()
    for name in ("indptr", "indices", "values"):
        np.testing.assert_array_equal(getattr(back, name), getattr(m, name))
    assert back.shape == m.shape
    tagged = np.arange(m.nnz)  # any per-entry array: its entry's position in m
    np.testing.assert_array_equal(tagged[perm][np.argsort(perm)], tagged)


@pytest.mark.parametrize("n_cols", [5, 1 << 16, (1 << 16) + 3, 1 << 20])
def test_transpose_orders_like_a_stable_sort_at_any_width(n_cols):
    """The transpose sorts column indices 16 bits at a time; it must equal a stable sort."""
    rng = np.random.default_rng(n_cols)
    rows = rng.integers(0, 50, 3000)
    cols = np.concatenate([rng.integers(0, n_cols, 2990), np.full(10, n_cols - 1)])
    m = CsrMatrix.from_triples(rows, cols, rng.uniform(0.1, 1.0, rows.size), (50, n_cols))
    t, perm = m.transpose_with_perm()
    np.testing.assert_array_equal(perm, np.argsort(m.indices, kind="stable"))
    np.testing.assert_array_equal(t.indices, m.row_ids()[perm])
    np.testing.assert_array_equal(t.row_counts(), m.col_counts())


def test_row_slice():
    m = from_dense(SMALL)
    part = m.row_slice(1, 4)
    np.testing.assert_array_equal(part.to_dense(), SMALL[1:4].astype(np.float32))
    assert m.row_slice(2, 2).nnz == 0
    with pytest.raises(ValueError, match="outside"):
        m.row_slice(3, 9)


def test_take_rows_picks_rows_in_the_given_order():
    m = from_dense(SMALL)
    order = np.array([4, 0, 1, 4])
    np.testing.assert_array_equal(m.take_rows(order).to_dense(), m.to_dense()[order])
    assert m.take_rows(np.array([], dtype=np.int64)).shape == (0, m.shape[1])


def test_csr_validation():
    with pytest.raises(ValueError, match="indptr"):
        CsrMatrix(np.array([0, 2]), np.array([0]), np.array([1.0]), (1, 3))
    with pytest.raises(ValueError, match="column indices"):
        CsrMatrix(np.array([0, 1]), np.array([3]), np.array([1.0]), (1, 3))


# --- weights ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_observed_weights_follow_the_formulas(scheme):
    m = from_dense(SMALL)
    f = observed_f(m, scheme, **SCHEMES[scheme])
    assert f.dtype == np.float32 and f.shape == (m.nnz,)
    dense = dense_wals.dense_weights(SMALL, SMALL != 0, 0.25, scheme, **SCHEMES[scheme])
    np.testing.assert_allclose(f, dense[m.row_ids(), m.indices] - 0.25, rtol=1e-6)


def test_regularization_scaling():
    counts = np.array([0, 3, 10])
    np.testing.assert_allclose(regularization(counts, 0.5, 0.1, 20, 0.0), 0.5)
    np.testing.assert_allclose(regularization(counts, 0.5, 0.1, 20, 1.0), 0.5 * (counts + 2.0))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: observed_f(m, "popularity"), "weighting"),
        (lambda m: observed_f(m, "confidence", confidence_alpha=-1), "alpha"),
        (lambda m: regularization(m.row_counts(), 0.1, -1.0, 5, 1.0), "unobserved_weight"),
        (lambda m: regularization(m.row_counts(), -0.1, 1.0, 5, 1.0), "regularization"),
    ],
)
def test_weight_validation(call, message):
    with pytest.raises(ValueError, match=message):
        call(from_dense(SMALL))


def test_the_old_name_of_inverse_frequency_still_loads():
    assert WALSConfig(weighting="log").weighting == "inverse_frequency"
    counts = np.array([4, 1, 0])
    config = WALSConfig(weighting="log", inverse_frequency_exponent=0.5)
    weights = objective.observed_weights(config, counts)
    np.testing.assert_allclose(weights.per_item, [0.5, 1.0, 0.0])
    assert weights.per_rating == 0.0


def test_a_negative_rating_weighs_nothing_extra_under_confidence():
    """Training, fold-in and the SavedModel share this rule (f = α·max(r, 0))."""
    negative = from_dense(np.array([[1.0, -2.0]]))
    np.testing.assert_allclose(observed_f(negative, "confidence", confidence_alpha=3.0), [3.0, 0])


# --- solver -------------------------------------------------------------------------------------


@pytest.mark.parametrize("exponent", [0.0, 1.0])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_row_and_column_sweeps_match_the_dense_solve(matrix, scheme, exponent):
    rng = np.random.default_rng(1)
    k, w0, lam = 4, 0.3, 0.05
    f = observed_f(matrix, scheme, **SCHEMES[scheme])
    dense, w = matrix.to_dense(), weight_matrix(matrix, f, w0)
    reg_u = regularization(matrix.row_counts(), lam, w0, matrix.shape[1], exponent)
    reg_i = regularization(matrix.col_counts(), lam, w0, matrix.shape[0], exponent)
    oracle_reg = dense_wals.dense_regularization(dense != 0, lam, w0, exponent)
    np.testing.assert_allclose(reg_u, oracle_reg[0], rtol=1e-12)
    np.testing.assert_allclose(reg_i, oracle_reg[1], rtol=1e-12)

    y = rng.normal(size=(matrix.shape[1], k))
    x = solve_rows(y, matrix, f, reg_u, w0)
    np.testing.assert_allclose(x, dense_wals.solve_rows(dense, w, y, reg_u), rtol=1e-8, atol=1e-12)

    transposed, perm = matrix.transpose_with_perm()
    y_new = solve_rows(x, transposed, f[perm], reg_i, w0)
    expected = dense_wals.solve_rows(dense.T, w.T, x, reg_i)
    np.testing.assert_allclose(y_new, expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("k", [2, 8])
def test_exact_solver_on_short_rows_matches_the_dense_solve(k):
    """At k = 8 every row of SMALL (<= 4 entries) takes the Woodbury path; at k = 2 few do."""
    m = from_dense(SMALL)
    f = observed_f(m, "confidence", confidence_alpha=3.0)
    reg = regularization(m.row_counts(), 0.1, 0.4, 5, 1.0)
    y = np.random.default_rng(9).normal(size=(5, k))
    x = solve_rows(y, m, f, reg, 0.4)
    expected = dense_wals.solve_rows(m.to_dense(), weight_matrix(m, f, 0.4), y, reg)
    np.testing.assert_allclose(x, expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("steps", [8, 40])  # unrolled, and a loop
def test_cg_with_enough_steps_reaches_the_exact_solution(matrix, steps):
    rng = np.random.default_rng(2)
    k, w0 = 4, 0.2
    f = observed_f(matrix, "confidence", confidence_alpha=5.0)
    reg = regularization(matrix.row_counts(), 0.1, w0, matrix.shape[1], 1.0)
    y = rng.normal(size=(matrix.shape[1], k))
    exact = solve_rows(y, matrix, f, reg, w0)
    x0 = rng.normal(size=(matrix.shape[0], k))
    cg = solve_rows(y, matrix, f, reg, w0, "cg", x0, steps, **NO_XLA)
    np.testing.assert_allclose(cg, exact, rtol=1e-8, atol=1e-10)
    # A few steps already move a warm start towards the solution, and the solution is a fixed
    # point.
    few = solve_rows(y, matrix, f, reg, w0, "cg", x0, 3, **NO_XLA)
    assert np.linalg.norm(few - exact) < 0.5 * np.linalg.norm(x0 - exact)
    again = solve_rows(y, matrix, f, reg, w0, "cg", exact, 3, **NO_XLA)
    np.testing.assert_allclose(again, exact, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", solver.SOLVERS)
def test_rows_without_observations_get_zero_factors(name):
    m = from_dense(SMALL)
    y = np.random.default_rng(3).normal(size=(5, 3))
    f = np.ones(m.nnz, np.float32)
    reg = np.full(7, 0.1)
    x0 = np.ones((7, 3))
    x = solve_rows(y, m, f, reg, 0.5, name, x0, **NO_XLA)
    np.testing.assert_array_equal(x[2], 0.0)
    assert np.all(np.abs(x[[0, 1, 3, 4, 5, 6]]).sum(axis=1) > 0)
    nothing = CsrMatrix(np.zeros(4, np.int64), np.zeros(0, np.int64), np.zeros(0), (3, 5))
    x = solve_rows(y, nothing, np.zeros(0, np.float32), reg[:3], 0.5, name, **NO_XLA)
    np.testing.assert_array_equal(x, 0.0)


@pytest.mark.parametrize("name", solver.SOLVERS)
def test_tiling_does_not_change_the_solution(matrix, name):
    """Small tiles split rows into many lines and tiles; chunks re-sort the rows."""
    rng = np.random.default_rng(4)
    f = observed_f(matrix, "confidence", confidence_alpha=2.0)
    reg = np.full(matrix.shape[0], 0.1)
    y = rng.normal(size=(matrix.shape[1], 3))
    x0 = rng.normal(size=(matrix.shape[0], 3))
    g = solver.gramian(y, F64)

    def solve(jit_compile=False, **layout):
        plan = solver.plan_rows(matrix, f, reg, 0.3, solver=name, dtype=F64, **layout)
        return solver.solve_planned(plan, y, g, name, x0, 3, jit_compile).numpy()

    tiny = solver.TileShape(max_width=4, tile_slots=16, max_rows=4)
    plan = solver.plan_rows(matrix, f, reg, 0.3, solver=name, dtype=F64, tile_shape=tiny)
    assert any(tile.multi_line for tile in plan.tiles)
    reference = solve()
    np.testing.assert_allclose(solve(tile_shape=tiny), reference, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(solve(chunk_rows=7), reference, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        solve(jit_compile=True, tile_shape=tiny), reference, rtol=1e-10, atol=1e-12
    )


def test_solver_for_chooses_the_solver_once_from_the_config():
    exact = solver.solver_for(WALSConfig(solver="cholesky", cg_steps=5), F64, jit_compile=False)
    assert type(exact) is solver.ExactSolver and exact.name == "cholesky"
    assert exact.dtype == np.float64
    cg = solver.solver_for(WALSConfig(solver="cg", cg_steps=5), jit_compile=False, chunk_rows=9)
    assert type(cg) is solver.ConjugateGradientSolver
    assert (cg.name, cg.steps, cg.jit_compile, cg.chunk_rows) == ("cg", 5, False, 9)
    assert cg.dtype == np.float32
    assert pickle.loads(pickle.dumps(cg)) == cg  # a Beam DoFn may carry it
    with pytest.raises(ValueError, match="solver"):
        solver.solver_for(WALSConfig(solver="lu"))
    with pytest.raises(ValueError, match="cg_steps"):
        solver.ConjugateGradientSolver(steps=0)


def test_a_solver_computes_the_gramian_of_the_whole_fixed_side_when_not_given(matrix):
    """solve(plan, fixed) uses G = fixedᵀ fixed; a given G (e.g. of a larger table) wins."""
    rng = np.random.default_rng(11)
    f = observed_f(matrix, "confidence", confidence_alpha=2.0)
    reg = np.full(matrix.shape[0], 0.1)
    y = rng.normal(size=(matrix.shape[1], 3))
    chosen = solver.ExactSolver(dtype=F64)
    plan = chosen.plan(problem.RowProblem(matrix, f, reg, 0.3))
    implicit = chosen.solve(plan, y).numpy()
    np.testing.assert_allclose(implicit, chosen.solve(plan, y, y.T @ y).numpy(), rtol=1e-12)
    doubled = chosen.solve(plan, y, 2 * (y.T @ y)).numpy()
    dense = matrix.to_dense()
    w = weight_matrix(matrix, f, 0.3)
    # 2·w0·G is the Gramian term of w0' = 2·w0 on unobserved cells with the observed cells'
    # weights and targets unchanged: A = 2·w0·G + Σ f y yᵀ + λ I, b = Σ (w0 + f) r y.
    a = 2 * 0.3 * (y.T @ y)
    for u in (0, 1, 5):
        obs = dense[u] != 0
        a_u = a + (y[obs].T * (w[u, obs] - 0.3)) @ y[obs] + 0.1 * np.eye(3)
        b_u = y[obs].T @ (w[u, obs] * dense[u, obs])
        np.testing.assert_allclose(doubled[u], np.linalg.solve(a_u, b_u), rtol=1e-9)


def test_configure_xla_adds_the_level_once_and_keeps_the_users(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert xla.configure_xla() == "--xla_backend_optimization_level=2"
    assert xla.configure_xla() == "--xla_backend_optimization_level=2"  # idempotent
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/d")
    xla.configure_xla()
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/d --xla_backend_optimization_level=2"
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=3")
    xla.configure_xla()
    assert os.environ["XLA_FLAGS"] == "--xla_backend_optimization_level=3"


def test_loss_via_the_gramian_equals_the_dense_loss(matrix):
    rng = np.random.default_rng(5)
    w0 = 0.4
    f = observed_f(matrix, "confidence", confidence_alpha=2.0)
    x = rng.normal(size=(matrix.shape[0], 3))
    y = rng.normal(size=(matrix.shape[1], 3))
    reg_u = rng.uniform(0.1, 1.0, matrix.shape[0])
    reg_i = rng.uniform(0.1, 1.0, matrix.shape[1])
    users = problem.RowProblem(matrix, f, reg_u, w0)
    items = problem.RowProblem(matrix.transpose(), np.zeros(matrix.nnz, np.float32), reg_i, w0)
    parts = wals_loss.loss(users, items, x, y, dtype=F64)
    dense, w = matrix.to_dense(), weight_matrix(matrix, f, w0)
    expected = dense_wals.loss(dense, w, x, y, reg_u, reg_i)
    assert parts["total"] == pytest.approx(expected, rel=1e-10)
    observed = dense != 0
    residual = dense - x @ y.T
    assert parts["observed"] == pytest.approx(np.sum((w * residual**2)[observed]), rel=1e-10)
    assert parts["unobserved"] == pytest.approx(np.sum((w * residual**2)[~observed]), rel=1e-10)
    assert parts["regularization"] == pytest.approx(
        np.sum(reg_u * np.sum(x**2, 1)) + np.sum(reg_i * np.sum(y**2, 1)), rel=1e-10
    )
    assert parts["rmse"] == pytest.approx(np.sqrt(np.mean(residual[observed] ** 2)), rel=1e-10)


@pytest.mark.parametrize("chunk", [1, 5, 8, 1 << 20])
def test_observed_sums_do_not_depend_on_the_chunking(matrix, chunk, monkeypatch):
    """Chunks of one length, the last one padded and masked: the sums equal the oracle's for
    chunks that divide the cells, that do not, and a single padded chunk."""
    monkeypatch.setattr(wals_loss, "_LOSS_CHUNK", chunk)
    rng = np.random.default_rng(8)
    f = rng.uniform(0.0, 2.0, matrix.nnz)
    x = rng.normal(size=(matrix.shape[0], 3))
    y = rng.normal(size=(matrix.shape[1], 3))
    rows, cols = matrix.row_ids(), matrix.indices
    prediction = np.sum(x[rows] * y[cols], axis=1)
    squared = (matrix.values.astype(np.float64) - prediction) ** 2
    expected = (squared.sum(), (f.astype(np.float32) * squared).sum(), (prediction**2).sum())
    np.testing.assert_allclose(wals_loss.observed_sums(matrix, f, x, y, F64), expected, rtol=1e-10)


# --- trainer ------------------------------------------------------------------------------------

CONFIG = WALSConfig(
    binary_target=False,  # the dense oracle fits r
    latent_factors=3,
    num_iters=4,
    regularization=0.05,
    regularization_exp=1.0,
    unobserved_weight=0.2,
    weighting="confidence",
    confidence_alpha=4.0,
    solver="cholesky",
    init_stddev=1.0,
    seed=7,
)


@pytest.mark.parametrize("scheme", ["column_frequency", "confidence"])
def test_fit_matches_the_dense_oracle_and_the_loss_never_increases(matrix, scheme):
    config = dataclasses.replace(CONFIG, weighting=scheme, **SCHEMES[scheme], num_iters=6)
    factors = local_train.fit(matrix, config, show_progress=False, dtype=F64, loss_every=1)

    x0, y0 = seeded(*matrix.shape, config)
    f = observed_f(matrix, scheme, **SCHEMES[scheme])
    w = weight_matrix(matrix, f, config.unobserved_weight)
    reg_u, reg_i = dense_wals.dense_regularization(
        matrix.to_dense() != 0, 0.05, config.unobserved_weight, 1.0
    )
    x, y = dense_wals.fit(matrix.to_dense(), w, x0, y0.astype(np.float64), reg_u, reg_i, 6)
    np.testing.assert_allclose(factors.user_factors, x, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(factors.item_factors, y, rtol=1e-7, atol=1e-10)

    totals = [loss["total"] for loss in factors.history]
    assert len(totals) == 6
    assert totals[-1] == pytest.approx(dense_wals.loss(matrix.to_dense(), w, x, y, reg_u, reg_i))
    assert all(b <= a * (1 + 1e-12) for a, b in zip(totals, totals[1:], strict=False))


def test_binary_target_fits_preferences_weighted_by_confidence(matrix):
    config = dataclasses.replace(
        CONFIG, weighting="confidence", confidence_alpha=4.0, binary_target=True, num_iters=4
    )
    factors = local_train.fit(matrix, config, show_progress=False, dtype=F64)
    x0, y0 = seeded(*matrix.shape, config)
    # W from the ratings (w0 + α r), but the target is 1 on every observed cell.
    f = observed_f(matrix, "confidence", confidence_alpha=4.0)
    w = weight_matrix(matrix, f, config.unobserved_weight)
    observed = matrix.to_dense() != 0
    reg_u, reg_i = dense_wals.dense_regularization(observed, 0.05, config.unobserved_weight, 1.0)
    x, y = dense_wals.fit(observed.astype(np.float64), w, x0, y0, reg_u, reg_i, 4)
    np.testing.assert_allclose(factors.user_factors, x, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(factors.item_factors, y, rtol=1e-7, atol=1e-10)


def test_fit_recovers_an_exact_low_rank_matrix():
    rng = np.random.default_rng(6)
    dense = rng.uniform(0.5, 1.0, (12, 2)) @ rng.uniform(0.5, 1.0, (2, 9))  # rank 2, all > 0
    config = WALSConfig(
        binary_target=False,  # an exact low-rank r is recovered
        latent_factors=2,
        num_iters=10,
        regularization=1e-12,
        regularization_exp=0.0,
        unobserved_weight=1.0,
        weighting="uniform",
        solver="cholesky",
        init_stddev=1.0,
    )
    low_rank = from_dense(dense)
    factors = local_train.fit(low_rank, config, show_progress=False, dtype=F64)
    reconstruction = factors.user_factors @ factors.item_factors.T
    np.testing.assert_allclose(reconstruction, low_rank.to_dense(), atol=1e-6)


def test_fit_is_deterministic_and_independent_of_chunking(matrix):
    config = dataclasses.replace(CONFIG, solver="cg", num_iters=3)
    first = local_train.fit(matrix, config, show_progress=False, dtype=F64, **NO_XLA)
    same = local_train.fit(matrix, config, show_progress=False, dtype=F64, **NO_XLA)
    np.testing.assert_array_equal(same.user_factors, first.user_factors)
    np.testing.assert_array_equal(same.item_factors, first.item_factors)
    again = local_train.fit(matrix, config, show_progress=False, dtype=F64, chunk_rows=4, **NO_XLA)
    np.testing.assert_allclose(again.user_factors, first.user_factors, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(again.item_factors, first.item_factors, rtol=1e-10, atol=1e-12)
    other = local_train.fit(
        matrix, dataclasses.replace(config, seed=8), show_progress=False, dtype=F64, **NO_XLA
    )
    assert not np.allclose(other.user_factors, first.user_factors)


@pytest.mark.parametrize("name", solver.SOLVERS)
def test_fit_returns_rows_in_the_matrix_order_whatever_it_is(matrix, name):
    """fit sweeps the users in its own order (by count); shuffling the matrix's rows, with
    their seeding keys, must shuffle the user factors alike and leave the items alone."""
    config = dataclasses.replace(CONFIG, solver=name, num_iters=3)
    keys = seeding.index_keys(matrix.shape[0])
    shuffle = np.random.default_rng(5).permutation(matrix.shape[0])
    first = local_train.fit(
        matrix, config, show_progress=False, dtype=F64, user_keys=keys, **NO_XLA
    )
    moved = local_train.fit(
        matrix.take_rows(shuffle),
        config,
        show_progress=False,
        dtype=F64,
        user_keys=keys[shuffle],
        **NO_XLA,
    )
    np.testing.assert_allclose(moved.user_factors, first.user_factors[shuffle], rtol=1e-9)
    np.testing.assert_allclose(moved.item_factors, first.item_factors, rtol=1e-9, atol=1e-12)


def test_fit_without_loss_gives_the_same_factors_and_no_history(matrix):
    config = dataclasses.replace(CONFIG, num_iters=3)
    with_loss = local_train.fit(
        matrix, config, show_progress=False, dtype=F64, loss_every=1, **NO_XLA
    )
    losses = []
    without = local_train.fit(
        matrix,
        config,
        callback=lambda i, fac, loss: losses.append(loss),
        show_progress=False,
        dtype=F64,
        compute_loss=False,
        **NO_XLA,
    )
    np.testing.assert_array_equal(without.user_factors, with_loss.user_factors)
    assert without.history == [] and losses == [None, None, None]
    assert len(with_loss.history) == 3


def test_fit_computes_the_loss_only_after_the_last_iteration_by_default(matrix):
    config = dataclasses.replace(CONFIG, num_iters=3)
    losses = []
    fitted = local_train.fit(
        matrix,
        config,
        callback=lambda i, fac, loss: losses.append(loss),
        show_progress=False,
        dtype=F64,
        **NO_XLA,
    )
    every = local_train.fit(matrix, config, show_progress=False, dtype=F64, loss_every=1, **NO_XLA)
    assert losses[:2] == [None, None]
    assert [h["iteration"] for h in fitted.history] == [3]
    assert fitted.history == every.history[-1:] == [losses[2]]
    np.testing.assert_array_equal(fitted.user_factors, every.user_factors)


def test_fit_in_float32_with_cg_tracks_the_exact_float64_fit(matrix):
    calls = []
    config = dataclasses.replace(CONFIG, solver="cg", cg_steps=3, num_iters=5)
    factors = local_train.fit(
        matrix, config, callback=lambda i, fac, loss: calls.append((i, loss["total"])), loss_every=1
    )
    assert factors.user_factors.dtype == np.float32
    assert [i for i, _ in calls] == [1, 2, 3, 4, 5]
    assert [total for _, total in calls] == [loss["total"] for loss in factors.history]
    exact = local_train.fit(
        matrix, dataclasses.replace(config, solver="cholesky"), show_progress=False, dtype=F64
    )
    assert factors.history[-1]["total"] == pytest.approx(exact.history[-1]["total"], rel=1e-2)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fold_in_equals_the_dense_solve_of_the_row(matrix, scheme):
    """Independent of the solver's code: np.linalg.solve of the dense normal equations."""
    config = dataclasses.replace(CONFIG, weighting=scheme, **SCHEMES[scheme], binary_target=True)
    rng = np.random.default_rng(8)
    y = rng.normal(size=(matrix.shape[1], 3))
    counts = matrix.col_counts()
    dense = matrix.to_dense()
    w = dense_wals.dense_weights(
        dense, dense != 0, config.unobserved_weight, scheme, **SCHEMES[scheme]
    )
    reg_u, _ = dense_wals.dense_regularization(dense != 0, 0.05, config.unobserved_weight, 1.0)
    expected = dense_wals.solve_rows((dense != 0).astype(float), w, y, reg_u)
    for u in (0, 3, matrix.shape[0] // 2):
        lo, hi = matrix.indptr[u], matrix.indptr[u + 1]
        items, ratings = matrix.indices[lo:hi], matrix.values[lo:hi]
        # In any order: fold-in sorts the history itself.
        shuffled = rng.permutation(items.size)
        folded = fold_in(y, None, items[shuffled], ratings[shuffled], counts, config, F64)
        np.testing.assert_allclose(folded, expected[u], rtol=1e-6, atol=1e-9)  # f is float32
    with pytest.raises(ValueError, match="distinct"):
        fold_in(y, None, [1, 1], [1.0, 1.0], counts, config)


@pytest.mark.parametrize(
    "field, value",
    [
        ("latent_factors", 0),
        ("num_iters", -1),
        ("regularization", -0.1),
        ("unobserved_weight", float("nan")),
        ("weighting", "popularity"),
        ("solver", "lu"),
        ("cg_steps", 0),
        ("init_stddev", 0.0),
        ("confidence_alpha", -2.0),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(WALSConfig(), **{field: value}).validate()
