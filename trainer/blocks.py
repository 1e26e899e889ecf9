"""Blocks of whole rows: the elements of the distributed trainer, in plain NumPy.

A side's rows (users, or items) are cut into blocks by a deterministic function of the row's
index, block = row // block_rows, so the layout depends only on the data and `block_rows`, never
on the runner or the number of workers. A block carries its rows' observed cells (complete rows:
`items_for_user` holds whole rows, `users_for_item` whole columns) and their current factors:

    users (block_rows = 2)             items (block_rows = 2)
    u0: i1 i3   ┐ user block 0          i0: u2      ┐ item block 0
    u1: i0 i2   ┘                       i1: u0 u3   ┘
    u2: i0      ┐ user block 1          i2: u1      ┐ item block 1
    u3: i1 i3   ┘                       i3: u0 u3   ┘

Solving user block 0 needs the item factors y1, y2, y3 (the columns it touches) and the
Gramian YᵀY; solving item block 1 needs x0, x1, x3 and XᵀX. Nothing else is shared.

Blocks are pickled between Beam stages, so they hold only NumPy arrays.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np

from trainer.sparse import CsrMatrix

DEFAULT_BLOCK_ROWS = 4096


def block_of(row: int | np.ndarray, block_rows: int) -> int | np.ndarray:
    """The block a row index belongs to: row // block_rows."""
    return row // block_rows


def block_bounds(block_id: int, block_rows: int, n_rows: int) -> tuple[int, int]:
    """[start, stop) of the rows of a block."""
    start = block_id * block_rows
    return start, min(start + block_rows, n_rows)


def num_blocks(n_rows: int, block_rows: int) -> int:
    return -(-n_rows // block_rows)


@dataclasses.dataclass(frozen=True)
class RowBlock:
    """A block of whole rows of one side, and their factors.

    Attributes:
        side: `trainer.problem.USERS` or `ITEMS`.
        block_id: the block's number; its rows are block_bounds(block_id, ...).
        row_ids: int64 [b], the global index of each row, ascending, every row of the block
            (rows without cells included, so that the factor table is complete).
        rows: [b, n_fixed] the rows' observed ratings r_ui; columns are global indices of the
            other side.
        factors: float32 [b, k], the rows' current factors (None before initialisation).
    """

    side: int
    block_id: int
    row_ids: np.ndarray
    rows: CsrMatrix
    factors: np.ndarray | None = None

    def with_factors(self, factors: np.ndarray) -> RowBlock:
        return dataclasses.replace(self, factors=np.asarray(factors, dtype=np.float32))


def assemble(
    side: int,
    block_id: int,
    records: list[tuple[int, np.ndarray, np.ndarray]],
    block_rows: int,
    shape: tuple[int, int],
) -> RowBlock:
    """A block from its rows' records, in any order.

    Args:
        side: USERS or ITEMS.
        block_id: the block.
        records: (row index, column indices int64 [n], ratings float32 [n]) of the block's rows
            that have cells; rows without a record are empty.
        block_rows: rows per block.
        shape: (n_rows, n_fixed) of the whole side.

    Raises:
        ValueError: a row outside the block, or a row twice.
    """
    start, stop = block_bounds(block_id, block_rows, shape[0])
    row_ids = np.arange(start, stop, dtype=np.int64)
    keys = np.array([key for key, _, _ in records], dtype=np.int64)
    if keys.size and (keys.min() < start or keys.max() >= stop):
        raise ValueError(
            f"block {block_id} got row {keys.min()}..{keys.max()} outside [{start}, {stop})"
        )
    if np.unique(keys).size != keys.size:
        raise ValueError(f"block {block_id}: a row appears in more than one record")
    lengths = np.array([len(indices) for _, indices, _ in records], dtype=np.int64)
    rows = np.repeat(keys - start, lengths)
    cols = np.concatenate(
        [np.asarray(i, np.int64) for _, i, _ in records] or [np.zeros(0, np.int64)]
    )
    vals = np.concatenate(
        [np.asarray(v, np.float32) for _, _, v in records] or [np.zeros(0, np.float32)]
    )
    matrix = CsrMatrix.from_triples(rows, cols, vals, (stop - start, shape[1]))
    if matrix.nnz != cols.size:
        raise ValueError(f"block {block_id}: a cell appears twice")
    return RowBlock(side, block_id, row_ids, matrix)


def to_bytes(row_ids: np.ndarray, factors: np.ndarray) -> bytes:
    """A block's factors as an .npz file's bytes (row_ids int64 [b], factors float32 [b, k])."""
    buffer = io.BytesIO()
    np.savez(buffer, row_ids=np.asarray(row_ids, np.int64), factors=np.asarray(factors, np.float32))
    return buffer.getvalue()


def from_bytes(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(row_ids, factors) from `to_bytes`; raises ValueError on anything else."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            row_ids, factors = archive["row_ids"], archive["factors"]
    except Exception as error:  # zipfile, KeyError, OSError...: all mean "not a checkpoint"
        raise ValueError(f"not a factor block ({type(error).__name__}: {error})") from None
    if row_ids.ndim != 1 or factors.ndim != 2 or factors.shape[0] != row_ids.size:
        raise ValueError(f"factor block of shapes {row_ids.shape} and {factors.shape}")
    return row_ids, factors
