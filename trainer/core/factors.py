"""`WALSFactors`: a trained (or partly trained) factorisation, what every trainer returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass
class WALSFactors:
    """A trained (or partly trained) factorisation R ≈ X Yᵀ.

    Attributes:
        user_factors: [n_users, k] X, float32 (float64 when fit with dtype=tf.float64).
        item_factors: [n_items, k] Y, same dtype.
        history: one loss dict per finished iteration (see `trainer.core.loss.loss`).
    """

    user_factors: np.ndarray
    item_factors: np.ndarray
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)


IterationCallback = Callable[[int, WALSFactors, dict[str, float]], None]
