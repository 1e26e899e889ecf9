"""The WALS objective's hyperparameters (`WALSConfig`, validated once) and its three terms.

NumPy only: importing this module loads neither TensorFlow nor Beam, so flags can be parsed and
a config built cheaply. `trainer.core.objective_tf` holds the TensorFlow twins of the three
functions below (the SavedModel uses them); a test proves the twins equal.

The objective and its normal equations are written once, in `trainer.core.problem.define_rows`.
Its three data-dependent terms, for a row u and an item i with c_i observed entries in the
*training* matrix:

    f_ui  the extra weight of an observed cell            `observed_weights(config, c).f(i, r)`
    t_ui  the value fitted on an observed cell            `target(config, r)`
    λ_u   the row's regularization                       `row_regularization(config, n, N)`

Weightings (`WEIGHTINGS`), f_ui = per_item[i] + per_rating · max(r_ui, 0):

    uniform:            f_ui = 1                     per_item = 1,          per_rating = 0
    column_frequency:   f_ui = ω · c_i^p             per_item = ω · c_i^p,  per_rating = 0
                        (ω = column_weight_scale, p = column_weight_exponent; p = +1 linear,
                        p = -1 inverse item frequency)
    inverse_frequency:  f_ui = c_i^(−e)              per_item = c_i^(−e),   per_rating = 0
                        (e = inverse_frequency_exponent)
    confidence:         f_ui = α · max(r_ui, 0)      per_item = 0,          per_rating = α
                        (Hu, Koren & Volinsky 2008; α = confidence_alpha)

An item with c_i = 0 has no training cell and gets per_item = 0. A negative rating (possible
only for a new visitor whose raw value falls below the training minimum under `unit` scaling)
weighs nothing extra under `confidence`, on every path: training, fold-in and the SavedModel.

Target: t_ui = 1 under `binary_target` (Hu, Koren & Volinsky's preference; r then enters only
through f, e.g. under `confidence`), else t_ui = r_ui.

Regularization, scaled per row as in "Revisiting the Performance of iALS on Item
Recommendation Benchmarks" (Rendle et al., 2021):

    λ_u = λ · (n_u + w0 · N_other)^ν

with n_u the row's observed count, N_other the size of the fixed side (N_items when solving
users) and ν = regularization_exp (ν = 0 gives plain λ, ν = 1 the frequency scaling).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

UNIFORM = "uniform"
COLUMN_FREQUENCY = "column_frequency"
INVERSE_FREQUENCY = "inverse_frequency"
CONFIDENCE = "confidence"
WEIGHTINGS = (UNIFORM, COLUMN_FREQUENCY, INVERSE_FREQUENCY, CONFIDENCE)
# Earlier releases called inverse_frequency "log", though it computes no logarithm; models
# saved with that name still load.
_WEIGHTING_ALIASES = {"log": INVERSE_FREQUENCY}

CHOLESKY = "cholesky"
CG = "cg"
SOLVERS = (CHOLESKY, CG)

# The config fields each weighting reads (besides `weighting`).
WEIGHTING_FIELDS = {
    UNIFORM: (),
    COLUMN_FREQUENCY: ("column_weight_scale", "column_weight_exponent"),
    INVERSE_FREQUENCY: ("inverse_frequency_exponent",),
    CONFIDENCE: ("confidence_alpha",),
}
# Names of earlier releases (TF contrib's), kept for one release: config.json keys of saved
# models and the deprecated flags --feature_wt_factor / --feature_wt_exp.
LEGACY_SCALE = "feature_wt_factor"
LEGACY_EXPONENT = "feature_wt_exp"


def canonical_weighting(scheme: str) -> str:
    """The current name of a weighting scheme ("log" -> "inverse_frequency")."""
    return _WEIGHTING_ALIASES.get(scheme, scheme)


def exponent_field(weighting: str) -> str | None:
    """The config field of `weighting`'s exponent (what the old `feature_wt_exp` meant), if any."""
    return {
        COLUMN_FREQUENCY: "column_weight_exponent",
        INVERSE_FREQUENCY: "inverse_frequency_exponent",
    }.get(canonical_weighting(weighting))


