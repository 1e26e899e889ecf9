"""The TensorFlow twins of the objective's three terms, for graphs such as the SavedModel's.

Same formulas as `trainer.core.objective` (see its module docstring), as TF ops in float64 that
work inside a `tf.function`; the config is read in Python, so its values become constants of
the graph. tests/test_objective.py proves each twin equal to its NumPy original.

    f_ui = per_item(c_i) + per_rating · max(r_ui, 0)    `observed_weight(config, c_i, r_ui)`
    t_ui = 1 under binary_target, else r_ui              `target(config, r_ui)`
    λ_u  = λ · (n_u + w0 · N_other)^ν                    `row_regularization(config, n_u, N)`
"""

from __future__ import annotations

import tensorflow as tf

from trainer.core import objective
from trainer.core.objective import WALSConfig


def observed_weight(config: WALSConfig, item_counts: tf.Tensor, ratings: tf.Tensor) -> tf.Tensor:
    """f_ui of each given cell from its item's training count: float64 [m].

    The twin of `objective.observed_weights(config, counts).f(items, ratings)` with
    `item_counts = counts[items]`.

    Args:
        config: the hyperparameters (weighting and its parameters).
        item_counts: numeric [m], c_i of each cell's item in the whole training matrix.
        ratings: numeric [m], r_ui.
    """
    counts = tf.cast(item_counts, tf.float64)
    ratings = tf.cast(ratings, tf.float64)
    observed = counts > 0
    safe = tf.where(observed, counts, tf.ones_like(counts))  # no 0^p on the unused branch
    if config.weighting == objective.UNIFORM:
        per_item = tf.ones_like(counts)
    elif config.weighting == objective.COLUMN_FREQUENCY:
        per_item = config.column_weight_scale * tf.pow(
            safe, tf.constant(config.column_weight_exponent, tf.float64)
        )
    elif config.weighting == objective.INVERSE_FREQUENCY:
        per_item = tf.pow(safe, tf.constant(-float(config.inverse_frequency_exponent), tf.float64))
    else:
        per_item = tf.zeros_like(counts)
    f = tf.where(observed, per_item, tf.zeros_like(per_item))
    if config.weighting == objective.CONFIDENCE and config.confidence_alpha:
        f = f + float(config.confidence_alpha) * tf.maximum(ratings, 0.0)
    return f


def target(config: WALSConfig, ratings: tf.Tensor) -> tf.Tensor:
    """t_ui of each observed cell: float64 [m], 1 under binary_target, else r_ui.

    Args:
        config: the hyperparameters (binary_target).
        ratings: numeric [m], r_ui.
    """
    ratings = tf.cast(ratings, tf.float64)
    return tf.ones_like(ratings) if config.binary_target else ratings


def row_regularization(config: WALSConfig, counts: tf.Tensor, n_other: int) -> tf.Tensor:
    """λ_u = λ · (n_u + w0 · n_other)^ν of each row: float64, the shape of `counts`.

    Args:
        config: the hyperparameters (λ, w0, ν).
        counts: numeric, n_u: observed entries of each row being solved (a scalar for one row).
        n_other: the number of rows of the fixed side (N_items when solving users), >= 0.
    """
    if n_other < 0:
        raise ValueError(f"n_other must be >= 0, got {n_other}")
    base = tf.cast(counts, tf.float64) + float(config.unobserved_weight) * float(n_other)
    return float(config.regularization) * tf.pow(
        base, tf.constant(float(config.regularization_exp), tf.float64)
    )
