"""One definition of the WALS problem, for any block of whole rows of either side.

Every driver builds the least-squares problem of the rows it solves with `define_rows`: the
local trainer (once per side), the Beam trainer (once per block), fold-in of a new visitor, the
SavedModel export and the benchmarks. So f, the target and λ cannot disagree between them.

For a block of whole rows u of one side, solved against the fixed side's factors y_i:

    f_ui = a_i + α·max(r_ui, 0)            a, α from the *global* item counts c_i
                                           (`trainer.core.weights.item_terms`)
    t_ui = 1 under binary_target, else r_ui      the value fitted on an observed cell
    λ_u  = λ·(n_u + w0·N_fixed)^ν          n_u the row's observed count, N_fixed the size of
                                           the fixed side

and the row's solve (`trainer.core.solver`) minimises

    Σ_i w_ui (t_ui − x_u·y_i)² + λ_u‖x_u‖²,   w_ui = w0 + f_ui observed, w0 unobserved.

The loss of the whole model, in partial sums per block, is `trainer.core.loss`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from trainer.core import plans, tiling, weights
from trainer.core.config import WALSConfig
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

    def plan(
        self,
        solver: str,
        dtype=np.float32,
        chunk_rows: int = tiling.DEFAULT_CHUNK_ROWS,
        tile_shape: tiling.TileShape | None = None,
    ) -> plans.RowPlan:
        """The block laid out for `solver` (a name) by `trainer.core.plans.plan_rows`; a
        trainer that chose its solver uses `trainer.core.solver.Solver.plan` instead."""
        return plans.plan_rows(
            self.targets,
            self.f,
            self.reg,
            self.w0,
            solver=solver,
            dtype=dtype,
            chunk_rows=chunk_rows,
            tile_shape=tile_shape,
        )


def define_rows(
    rows: CsrMatrix,
    side: int,
    item_counts: np.ndarray,
    config: WALSConfig,
    row_items: np.ndarray | None = None,
) -> RowProblem:
    """The problem of a block of whole rows (formulas in the module docstring).

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
        The block's `RowProblem`.
    """
    if side not in SIDES:
        raise ValueError(f"side must be USERS (0) or ITEMS (1), got {side!r}")
    item_counts = np.asarray(item_counts)
    n_rows, n_fixed = rows.shape
    a, alpha = config.item_terms(item_counts)
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
    f = weights.entry_weights(entry_items, rows.values, a, alpha)
    targets = rows
    if config.binary_target:
        # Hu, Koren & Volinsky's preference: fit 1 on every observed cell; r only weighs it.
        targets = dataclasses.replace(rows, values=np.ones_like(rows.values))
    reg = config.row_regularization(rows.row_counts(), n_fixed)
    return RowProblem(targets, f, reg, float(config.unobserved_weight))


def define_history(
    items: np.ndarray, ratings: np.ndarray, item_counts: np.ndarray, config: WALSConfig
) -> RowProblem:
    """The problem of one new visitor's row (fold-in): distinct `items` with ratings r_ui."""
    items = np.asarray(items, dtype=np.int64).ravel()
    ratings = np.asarray(ratings, dtype=np.float32).ravel()
    if items.size != ratings.size:
        raise ValueError(f"items and ratings differ in length: {items.size}, {ratings.size}")
    n_items = np.asarray(item_counts).size
    if items.size and (items.min() < 0 or items.max() >= n_items):
        raise ValueError(f"item indices must lie in [0, {n_items})")
    if np.unique(items).size != items.size:
        raise ValueError("items must be distinct; aggregate repeated items first")
    order = np.argsort(items, kind="stable")
    row = CsrMatrix(
        np.array([0, items.size], dtype=np.int64), items[order], ratings[order], (1, n_items)
    )
    return define_rows(row, USERS, item_counts, config)
