"""Fold-in: the factors of a row the model was not trained on, from its observed cells."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from trainer.core import problem
from trainer.core import solver as wals_solver
from trainer.core.config import WALSConfig


def fold_in(
    item_factors: np.ndarray | tf.Tensor,
    gramian: np.ndarray | tf.Tensor | None,
    item_indices: np.ndarray,
    ratings: np.ndarray,
    item_counts: np.ndarray,
    config: WALSConfig,
    dtype: tf.DType = tf.float32,
) -> np.ndarray:
    """Factors of a new user from their (item, rating) pairs, without retraining.

    Solves the user's row exactly against the trained items, as the row sweep would, with the
    problem of `trainer.core.problem.define_visitor_row`:
        x = (w0·G + Σ_i f_i y_i y_iᵀ + λ_u I)⁻¹ Σ_i (w0 + f_i) t_i y_i,
        λ_u = λ·(m + w0·N_items)^ν, m = number of given items.

    Args:
        item_factors: [n_items, k] trained Y.
        gramian: [k, k] G = YᵀY, precomputed once for many fold-ins; computed when None.
        item_indices: int [m], distinct items of the user.
        ratings: float [m], r_ui of those items (scaled like the training data).
        item_counts: int [n_items], c_i of the training matrix (for the weights f).
        config: the trained model's hyperparameters.
        dtype: computation dtype.

    Returns:
        [k] NumPy array of `dtype`; zeros when no items are given.
    """
    item_factors = tf.cast(tf.convert_to_tensor(item_factors), dtype)
    if item_factors.shape[0] != np.asarray(item_counts).size:
        raise ValueError("item_factors and item_counts disagree on the number of items")
    row = problem.define_visitor_row(item_indices, ratings, item_counts, config)
    if gramian is None:
        gramian = wals_solver.gramian(item_factors, dtype)
    plan = row.plan(wals_solver.CHOLESKY, dtype=dtype)
    return wals_solver.solve_planned(plan, item_factors, gramian, wals_solver.CHOLESKY).numpy()[0]
