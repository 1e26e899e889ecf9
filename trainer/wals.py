"""The local WALS trainer: alternating exact (or CG) solves of users and items on one machine.

    config = WALSConfig(latent_factors=32, num_iters=15, weighting="confidence")
    factors = fit(train, config, callback=on_iteration)     # train: CsrMatrix [n_users, n_items]
    scores = factors.user_factors[u] @ factors.item_factors.T

Each iteration is a row sweep (every x_u from Y) and a column sweep (every y_i from X) of
`trainer.solver`, which holds the math; this module holds the loop, the initialisation, the
progress report and fold-in. See `trainer.solver` for the objective and `trainer.weights` for
the weighting schemes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tqdm

from trainer import solver as wals_solver
from trainer import weights
from trainer.sparse import CsrMatrix

logger = logging.getLogger(__name__)

# Sides, for deriving the initialisation seeds from (seed, side).
USERS = 0
ITEMS = 1


@dataclasses.dataclass(frozen=True)
class WALSConfig:
    """WALS hyperparameters.

    Attributes:
        latent_factors: k, the factor dimension.
        num_iters: alternating iterations (each a user sweep then an item sweep).
        regularization: λ, the base L2 weight.
        regularization_exp: ν in λ_u = λ·(n_u + w0·N_items)^ν; 0 gives plain λ, 1 the
            frequency scaling of "Revisiting the Performance of iALS" (Rendle et al., 2021).
        unobserved_weight: w0, the weight of every cell, observed or not.
        weighting: the observed extra weight f_ui, one of `trainer.weights.WEIGHTINGS`.
        feature_wt_factor: ω in column_frequency, f = ω·c_i^p.
        feature_wt_exp: p in column_frequency (-1: inverse item frequency), e in log,
            f = (1/c_i)^e.
        confidence_alpha: α in confidence, f = α·r_ui.
        solver: "cholesky" (exact) or "cg" (conjugate gradient warm-started from the current
            factors).
        cg_steps: CG steps per solve.
        init_stddev: σ; factors start i.i.d. N(0, (σ/√k)²).
        seed: seed of the initialisation; the result is a function of the data and the config.
        binary_target: fit 1 instead of r_ui on observed cells (Hu, Koren & Volinsky's
            preference); r_ui then only enters through the weights, e.g. `confidence`.
    """

    latent_factors: int = 32
    num_iters: int = 15
    # Tuned on the synthetic GA360 sample (Recall@10 about 2.5x the popularity baseline's);
    # with ν = 1, λ carries over between datasets of different sizes (Rendle et al., 2021).
    regularization: float = 0.01
    regularization_exp: float = 1.0
    unobserved_weight: float = 0.5
    weighting: str = weights.UNIFORM
    feature_wt_factor: float = 130.0
    feature_wt_exp: float = -1.0
    confidence_alpha: float = 10.0
    solver: str = wals_solver.CHOLESKY
    cg_steps: int = 3
    init_stddev: float = 0.1
    seed: int = 0
    binary_target: bool = False

    def validate(self) -> None:
        """Raises ValueError naming the first invalid field."""

        def require(ok: bool, field: str, condition: str) -> None:
            if not ok:
                value = getattr(self, field)
                raise ValueError(f"{field} must be {condition}, got {value!r}")

        def is_int(value) -> bool:
            return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

        def is_real(value) -> bool:
            return isinstance(value, (int, float, np.number)) and math.isfinite(value)

        require(is_int(self.latent_factors) and self.latent_factors >= 1, "latent_factors", ">= 1")
        require(is_int(self.num_iters) and self.num_iters >= 0, "num_iters", ">= 0")
        require(
            is_real(self.regularization) and self.regularization >= 0,
            "regularization",
            "finite and >= 0",
        )
        require(
            is_real(self.regularization_exp) and self.regularization_exp >= 0,
            "regularization_exp",
            "finite and >= 0",
        )
        require(
            is_real(self.unobserved_weight) and self.unobserved_weight >= 0,
            "unobserved_weight",
            "finite and >= 0",
        )
        require(
            self.regularization > 0 or self.unobserved_weight > 0,
            "regularization",
            "> 0 when unobserved_weight is 0 (else the normal equations can be singular)",
        )
        require(self.weighting in weights.WEIGHTINGS, "weighting", f"one of {weights.WEIGHTINGS}")
        require(
            is_real(self.feature_wt_factor) and self.feature_wt_factor >= 0,
            "feature_wt_factor",
            "finite and >= 0",
        )
        require(is_real(self.feature_wt_exp), "feature_wt_exp", "finite")
        require(
            is_real(self.confidence_alpha) and self.confidence_alpha >= 0,
            "confidence_alpha",
            "finite and >= 0",
        )
        require(self.solver in wals_solver.SOLVERS, "solver", f"one of {wals_solver.SOLVERS}")
        require(is_int(self.cg_steps) and self.cg_steps >= 1, "cg_steps", ">= 1")
        require(is_real(self.init_stddev) and self.init_stddev > 0, "init_stddev", "finite and > 0")
        require(is_int(self.seed) and self.seed >= 0, "seed", "an integer >= 0")

    def observed_weights(self, matrix: CsrMatrix) -> np.ndarray:
        """f_ui of every entry of the training matrix: float32 [nnz], in its nnz order."""
        return weights.observed_weights(
            matrix,
            self.weighting,
            self.feature_wt_factor,
            self.feature_wt_exp,
            self.confidence_alpha,
        )

    def cell_weights(
        self, cols: np.ndarray, ratings: np.ndarray, col_counts: np.ndarray
    ) -> np.ndarray:
        """f_ui of cells outside the training matrix (fold-in), from the training counts.

        Args:
            cols: int [m], the items.
            ratings: float [m], r_ui.
            col_counts: int [n_items], c_i of the training matrix.

        Returns:
            float32 [m].
        """
        return weights.cell_weights(
            cols,
            ratings,
            col_counts,
            self.weighting,
            self.feature_wt_factor,
            self.feature_wt_exp,
            self.confidence_alpha,
        )

    def row_regularization(self, counts: np.ndarray, n_other: int) -> np.ndarray:
        """λ_u = λ·(n_u + w0·n_other)^ν for rows with `counts` entries: float64 [n]."""
        return weights.regularization(
            counts, self.regularization, self.unobserved_weight, n_other, self.regularization_exp
        )


@dataclasses.dataclass
class WALSFactors:
    """A trained (or partly trained) factorisation R ≈ X Yᵀ.

    Attributes:
        user_factors: [n_users, k] X, float32 (float64 when fit with dtype=tf.float64).
        item_factors: [n_items, k] Y, same dtype.
        history: one loss dict per finished iteration (see `trainer.solver.loss`).
    """

    user_factors: np.ndarray
    item_factors: np.ndarray
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)


IterationCallback = Callable[[int, WALSFactors, dict[str, float]], None]


def initial_factors(n: int, k: int, stddev: float, seed: int, side: int) -> np.ndarray:
    """Initial factors of one side: float32 [n, k], i.i.d. N(0, (stddev/√k)²).

    The generator is seeded with (seed, side), so the two sides are independent and any
    partitioning of the rows (local chunks, Beam workers) can slice the same matrix.
    """
    rng = np.random.default_rng([seed, side])
    return rng.normal(0.0, stddev / math.sqrt(k), size=(n, k)).astype(np.float32)


def _report(bar, show_progress: bool, iteration: int, iters: int, seconds: float, loss) -> None:
    """Shows an iteration's loss in the progress bar, or logs it when the bar is hidden."""
    if show_progress:
        bar.set_postfix(loss=f"{loss['total']:.5g}", rmse=f"{loss['rmse']:.4f}")
        return
    logger.info(
        "iteration %d/%d (%.2f s): loss %.6g = observed %.6g + unobserved %.6g + "
        "regularization %.6g; rmse %.4f",
        iteration,
        iters,
        seconds,
        loss["total"],
        loss["observed"],
        loss["unobserved"],
        loss["regularization"],
        loss["rmse"],
    )


