"""Observed-cell weights and regularization scaling for WALS.

The model weights every cell of the rating matrix R (n_users x n_items):

    w_ui = w0            for unobserved cells (r_ui = 0),
    w_ui = w0 + f_ui     for observed cells,

where w0 is the unobserved weight and f_ui the extra weight of an observed cell, under one of
the schemes in `WEIGHTINGS`:

    uniform:           f_ui = 1
    column_frequency:  f_ui = ω · c_i^p         (ω = feature_wt_factor, p = feature_wt_exp;
                                                 p = +1 linear, p = -1 inverse frequency)
    inverse_frequency: f_ui = (1 / c_i)^e       (e = feature_wt_exp; "log" is its old name)
    confidence:        f_ui = α · r_ui          (Hu, Koren & Volinsky 2008; α = confidence_alpha)

with c_i the number of observed entries in item i's column of the *training* matrix.

Regularization is scaled per row as in "Revisiting the Performance of iALS on Item
Recommendation Benchmarks" (Rendle et al., 2021):

    λ_u = λ · (n_u + w0 · N_items)^ν,    λ_i = λ · (n_i + w0 · N_users)^ν,

with n_u the observed count of row u and ν = regularization_exp (ν = 0 gives plain λ).
"""

from __future__ import annotations

import numpy as np

UNIFORM = "uniform"
COLUMN_FREQUENCY = "column_frequency"
INVERSE_FREQUENCY = "inverse_frequency"
CONFIDENCE = "confidence"
WEIGHTINGS = (UNIFORM, COLUMN_FREQUENCY, INVERSE_FREQUENCY, CONFIDENCE)
# Earlier releases called inverse_frequency "log", though it computes no logarithm; models
# saved with that name still load.
_ALIASES = {"log": INVERSE_FREQUENCY}


def canonical_weighting(scheme: str) -> str:
    """The current name of a weighting scheme ("log" -> "inverse_frequency")."""
    return _ALIASES.get(scheme, scheme)


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
        feature_wt_exp: p of `column_frequency` or e of `inverse_frequency`, must be finite.
        confidence_alpha: α of `confidence`, must be finite and >= 0.
    """
    scheme = canonical_weighting(scheme)
    if scheme not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {scheme!r}; expected one of {WEIGHTINGS}")
    if not np.isfinite(feature_wt_factor) or feature_wt_factor < 0:
        raise ValueError(f"feature_wt_factor must be finite and >= 0, got {feature_wt_factor}")
    if not np.isfinite(feature_wt_exp):
        raise ValueError(f"feature_wt_exp must be finite, got {feature_wt_exp}")
    if not np.isfinite(confidence_alpha) or confidence_alpha < 0:
        raise ValueError(f"confidence_alpha must be finite and >= 0, got {confidence_alpha}")


def item_terms(
    item_counts: np.ndarray,
    scheme: str,
    feature_wt_factor: float = 1.0,
    feature_wt_exp: float = 1.0,
    confidence_alpha: float = 1.0,
) -> tuple[np.ndarray, float]:
    """Every scheme in one form: f_ui = a_i + α · max(r_ui, 0).

        uniform:           a_i = 1,              α = 0
        column_frequency:  a_i = ω · c_i^p,      α = 0
        inverse_frequency: a_i = (1 / c_i)^e,    α = 0
        confidence:        a_i = 0,              α = confidence_alpha

    A negative rating (possible only for a new visitor whose raw value falls below the
    training minimum under `unit` scaling) weighs nothing extra under `confidence`, on every
    path: training, fold-in and the SavedModel.

    Args:
        item_counts: int [n_items], c_i: observed entries per item in the whole training
            matrix (not in a block of it).
        scheme: one of `WEIGHTINGS`.
        feature_wt_factor: ω of `column_frequency`.
        feature_wt_exp: p of `column_frequency`, e of `inverse_frequency`.
        confidence_alpha: α of `confidence`.

    Returns:
        (a float64 [n_items], α). Items with c_i = 0 have no training cell and get a_i = 0.
    """
    scheme = _ALIASES.get(scheme, scheme)
    validate_weighting(scheme, feature_wt_factor, feature_wt_exp, confidence_alpha)
    counts = np.asarray(item_counts, dtype=np.float64)
    if counts.ndim != 1 or (counts.size and counts.min() < 0):
        raise ValueError("item_counts must be a 1-D array of counts >= 0")
    a = np.zeros(counts.shape, dtype=np.float64)
    alpha = 0.0
    observed = counts > 0
    if scheme == UNIFORM:
        a[observed] = 1.0
    elif scheme == COLUMN_FREQUENCY:
        a[observed] = feature_wt_factor * np.power(counts[observed], feature_wt_exp)
    elif scheme == INVERSE_FREQUENCY:
        a[observed] = np.power(1.0 / counts[observed], feature_wt_exp)
    else:
        alpha = float(confidence_alpha)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"observed weights must be finite (scheme {scheme!r})")
    return a, alpha


def entry_weights(
    items: np.ndarray, ratings: np.ndarray, a: np.ndarray, alpha: float
) -> np.ndarray:
    """f_ui = a_i + α · max(r_ui, 0) of each given cell: float32 [m].

    Args:
        items: int [m], the item of each cell (an index into `a`).
        ratings: float [m], r_ui.
        a: float [n_items], from `item_terms`.
        alpha: α, from `item_terms`.
    """
    items = np.asarray(items, dtype=np.int64)
    ratings = np.asarray(ratings, dtype=np.float64)
    if items.shape != ratings.shape:
        raise ValueError(f"items and ratings differ in shape: {items.shape} vs {ratings.shape}")
    f = np.asarray(a, dtype=np.float64)[items]
    if alpha:
        f = f + alpha * np.maximum(ratings, 0.0)
    return f.astype(np.float32)


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
