"""WALS hyperparameters: `WALSConfig`, shared by the local and the distributed trainer."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from trainer.core import tiling as wals_solver
from trainer.core import weights


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
        weighting: the observed extra weight f_ui, one of `trainer.core.weights.WEIGHTINGS`.
        feature_wt_factor: ω in column_frequency, f = ω·c_i^p.
        feature_wt_exp: p in column_frequency (-1: inverse item frequency), e in
            inverse_frequency, f = (1/c_i)^e.
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
    # Chosen by benchmarks/defaults_study.py on validation splits of 12 synthetic samples (3
    # shapes x 2 seeds x 2 dwell-time models, known and new visitors; README, Training): binary
    # target, w0 0.1, λ 0.03 was never worse than the former r target, w0 0.5, λ 0.01 (which
    # collapsed towards popularity on a 4,000-item catalogue), and agrees with two real datasets.
    regularization: float = 0.03
    regularization_exp: float = 1.0
    unobserved_weight: float = 0.1
    weighting: str = weights.UNIFORM
    feature_wt_factor: float = 130.0
    feature_wt_exp: float = -1.0
    confidence_alpha: float = 10.0
    solver: str = wals_solver.CHOLESKY
    cg_steps: int = 3
    init_stddev: float = 0.1
    seed: int = 0
    binary_target: bool = True

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

    def __post_init__(self) -> None:
        object.__setattr__(self, "weighting", weights.canonical_weighting(self.weighting))

    def item_terms(self, item_counts: np.ndarray) -> tuple[np.ndarray, float]:
        """(a [n_items], α) with f_ui = a_i + α·max(r_ui, 0); see `trainer.core.weights.item_terms`."""
        return weights.item_terms(
            item_counts,
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