def upgrade_legacy_fields(values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` with the old weighting keys renamed to the fields they meant.

    `feature_wt_factor` becomes `column_weight_scale`; `feature_wt_exp` becomes the exponent of
    the weighting in `values` (`column_weight_exponent` or `inverse_frequency_exponent`) and is
    dropped under a weighting without one. A key given under its new name wins.
    """
    upgraded = dict(values)
    scale = upgraded.pop(LEGACY_SCALE, None)
    exponent = upgraded.pop(LEGACY_EXPONENT, None)
    if scale is not None:
        upgraded.setdefault("column_weight_scale", scale)
    field = exponent_field(str(upgraded.get("weighting", UNIFORM)))
    if exponent is not None and field is not None:
        upgraded.setdefault(field, exponent)
    return upgraded


@dataclasses.dataclass(frozen=True)
class WALSConfig:
    """WALS hyperparameters, validated on construction (`validate`).

    Attributes:
        latent_factors: k, the factor dimension.
        num_iters: alternating iterations (each a user sweep then an item sweep).
        regularization: λ, the base L2 weight.
        regularization_exp: ν in λ_u = λ·(n_u + w0·N_other)^ν; 0 gives plain λ, 1 the
            frequency scaling of "Revisiting the Performance of iALS" (Rendle et al., 2021).
        unobserved_weight: w0, the weight of every cell, observed or not.
        weighting: the observed extra weight f_ui, one of `WEIGHTINGS` (module docstring).
        column_weight_scale: ω in column_frequency, f = ω·c_i^p.
        column_weight_exponent: p in column_frequency (+1 linear, -1 inverse item frequency).
        inverse_frequency_exponent: e in inverse_frequency, f = c_i^(−e); the default, 1, is
            the inverse item frequency the name promises. (Earlier releases shared one exponent,
            `feature_wt_exp`, default -1, which gave this scheme f = c_i; models saved with it
            keep that meaning when loaded.)
        confidence_alpha: α in confidence, f = α·max(r_ui, 0).
        solver: `CHOLESKY` (exact) or `CG` (conjugate gradient warm-started from the current
            factors).
        cg_steps: CG steps per solve.
        init_stddev: σ; factors start i.i.d. N(0, (σ/√k)²).
        seed: seed of the initialisation; the result is a function of the data and the config.
        binary_target: fit t = 1 instead of r_ui on observed cells (Hu, Koren & Volinsky's
            preference); r_ui then only enters through the weights, e.g. `confidence`.
    """

    latent_factors: int = 32
    num_iters: int = 15
    # Chosen by benchmarks/defaults_study.py on validation splits of 12 synthetic samples (3
    # shapes x 2 seeds x 2 dwell-time models, known and new visitors; README, Training): binary
    # target, w0 0.1, λ 0.03 was never worse than the former r target, w0 0.5, λ 0.01 (which
    # collapsed towards popularity on a 4,000-item catalogue), and agrees with two real datasets.
    regularization: float = 0.03
    regularization_exp: float = 1.0
    unobserved_weight: float = 0.1
    weighting: str = UNIFORM
    column_weight_scale: float = 130.0
    column_weight_exponent: float = -1.0
    inverse_frequency_exponent: float = 1.0
    confidence_alpha: float = 10.0
    solver: str = CHOLESKY
    cg_steps: int = 3
    init_stddev: float = 0.1
    seed: int = 0
    binary_target: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "weighting", canonical_weighting(self.weighting))
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the first invalid field. The one check of every field."""

        def require(ok: bool, field: str, condition: str) -> None:
            if not ok:
                value = getattr(self, field)
                raise ValueError(f"{field} must be {condition}, got {value!r}")

        def is_int(value) -> bool:
            return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

        def is_real(value) -> bool:
            return (
                isinstance(value, (int, float, np.number))
                and not isinstance(value, bool)
                and math.isfinite(value)
            )

        def non_negative(field: str) -> None:
            value = getattr(self, field)
            require(is_real(value) and value >= 0, field, "finite and >= 0")

        require(is_int(self.latent_factors) and self.latent_factors >= 1, "latent_factors", ">= 1")
        require(is_int(self.num_iters) and self.num_iters >= 0, "num_iters", ">= 0")
        non_negative("regularization")
        non_negative("regularization_exp")
        non_negative("unobserved_weight")
        require(
            self.regularization > 0 or self.unobserved_weight > 0,
            "regularization",
            "> 0 when unobserved_weight is 0 (else the normal equations can be singular)",
        )
        require(self.weighting in WEIGHTINGS, "weighting", f"one of {WEIGHTINGS}")
        non_negative("column_weight_scale")
        require(is_real(self.column_weight_exponent), "column_weight_exponent", "finite")
        require(is_real(self.inverse_frequency_exponent), "inverse_frequency_exponent", "finite")
        non_negative("confidence_alpha")
        require(self.solver in SOLVERS, "solver", f"one of {SOLVERS}")
        require(is_int(self.cg_steps) and self.cg_steps >= 1, "cg_steps", ">= 1")
        require(is_real(self.init_stddev) and self.init_stddev > 0, "init_stddev", "finite and > 0")
        require(is_int(self.seed) and self.seed >= 0, "seed", "an integer >= 0")
        require(isinstance(self.binary_target, (bool, np.bool_)), "binary_target", "a bool")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> WALSConfig:
        """The config of a mapping such as a saved model's config.json: unknown keys ignored,
        old weighting keys (`feature_wt_factor`, `feature_wt_exp`) upgraded."""
        values = upgrade_legacy_fields(values)
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{name: value for name, value in values.items() if name in names})


@dataclasses.dataclass(frozen=True)
class ObservedWeights:
    """The observed extra weight of every cell: f_ui = per_item[i] + per_rating·max(r_ui, 0).

    Attributes:
        per_item: float64 [n_items], the part of f_ui that depends on the item's training
            count c_i (module docstring); 0 for items with c_i = 0.
        per_rating: the part proportional to the rating, α under `confidence`, else 0.
    """

    per_item: np.ndarray
    per_rating: float

    def f(self, items: np.ndarray, ratings: np.ndarray) -> np.ndarray:
        """f_ui of each given cell: float64 [m].

        Args:
            items: int [m], the item of each cell (an index into `per_item`).
            ratings: float [m], r_ui.
        """
        items = np.asarray(items, dtype=np.int64)
        ratings = np.asarray(ratings, dtype=np.float64)
        if items.shape != ratings.shape:
            raise ValueError(f"items and ratings differ in shape: {items.shape} vs {ratings.shape}")
        f = self.per_item[items]
        if self.per_rating:
            f = f + self.per_rating * np.maximum(ratings, 0.0)
        return f


def observed_weights(config: WALSConfig, item_counts: np.ndarray) -> ObservedWeights:
    """f's per-item table from the *global* item counts (the whole training matrix).

    Args:
        config: the hyperparameters (weighting and its parameters).
        item_counts: int [n_items], c_i: observed entries per item in the whole training
            matrix (not in a block of it).

    Returns:
        The `ObservedWeights` of `config.weighting` (formulas in the module docstring).
    """
    counts = np.asarray(item_counts, dtype=np.float64)
    if counts.ndim != 1 or (counts.size and counts.min() < 0):
        raise ValueError("item_counts must be a 1-D array of counts >= 0")
    per_item = np.zeros(counts.shape, dtype=np.float64)
    per_rating = 0.0
    observed = counts > 0
    if config.weighting == UNIFORM:
        per_item[observed] = 1.0
    elif config.weighting == COLUMN_FREQUENCY:
        per_item[observed] = config.column_weight_scale * np.power(
            counts[observed], config.column_weight_exponent
        )
    elif config.weighting == INVERSE_FREQUENCY:
        per_item[observed] = np.power(counts[observed], -float(config.inverse_frequency_exponent))
    else:
        per_rating = float(config.confidence_alpha)
    if not np.all(np.isfinite(per_item)):
        raise ValueError(f"observed weights must be finite (weighting {config.weighting!r})")
    return ObservedWeights(per_item, per_rating)


def target(config: WALSConfig, ratings: np.ndarray) -> np.ndarray:
    """t_ui, the value fitted on each observed cell: 1 under binary_target, else r_ui.

    Args:
        config: the hyperparameters (binary_target).
        ratings: float [m], r_ui.

    Returns:
        [m] in the dtype of `ratings` (float64 for a non-float input); `ratings` itself when
        binary_target is off and it is already a float array.
    """
    ratings = np.asarray(ratings)
    if not np.issubdtype(ratings.dtype, np.floating):
        ratings = ratings.astype(np.float64)
    return np.ones_like(ratings) if config.binary_target else ratings


def row_regularization(config: WALSConfig, counts: np.ndarray, n_other: int) -> np.ndarray:
    """λ_u = λ · (n_u + w0 · n_other)^ν of each row: float64 [n].

    Args:
        config: the hyperparameters (λ, w0, ν).
        counts: int [n], n_u: observed entries of each row being solved.
        n_other: the number of rows of the fixed side (N_items when solving users), >= 0.
    """
    if n_other < 0:
        raise ValueError(f"n_other must be >= 0, got {n_other}")
    base = np.asarray(counts, dtype=np.float64) + config.unobserved_weight * n_other
    return config.regularization * np.power(base, config.regularization_exp)