def fit(
    matrix: CsrMatrix,
    config: WALSConfig,
    callback: IterationCallback | None = None,
    show_progress: bool = True,
    dtype: tf.DType = tf.float32,
    chunk_rows: int = wals_solver.DEFAULT_CHUNK_ROWS,
    jit_compile: bool = True,
    compute_loss: bool = True,
) -> WALSFactors:
    """Trains WALS on a rating matrix.

    Per iteration, with f_ui and λ from `config`:
        X ← argmin_X L(X, Y)   (row sweep:    x_u = A_u⁻¹ b_u with G = YᵀY)
        Y ← argmin_Y L(X, Y)   (column sweep: y_i = A_i⁻¹ b_i with G = XᵀX, on Rᵀ)
    then the loss of `trainer.solver.loss` is recorded.

    Args:
        matrix: R, [n_users, n_items], the observed r_ui.
        config: hyperparameters; validated first.
        callback: called after each iteration with (iteration from 1, factors so far, loss
            dict), e.g. to evaluate or write TensorBoard summaries.
        show_progress: show a tqdm bar with the loss; when False, log each iteration instead.
        dtype: computation dtype (tf.float64 for tests).
        chunk_rows: rows laid out together by the solver; results do not depend on it beyond
            round-off.
        jit_compile: XLA-compile the CG kernels (see `trainer.solver.solve_planned`).
        compute_loss: evaluate the loss after each iteration (about 15% of an iteration's
            time at 5M entries); when False, the history stays empty and the callback gets
            None for the loss.

    Returns:
        The factors and the per-iteration loss history.
    """
    config.validate()
    n_users, n_items = matrix.shape
    k = config.latent_factors
    w0 = config.unobserved_weight
    f = config.observed_weights(matrix)
    if config.binary_target:
        # Hu, Koren & Volinsky's preference: fit 1 on every observed cell; r only weighs it.
        matrix = dataclasses.replace(matrix, values=np.ones_like(matrix.values))
    transposed, perm = matrix.transpose_with_perm()
    reg_users = config.row_regularization(matrix.row_counts(), n_items)
    reg_items = config.row_regularization(transposed.row_counts(), n_users)
    start = time.perf_counter()
    plan_args = {"solver": config.solver, "dtype": dtype, "chunk_rows": chunk_rows}
    user_plan = wals_solver.plan_rows(matrix, f, reg_users, w0, **plan_args)
    item_plan = wals_solver.plan_rows(transposed, f[perm], reg_items, w0, **plan_args)
    logger.info(
        "WALS on %d users x %d items, %d entries, k=%d, solver %s: laid out in %.2f s",
        n_users,
        n_items,
        matrix.nnz,
        k,
        config.solver,
        time.perf_counter() - start,
    )
    x = tf.constant(initial_factors(n_users, k, config.init_stddev, config.seed, USERS), dtype)
    y = tf.constant(initial_factors(n_items, k, config.init_stddev, config.seed, ITEMS), dtype)
    factors = WALSFactors(x.numpy(), y.numpy())
    bar = tqdm.tqdm(
        range(1, config.num_iters + 1), desc="WALS", unit="iter", disable=not show_progress
    )
    for iteration in bar:
        start = time.perf_counter()
        solve = {"solver": config.solver, "cg_steps": config.cg_steps, "jit_compile": jit_compile}
        x = wals_solver.solve_planned(user_plan, y, wals_solver.gramian(y, dtype), x0=x, **solve)
        y = wals_solver.solve_planned(item_plan, x, wals_solver.gramian(x, dtype), x0=y, **solve)
        factors = WALSFactors(x.numpy(), y.numpy(), factors.history)
        seconds = time.perf_counter() - start
        loss = None
        if compute_loss:
            loss = wals_solver.loss(matrix, f, x, y, w0, reg_users, reg_items, dtype)
            factors.history.append(loss)
            _report(bar, show_progress, iteration, config.num_iters, seconds, loss)
        elif not show_progress:
            logger.info("iteration %d/%d (%.2f s)", iteration, config.num_iters, seconds)
        if callback is not None:
            callback(iteration, factors, loss)
    return factors


