"""One definition of the WALS problem, for any block of whole rows of either side.

Every driver builds the least-squares problem of the rows it solves with `define_rows`: the
local trainer (once per side), the Beam trainer (once per block), fold-in of new visitors
(`trainer.core.foldin`) and the benchmarks. The SavedModel builds the same equations in its
graph from the TF twins of the same terms (`trainer.core.objective_tf`). So f, the target and
λ cannot disagree between them. The objective and its normal equations are written once, in
`define_rows`' docstring; f, t and λ are `trainer.core.objective`'s.

The loss of the whole model, in partial sums per block, is `trainer.core.loss`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from trainer.core import objective
from trainer.core.objective import WALSConfig
from trainer.core.sides import ITEMS, SIDES, USERS, Side  # noqa: F401  (re-exported)
from trainer.core.sparse import CsrMatrix


@dataclasses.dataclass(frozen=True)
class RowProblem:
    """The least-squares problem of a block of rows. NumPy only, so it pickles.

    Attributes:
        targets: [n_rows, n_fixed], t_ui of each observed cell; columns index the fixed side.
        f: float32 [nnz], f_ui in `targets`' nnz order.
        reg: float64 [n_rows], λ_u.
        w0: the unobserved weight.
    """

    targets: CsrMatrix
    f: np.ndarray
    reg: np.ndarray
    w0: float


def define_rows(
    rows: CsrMatrix,
    side: int,
    item_counts: np.ndarray,
    config: WALSConfig,
    row_items: np.ndarray | None = None,
) -> RowProblem:
    """The problem of a block of whole rows of one side, against the fixed other side.

    WALS minimises, over the whole n_users x n_items matrix R,

        L = Σ_(u,i) w_ui (t_ui − x_u·y_i)² + Σ_u λ_u ‖x_u‖² + Σ_i λ_i ‖y_i‖²,
        w_ui = w0 + f_ui on an observed cell, w0 (with t_ui = 0) on an unobserved one.

    With the fixed side's factors Y ([N_fixed, k]) held, row u's optimum solves its normal
    equations, the only statement of them in this project:

        x_u = (YᵀY·w0 + Yᵀ diag(f_u) Y + λ_u I)⁻¹ Yᵀ (w0 + f_u) t_u

    where f_u and t_u are zero off the row's observed cells, so only the row's observed
    items enter beyond the shared Gramian YᵀY (the "Gramian trick"). The item side is the
    same with the roles of X and Y swapped. This function returns the three terms
    (`trainer.core.objective`; c_i counts the observed entries of item i in the whole
    training matrix, n_u those of row u, N_fixed is the size of the fixed side):

    f_ui, the observed extra weight, by `config.weighting`:
        uniform            1
        column_frequency   ω·c_i^p                (ω column_weight_scale, p column_weight_exponent)
        inverse_frequency  c_i^(−e)               (e inverse_frequency_exponent)
        confidence         α·max(r_ui, 0)         (α confidence_alpha)
    t_ui, the value fitted on an observed cell:
        binary_target on (the default)   1; r_ui then enters only through f (confidence)
        binary_target off                r_ui
    λ_u, the row's regularization, under every weighting:
        λ·(n_u + w0·N_fixed)^ν          (λ regularization, ν regularization_exp; ν = 0: λ)

    The kernels that solve these equations are in `trainer.core.solver`.

    Args:
        rows: [n_rows, n_fixed], the observed r_ui of every row of the block, complete rows.
            For USERS its columns are items (indices into `item_counts`); for ITEMS its
            columns are users and its rows are the items `row_items`.
        side: USERS or ITEMS, the side the rows belong to.
        item_counts: int [N_items], c_i over the whole training matrix (not this block).
        config: the hyperparameters.
        row_items: int [n_rows], for ITEMS the global item index of each row of the block;
            `arange(n_rows)` when None (the block is the whole item side).

    Returns:
        The block's `RowProblem`: t in `rows`' dtype, f float32, λ float64.
    """
    if side not in SIDES:
        raise ValueError(f"side must be USERS (0) or ITEMS (1), got {side!r}")
    item_counts = np.asarray(item_counts)
    n_rows, n_fixed = rows.shape
    if side == USERS:
        if n_fixed != item_counts.size:
            raise ValueError(
                f"a user block has {n_fixed} item columns but there are {item_counts.size} items"
            )
        entry_items = rows.indices
    else:
        if row_items is None:
            row_items = np.arange(n_rows, dtype=np.int64)
        row_items = np.asarray(row_items, dtype=np.int64)
        if row_items.shape != (n_rows,):
            raise ValueError(f"row_items must have one item per row, got {row_items.shape}")
        if n_rows and (row_items.min() < 0 or row_items.max() >= item_counts.size):
            raise ValueError(f"row_items must lie in [0, {item_counts.size})")
        entry_items = np.repeat(row_items, rows.row_counts())
    weights = objective.observed_weights(config, item_counts)
    f = weights.f(entry_items, rows.values).astype(np.float32)
    t = objective.target(config, rows.values)
    targets = rows if t is rows.values else dataclasses.replace(rows, values=t)
    reg = objective.row_regularization(config, rows.row_counts(), n_fixed)
    return RowProblem(targets, f, reg, float(config.unobserved_weight))
