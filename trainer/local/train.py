"""The local WALS trainer: alternating exact (or CG) solves of users and items on one machine.

    config = WALSConfig(latent_factors=32, num_iters=15, weighting="confidence")
    factors = fit(train, config, callback=on_iteration)     # train: CsrMatrix [n_users, n_items]
    scores = factors.user_factors[u] @ factors.item_factors.T

Each iteration is a row sweep (every x_u from Y) and a column sweep (every y_i from X) by the
solver the config names (`trainer.core.solver.solver_for`), on the problems of
`trainer.core.problem.define_rows`, whose docstring writes the normal equations and what f, t
and λ are under each weighting. This module holds the loop, the initialisation and the progress
report; the loss (`trainer.core.loss`) is computed only when asked, by default after the last
iteration.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time

import numpy as np
import tensorflow as tf
import tqdm

from trainer.core import loss as wals_loss
from trainer.core import problem, seeding, tiling
from trainer.core.factors import IterationCallback, WALSFactors
from trainer.core.objective import WALSConfig
from trainer.core.problem import ITEMS, USERS
from trainer.core.solver import solver_for
from trainer.core.sparse import CsrMatrix
from trainer.core.xla import configure_xla

logger = logging.getLogger(__name__)


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
    chunk_rows: int = tiling.DEFAULT_CHUNK_ROWS,
    jit_compile: bool = True,
    compute_loss: bool = True,
    user_keys: np.ndarray | None = None,
    item_keys: np.ndarray | None = None,
    initial: WALSFactors | None = None,
    start_iteration: int = 0,
    loss_every: int | None = None,
) -> WALSFactors:
    """Trains WALS on a rating matrix.

    Per iteration, with the problems of `trainer.core.problem.define_rows` (whose docstring
    writes the normal equations):
        X ← argmin_X L(X, Y)   (row sweep:    every x_u against Y, G = YᵀY)
        Y ← argmin_Y L(X, Y)   (column sweep: every y_i against X, G = XᵀX, on Rᵀ)
    then, when due, the loss of `trainer.core.loss.loss` is recorded.

    Args:
        matrix: R, [n_users, n_items], the observed r_ui.
        config: hyperparameters; validated first.
        callback: called after each iteration with (iteration from 1, factors so far, loss
            dict or None), e.g. to evaluate or write TensorBoard summaries.
        show_progress: show a tqdm bar with the loss; when False, log each iteration instead.
        dtype: computation dtype (tf.float64 for tests).
        chunk_rows: rows laid out together by the solver; results do not depend on it beyond
            round-off.
        jit_compile: XLA-compile the CG kernels (`trainer.core.solver.ConjugateGradientSolver`).
        compute_loss: evaluate the loss when due (see loss_every); when False, the history
            stays empty and the callback gets None for the loss.
        user_keys: uint64 [n_users], `trainer.core.seeding.id_keys` of the visitors' original IDs;
            the initial factors are a function of these (of the row index when None).
        item_keys: uint64 [n_items], likewise for the content.
        initial: factors to start from instead of the seeded initialisation (a resume, or a
            warm start); their history is carried on.
        start_iteration: iterations already done; fit runs iterations start_iteration + 1 to
            config.num_iters.
        loss_every: with compute_loss, evaluate the loss every this many iterations and after
            the last; None (the default) after the last only, as the loss is costly (about 45%
            of a CG iteration on the large benchmark matrix). Each history entry names its
            "iteration"; the callback gets None for the loss of the other iterations.

    Returns:
        The factors and the per-iteration loss history.
    """
    config.validate()
    n_users, n_items = matrix.shape
    k = config.latent_factors
    if not 0 <= start_iteration <= config.num_iters:
        raise ValueError(
            f"start_iteration must be in [0, {config.num_iters}], got {start_iteration}"
        )
    if loss_every is not None and loss_every < 1:
        raise ValueError(f"loss_every must be >= 1 or None, got {loss_every}")
    configure_xla()  # before the first XLA compile of this process
    solver = solver_for(config, dtype, chunk_rows=chunk_rows, jit_compile=jit_compile)
    start = time.perf_counter()
    # The sweeps run on the users in descending order of their counts (ties by index), so
    # that the column sweep's gathers of user factors (one per cell) fall mostly on a compact,
    # cache-resident block of X: the most active users' rows. Rows are solved independently,
    # so the order changes results only by round-off; factors come back in the matrix's order.
    user_order = np.argsort(-matrix.row_counts(), kind="stable")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # The seeded initial factors (hashing the keys, mostly) are computed on a second
        # thread while this one lays the rows out; both are NumPy work of similar size.
        if initial is None:
            seeded = pool.submit(
                _seeded_factors, n_users, n_items, config, user_keys, item_keys, user_order
            )
        ordered = matrix.take_rows(user_order)
        item_counts = matrix.col_counts()
        transposed = ordered.transpose()
        users = problem.define_rows(ordered, USERS, item_counts, config)
        items = problem.define_rows(transposed, ITEMS, item_counts, config)
        user_plan, item_plan = solver.plan(users), solver.plan(items)
        if initial is None:
            initial = seeded.result()
        elif initial.user_factors.shape == (n_users, k):
            initial = dataclasses.replace(
                initial, user_factors=np.asarray(initial.user_factors)[user_order]
            )
    logger.info(
        "WALS on %d users x %d items, %d entries, k=%d, solver %s: laid out in %.2f s",
        n_users,
        n_items,
        matrix.nnz,
        k,
        config.solver,
        time.perf_counter() - start,
    )
    if initial.user_factors.shape != (n_users, k) or initial.item_factors.shape != (n_items, k):
        raise ValueError(
            f"initial factors {initial.user_factors.shape} and {initial.item_factors.shape} "
            f"do not match {n_users} users x {n_items} items at k={k}"
        )
    x = tf.constant(initial.user_factors, dtype)  # users in user_order
    y = tf.constant(initial.item_factors, dtype)
    history = list(initial.history)

    def factors() -> WALSFactors:
        """The current factors, users back in the matrix's order."""
        user_factors = np.empty((n_users, k), dtype=dtype.as_numpy_dtype)
        user_factors[user_order] = x.numpy()
        return WALSFactors(user_factors, y.numpy(), history)

    bar = tqdm.tqdm(
        range(start_iteration + 1, config.num_iters + 1),
        desc="WALS",
        unit="iter",
        total=config.num_iters,
        initial=start_iteration,
        disable=not show_progress,
    )
    for iteration in bar:
        start = time.perf_counter()
        x = solver.solve(user_plan, y, x0=x)
        y = solver.solve(item_plan, x, x0=y)
        seconds = time.perf_counter() - start
        loss = None
        due = iteration == config.num_iters or (loss_every and iteration % loss_every == 0)
        if compute_loss and due:
            loss = {"iteration": iteration, **wals_loss.loss(users, items, x, y, dtype)}
            history.append(loss)
            _report(bar, show_progress, iteration, config.num_iters, seconds, loss)
        elif not show_progress:
            logger.info("iteration %d/%d (%.2f s)", iteration, config.num_iters, seconds)
        if callback is not None:
            callback(iteration, factors(), loss)
    return factors()


def _seeded_factors(
    n_users: int,
    n_items: int,
    config: WALSConfig,
    user_keys: np.ndarray | None,
    item_keys: np.ndarray | None,
    user_order: np.ndarray,
) -> WALSFactors:
    """The seeded initial factors of `trainer.core.seeding`, keyed by ID (by row index when None),
    with the users in `user_order`."""
    k = config.latent_factors
    user_keys = seeding.index_keys(n_users) if user_keys is None else user_keys
    item_keys = seeding.index_keys(n_items) if item_keys is None else item_keys
    if len(user_keys) != n_users or len(item_keys) != n_items:
        raise ValueError("user_keys and item_keys must have one key per row and column")
    user_keys = np.asarray(user_keys)[user_order]
    return WALSFactors(
        seeding.initial_factors(user_keys, k, config.init_stddev, config.seed, USERS),
        seeding.initial_factors(item_keys, k, config.init_stddev, config.seed, ITEMS),
    )
