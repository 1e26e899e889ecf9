"""A slow, obvious dense WALS in float64 NumPy: the test oracle for `trainer.core.solver`.

It builds the full n_users x n_items weight matrix W and rating matrix R and solves every row
with `np.linalg.solve` of the plain weighted normal equations, with no Gramian trick:

    (Yᵀ diag(W_u) Y + λ_u I) x_u = Yᵀ diag(W_u) R_u.

Product code never imports this module.
"""

from __future__ import annotations

import numpy as np


def dense_weights(
    ratings: np.ndarray,
    observed: np.ndarray,
    w0: float,
    scheme: str,
    column_weight_scale: float = 1.0,
    column_weight_exponent: float = 1.0,
    inverse_frequency_exponent: float = 1.0,
    confidence_alpha: float = 1.0,
) -> np.ndarray:
    """W, float64 [n, m]: w0 everywhere, plus f on observed cells (formulas of
    trainer.core.objective).

    Args:
        ratings: float [n, m] R, 0 on unobserved cells.
        observed: bool [n, m], which cells are observed.
        w0: the unobserved weight.
        scheme: uniform, column_frequency, inverse_frequency or confidence.
        column_weight_scale: ω (column_frequency).
        column_weight_exponent: p (column_frequency).
        inverse_frequency_exponent: e (inverse_frequency).
        confidence_alpha: α.
    """
    counts = observed.sum(axis=0).astype(np.float64)  # c_i, per column
    safe = np.where(counts > 0, counts, 1.0)
    if scheme == "uniform":
        extra = np.ones_like(ratings)
    elif scheme == "column_frequency":
        extra = np.broadcast_to(column_weight_scale * safe**column_weight_exponent, ratings.shape)
    elif scheme in ("inverse_frequency", "log"):
        extra = np.broadcast_to((1.0 / safe) ** inverse_frequency_exponent, ratings.shape)
    elif scheme == "confidence":
        extra = confidence_alpha * np.maximum(ratings, 0.0)
    else:
        raise ValueError(scheme)
    return np.where(observed, w0 + extra, w0)


def dense_regularization(
    observed: np.ndarray, lam: float, w0: float, exponent: float
) -> tuple[np.ndarray, np.ndarray]:
    """(λ_u [n], λ_i [m]): λ·(n_u + w0·m)^ν and λ·(n_i + w0·n)^ν."""
    n, m = observed.shape
    row_counts = observed.sum(axis=1)
    col_counts = observed.sum(axis=0)
    return lam * (row_counts + w0 * m) ** exponent, lam * (col_counts + w0 * n) ** exponent


def solve_rows(
    ratings: np.ndarray, weights: np.ndarray, fixed: np.ndarray, reg: np.ndarray
) -> np.ndarray:
    """x_u = (Yᵀ diag(W_u) Y + λ_u I)⁻¹ Yᵀ diag(W_u) R_u for every row u: float64 [n, k]."""
    k = fixed.shape[1]
    out = np.zeros((ratings.shape[0], k))
    for u in range(ratings.shape[0]):
        a = fixed.T @ (weights[u][:, None] * fixed) + reg[u] * np.eye(k)
        b = fixed.T @ (weights[u] * ratings[u])
        out[u] = np.linalg.solve(a, b)
    return out


def loss(
    ratings: np.ndarray,
    weights: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    reg_rows: np.ndarray,
    reg_cols: np.ndarray,
) -> float:
    """Σ_(u,i) W_ui (R_ui − x_u·y_i)² + Σ_u λ_u ‖x_u‖² + Σ_i λ_i ‖y_i‖²."""
    residual = ratings - x @ y.T
    return float(
        np.sum(weights * residual**2)
        + np.sum(reg_rows * np.sum(x**2, axis=1))
        + np.sum(reg_cols * np.sum(y**2, axis=1))
    )


def fit(
    ratings: np.ndarray,
    weights: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    reg_rows: np.ndarray,
    reg_cols: np.ndarray,
    num_iters: int,
) -> tuple[np.ndarray, np.ndarray]:
    """num_iters alternating sweeps from (x, y): X from Y, then Y from X."""
    for _ in range(num_iters):
        x = solve_rows(ratings, weights, y, reg_rows)
        y = solve_rows(ratings.T, weights.T, x, reg_cols)
    return x, y
