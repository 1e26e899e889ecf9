"""Fold-in: the factors of rows the model was not trained on, from their observed cells.

A new visitor's row is solved exactly against the trained item factors Y, as one row sweep of
the trainer would solve it: the problem `trainer.core.problem.define_rows(rows, USERS, c,
config)` (its docstring states the normal equations and what f, t and λ_u are), with c the
training matrix's item counts, solved by Cholesky. Every fold-in goes through `fold_in_rows`:
the quality gate's scoring of the published model, the new-visitor evaluation, the benchmark's
new users and `WALSModel.fold_in`; the SavedModel's `fold_in` signature solves the same
equations in TF (`trainer.serving.export`).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from trainer.core import problem
from trainer.core import solver as wals_solver
from trainer.core.objective import WALSConfig
from trainer.core.sparse import CsrMatrix

# The solve's dtype: float64, like the SavedModel's `fold_in` signature; the factors returned
# are float32, like the trained ones.
FOLD_IN_DTYPE = tf.float64


def solve_rows(
    rows: CsrMatrix,
    item_factors: np.ndarray | tf.Tensor,
    item_counts: np.ndarray,
    config: WALSConfig,
    gramian: np.ndarray | tf.Tensor | None = None,
    dtype: tf.DType = FOLD_IN_DTYPE,
) -> np.ndarray:
    """The fold-in of `rows` in the solve's dtype: NumPy [n, k] of `dtype` (see `fold_in_rows`,
    which every caller but the exact-solve tests uses)."""
    n_items, k = np.shape(item_factors)
    if np.asarray(item_counts).size != n_items or rows.shape[1] != n_items:
        raise ValueError(
            f"item_factors ({n_items} items), item_counts ({np.asarray(item_counts).size}) and "
            f"rows ({rows.shape[1]} columns) disagree on the number of items"
        )
    if rows.nnz == 0:
        return np.zeros((rows.shape[0], k), dtype.as_numpy_dtype)
    exact = wals_solver.ExactSolver(dtype=dtype)  # fold-in is exact, whatever trained the model
    fixed = tf.cast(tf.convert_to_tensor(item_factors), dtype)
    defined = problem.define_rows(rows, problem.USERS, item_counts, config)
    return exact.solve(exact.plan(defined), fixed, gramian).numpy()


def fold_in_rows(
    rows: CsrMatrix,
    item_factors: np.ndarray | tf.Tensor,
    item_counts: np.ndarray,
    config: WALSConfig,
    gramian: np.ndarray | tf.Tensor | None = None,
) -> np.ndarray:
    """Factors of many new visitors at once: one exact row sweep against fixed Y, in float64.

    Args:
        rows: CsrMatrix [n, n_items], the visitors' ratings r_vi (scaled like the training
            data), each row's items distinct.
        item_factors: [n_items, k] the trained Y.
        item_counts: int [n_items], c_i of the training matrix (for f and λ).
        config: the trained model's hyperparameters.
        gramian: [k, k] YᵀY in float64 (computed when None; pass it for many calls).

    Returns:
        float32 [n, k]; a row without cells gets zeros.
    """
    return solve_rows(rows, item_factors, item_counts, config, gramian).astype(np.float32)


def history_row(items: np.ndarray, ratings: np.ndarray, n_items: int) -> CsrMatrix:
    """One visitor's (item, rating) pairs as a CsrMatrix [1, n_items], items sorted.

    Raises:
        ValueError: lengths differ, an item lies outside [0, n_items), or an item repeats
            (aggregate repeated items first).
    """
    items = np.asarray(items, dtype=np.int64).ravel()
    ratings = np.asarray(ratings, dtype=np.float32).ravel()
    if items.size != ratings.size:
        raise ValueError(f"items and ratings differ in length: {items.size}, {ratings.size}")
    if items.size and (items.min() < 0 or items.max() >= n_items):
        raise ValueError(f"item indices must lie in [0, {n_items})")
    if np.unique(items).size != items.size:
        raise ValueError("items must be distinct; aggregate repeated items first")
    order = np.argsort(items, kind="stable")
    indptr = np.array([0, items.size], dtype=np.int64)
    return CsrMatrix(indptr, items[order], ratings[order], (1, n_items))


def fold_in(
    item_factors: np.ndarray | tf.Tensor,
    gramian: np.ndarray | tf.Tensor | None,
    item_indices: np.ndarray,
    ratings: np.ndarray,
    item_counts: np.ndarray,
    config: WALSConfig,
    dtype: tf.DType = FOLD_IN_DTYPE,
) -> np.ndarray:
    """Factors of one new visitor from their (item, rating) pairs: the row of `solve_rows`.

    Args:
        item_factors: [n_items, k] trained Y.
        gramian: [k, k] YᵀY in `dtype`, precomputed once for many fold-ins; computed when None.
        item_indices: int [m], distinct items of the visitor, in any order.
        ratings: float [m], r_vi of those items (scaled like the training data).
        item_counts: int [n_items], c_i of the training matrix (for the weights f).
        config: the trained model's hyperparameters.
        dtype: the solve's dtype.

    Returns:
        [k] NumPy array of `dtype`; zeros when no items are given.
    """
    row = history_row(item_indices, ratings, np.shape(item_factors)[0])
    return solve_rows(row, item_factors, item_counts, config, gramian, dtype)[0]
