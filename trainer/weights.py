"""Observed-cell weights and regularization scaling for WALS.

The model weights every cell of the rating matrix R (n_users x n_items):

    w_ui = w0            for unobserved cells (r_ui = 0),
    w_ui = w0 + f_ui     for observed cells,

where w0 is the unobserved weight and f_ui the extra weight of an observed cell, under one of
the schemes in `WEIGHTINGS`:

    uniform:           f_ui = 1
    column_frequency:  f_ui = ω · c_i^p         (ω = feature_wt_factor, p = feature_wt_exp;
                                                 p = +1 linear, p = -1 inverse frequency)
    log:               f_ui = (1 / c_i)^e       (e = feature_wt_exp)
    confidence:        f_ui = α · r_ui          (Hu, Koren & Volinsky 2008; α = confidence_alpha)

with c_i the number of observed entries in item i's column of the *training* matrix.

Regularization is scaled per row as in "Revisiting the Performance of iALS on Item
Recommendation Benchmarks" (Rendle et al., 2021):

    λ_u = λ · (n_u + w0 · N_items)^ν,    λ_i = λ · (n_i + w0 · N_users)^ν,

with n_u the observed count of row u and ν = regularization_exp (ν = 0 gives plain λ).
"""

from __future__ import annotations

import numpy as np

from trainer.sparse import CsrMatrix

UNIFORM = "uniform"
COLUMN_FREQUENCY = "column_frequency"
LOG = "log"
CONFIDENCE = "confidence"
WEIGHTINGS = (UNIFORM, COLUMN_FREQUENCY, LOG, CONFIDENCE)


def validate_weighting(
    scheme: str,
    feature_wt_factor: float = 1.0,
    feature_wt_exp: float = 1.0,
    confidence_alpha: float = 1.0,
) -> None:
    """Raises ValueError if the weighting scheme or one of its parameters is invalid.

    Args:
        scheme: one of `WEIGHTINGS`.
        feature_wt_factor: ω of `column_frequency`, must be finite and >= 0.
        feature_wt_exp: p of `column_frequency` or e of `log`, must be finite.
        confidence_alpha: α of `confidence`, must be finite and >= 0.
    """
    if scheme not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {scheme!r}; expected one of {WEIGHTINGS}")
    if not np.isfinite(feature_wt_factor) or feature_wt_factor < 0:
        raise ValueError(f"feature_wt_factor must be finite and >= 0, got {feature_wt_factor}")
    if not np.isfinite(feature_wt_exp):
        raise ValueError(f"feature_wt_exp must be finite, got {feature_wt_exp}")
    if not np.isfinite(confidence_alpha) or confidence_alpha < 0:
        raise ValueError(f"confidence_alpha must be finite and >= 0, got {confidence_alpha}")


def cell_weights(
    cols: np.ndarray,
    ratings: np.ndarray,
    col_counts: np.ndarray,
    scheme: str,
    feature_wt_factor: float = 1.0,
    feature_wt_exp: float = 1.0,
    confidence_alpha: float = 1.0,
) -> np.ndarray:
    """The extra weight f_ui of each given observed cell.

    Use this for cells outside the training matrix (fold-in of a new user) with the training
    column counts, so that the new user's cells weigh what they would have weighed in training.

    Args:
        cols: int [m], the item (column) of each cell.
        ratings: float [m], r_ui of each cell.
        col_counts: int [n_items], c_i: observed entries per column of the training matrix.
        scheme: one of `WEIGHTINGS`; see the module docstring for the formulas.
        feature_wt_factor: ω of `column_frequency`.
        feature_wt_exp: p of `column_frequency`, e of `log`.
        confidence_alpha: α of `confidence`.

    Returns:
        float32 [m], f_ui >= 0.

    Raises:
        ValueError: on an invalid scheme or parameter, a cell whose column has c_i = 0 under a
            count-based scheme, or a negative weight (negative ratings under `confidence`).
    """
    validate_weighting(scheme, feature_wt_factor, feature_wt_exp, confidence_alpha)
    cols = np.asarray(cols, dtype=np.int64)
    ratings = np.asarray(ratings, dtype=np.float64)
    if cols.shape != ratings.shape:
        raise ValueError(f"cols and ratings differ in shape: {cols.shape} vs {ratings.shape}")
    if scheme == UNIFORM:
        f = np.ones(cols.shape, dtype=np.float64)
    elif scheme == CONFIDENCE:
        f = confidence_alpha * ratings
    else:
        counts = np.asarray(col_counts, dtype=np.float64)[cols]
        if np.any(counts <= 0):
            raise ValueError(f"{scheme} weighting needs c_i > 0 for every observed column")
        if scheme == COLUMN_FREQUENCY:
            f = feature_wt_factor * np.power(counts, feature_wt_exp)
        else:
            f = np.power(1.0 / counts, feature_wt_exp)
    if f.size and not (np.all(np.isfinite(f)) and f.min() >= 0):
        raise ValueError(f"observed weights must be finite and >= 0 (scheme {scheme!r})")
    return f.astype(np.float32)


def observed_weights(
    matrix: CsrMatrix,
    scheme: str,
    feature_wt_factor: float = 1.0,
    feature_wt_exp: float = 1.0,
    confidence_alpha: float = 1.0,
) -> np.ndarray:
    """The extra weight f_ui of every stored entry of the training matrix.

    Args:
        matrix: the rating matrix R (n_users x n_items); c_i is taken from its columns.
        scheme: one of `WEIGHTINGS`.
        feature_wt_factor: ω of `column_frequency`.
        feature_wt_exp: p of `column_frequency`, e of `log`.
        confidence_alpha: α of `confidence`.

    Returns:
        float32 [nnz], f_ui in the matrix's nnz (row-major) order. For the column sweep carry
        it to the transpose with `f[perm]`, perm from `CsrMatrix.transpose_with_perm`.
    """
    return cell_weights(
        matrix.indices,
        matrix.values,
        matrix.col_counts(),
        scheme,
        feature_wt_factor,
        feature_wt_exp,
        confidence_alpha,
    )


def regularization(
    counts: np.ndarray,
    lam: float,
    w0: float,
    n_other: int,
    exponent: float,
) -> np.ndarray:
    """Per-row regularization λ_u = λ · (n_u + w0 · n_other)^ν.

    Args:
        counts: int [n], n_u: observed entries of each row being solved.
        lam: λ >= 0, the base regularization.
        w0: the unobserved weight, >= 0.
        n_other: the number of rows of the fixed side (N_items when solving users).
        exponent: ν >= 0; 0 gives λ_u = λ for every row, 1 the iALS++ frequency scaling.

    Returns:
        float64 [n], λ_u.
    """
    if not np.isfinite(lam) or lam < 0:
        raise ValueError(f"regularization must be finite and >= 0, got {lam}")
    if not np.isfinite(w0) or w0 < 0:
        raise ValueError(f"unobserved weight w0 must be finite and >= 0, got {w0}")
    if not np.isfinite(exponent) or exponent < 0:
        raise ValueError(f"regularization exponent must be finite and >= 0, got {exponent}")
    if n_other < 0:
        raise ValueError(f"n_other must be >= 0, got {n_other}")
    base = np.asarray(counts, dtype=np.float64) + w0 * n_other
    return lam * np.power(base, exponent)