def fold_in(
    item_factors: np.ndarray | tf.Tensor,
    gramian: np.ndarray | tf.Tensor | None,
    item_indices: np.ndarray,
    ratings: np.ndarray,
    f: np.ndarray,
    config: WALSConfig,
    dtype: tf.DType = tf.float32,
) -> np.ndarray:
    """Factors of a new user from their (item, rating) pairs, without retraining.

    Solves the user's row exactly against the trained items, as the row sweep would:
        x = (w0·G + Σ_i f_i y_i y_iᵀ + λ_u I)⁻¹ Σ_i (w0 + f_i) r_i y_i,
        λ_u = λ·(m + w0·N_items)^ν, m = number of given items.

    Args:
        item_factors: [n_items, k] trained Y.
        gramian: [k, k] G = YᵀY, precomputed once for many fold-ins; computed when None.
        item_indices: int [m], distinct items of the user.
        ratings: float [m], r_ui of those items.
        f: float [m], f_ui of those cells. Under column_frequency or log they come from the
            training counts: `config.cell_weights(item_indices, ratings, train.col_counts())`.
        config: the trained model's hyperparameters (w0, λ, ν).
        dtype: computation dtype.

    Returns:
        [k] NumPy array of `dtype`; zeros when no items are given.
    """
    item_factors = tf.cast(tf.convert_to_tensor(item_factors), dtype)
    n_items, _ = item_factors.shape
    item_indices = np.asarray(item_indices, dtype=np.int64).ravel()
    ratings = np.asarray(ratings, dtype=np.float32).ravel()
    f = np.asarray(f, dtype=np.float32).ravel()
    if not item_indices.size == ratings.size == f.size:
        raise ValueError(
            f"item_indices, ratings and f differ in length: {item_indices.size}, "
            f"{ratings.size}, {f.size}"
        )
    if item_indices.size and (item_indices.min() < 0 or item_indices.max() >= n_items):
        raise ValueError(f"item indices must lie in [0, {n_items})")
    if np.unique(item_indices).size != item_indices.size:
        raise ValueError("item_indices must be distinct; aggregate repeated items first")
    if gramian is None:
        gramian = wals_solver.gramian(item_factors, dtype)
    row = CsrMatrix(
        np.array([0, item_indices.size], dtype=np.int64), item_indices, ratings, (1, n_items)
    )
    reg = config.row_regularization(np.array([item_indices.size]), n_items)
    solution = wals_solver.solve_rows(
        item_factors,
        gramian,
        row,
        f,
        reg,
        config.unobserved_weight,
        solver=wals_solver.CHOLESKY,
        dtype=dtype,
    )
    return solution[0]
