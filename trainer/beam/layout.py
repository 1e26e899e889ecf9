"""Blocks of whole rows: the elements of the distributed trainer, in plain NumPy.

A side's rows (users, or items) are dealt into blocks by a deterministic function of the row's
index, block = row mod B with B = ceil(n_rows / block_rows) (`BlockLayout`), so the layout
depends only on the data and `block_rows`, never on the runner or the number of workers. A block
holds its rows' observed cells (complete rows: `items_for_user` holds whole rows,
`users_for_item` whole columns; `RowBlock`), read once per run, and their current factors
(checkpoint files named by a `FactorRef`), which are what moves between sweeps:

    users (block_rows = 2, B = 2)       items (block_rows = 2, B = 2)
    u0: i1 i3   → user block 0          i0: u1 u2   → item block 0
    u1: i0 i2   → user block 1          i1: u0 u3   → item block 1
    u2: i0      → user block 0          i2: u1      → item block 0
    u3: i1 i3   → user block 1          i3: u0 u3   → item block 1

Solving user block 0 (u0, u2) needs the item factors y0, y1, y3 (the columns it touches) and
the Gramian YᵀY; solving item block 0 (i0, i2) needs x1, x2 and XᵀX. Nothing else is shared.

Blocks are pickled between Beam stages, so they hold only NumPy arrays.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np

from trainer.core.sides import Side
from trainer.core.sparse import CsrMatrix

# Rows per block of evaluation and batch prediction: a block's scores are [rows, n_items].
DEFAULT_BLOCK_ROWS = 4096
# Rows per block of the distributed trainer. The solver pads each block's tiles on its own, so
# small blocks waste work: on the 100K x 20K benchmark matrix the user half-sweep's solves take
# 2.5x the whole side's time in blocks of 4,096 rows and 1.5x in blocks of 16,384. 16,384 rows
# is still thousands of blocks per side at Dataflow scale (50M users: 3,052).
DEFAULT_TRAIN_BLOCK_ROWS = 16384


def contiguous_block_of(row: int | np.ndarray, block_rows: int) -> int | np.ndarray:
    """The contiguous block a row index belongs to: row // block_rows (evaluation and
    prediction, whose per-row cost does not depend on the row). The trainer's blocks are
    interleaved instead: `BlockLayout.block_of`."""
    return row // block_rows


def block_bounds(block_id: int, block_rows: int, n_rows: int) -> tuple[int, int]:
    """[start, stop) of the rows of a contiguous block."""
    start = block_id * block_rows
    return start, min(start + block_rows, n_rows)


def num_blocks(n_rows: int, block_rows: int) -> int:
    return -(-n_rows // block_rows)


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """How one side's rows are dealt into blocks.

    Interleaved (the trainer's): row r goes to block r mod B, B = ceil(n_rows / block_rows).
    Vocabularies are sorted by frequency, so contiguous blocks would put every popular row in
    block 0, a straggler with most of the cells; dealing the rows out round-robin gives every
    block a fair share of popular and rare rows. Contiguous (interleaved=False): row r goes to
    block r // block_rows.
    """

    n_rows: int
    block_rows: int
    interleaved: bool = True

    def __post_init__(self) -> None:
        if self.block_rows < 1 or self.n_rows < 0:
            raise ValueError(f"bad layout: {self.n_rows} rows in blocks of {self.block_rows}")

    @property
    def n_blocks(self) -> int:
        return num_blocks(self.n_rows, self.block_rows)

    def block_of(self, rows: int | np.ndarray) -> int | np.ndarray:
        """The block of each row under this layout: rows mod B interleaved, rows // block_rows
        contiguous (as `contiguous_block_of`)."""
        return rows % self.n_blocks if self.interleaved else rows // self.block_rows

    def position(self, rows: int | np.ndarray) -> int | np.ndarray:
        """Each row's position within its block."""
        return rows // self.n_blocks if self.interleaved else rows % self.block_rows

    def rows_of(self, block_id: int) -> np.ndarray:
        """int64 [b], the rows of a block, ascending."""
        if self.interleaved:
            return np.arange(block_id, self.n_rows, self.n_blocks, dtype=np.int64)
        start, stop = block_bounds(block_id, self.block_rows, self.n_rows)
        return np.arange(start, stop, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class RowBlock:
    """A block of whole rows of one side: their observed ratings.

    Read once per run; the sweeps then move only factors (`FactorRef`; a worker keeps the
    block's problem, or reads the rows back from the checkpoint directory).

    Attributes:
        side: a `trainer.core.sides.Side`, USERS or ITEMS.
        block_id: the block's number; its rows are its layout's rows_of(block_id).
        row_ids: int64 [b], the global index of each row, ascending, every row of the block
            (rows without cells included, so that the factor table is complete).
        rows: [b, n_fixed] the rows' observed ratings r_ui; columns are global indices of the
            other side.
    """

    side: Side
    block_id: int
    row_ids: np.ndarray
    rows: CsrMatrix


@dataclasses.dataclass(frozen=True)
class FactorRef:
    """What moves between sweeps: where a block's current factors are, not the factors.

    Every half-sweep writes each block's factors to a checkpoint file anyway
    (`trainer.beam.checkpoint_files.write_factor_block`), so the factors travel through those
    files and Beam carries only this reference: no stage ships factor tables through the
    runner's data plane or shuffle. The reader checks the file against the SHA-256 in `entry`.

    Attributes:
        side: a `trainer.core.sides.Side`, USERS or ITEMS.
        block_id: the block's number.
        iteration: the iteration the factors belong to (0: the initial factors).
        entry: the block file's entry in its half-sweep's marker, {block, file, bytes,
            sha256}.
        gramian: float64 [k, k], F_bᵀ F_b of the block's factors F_b: its term of the side's
            Gramian G = Σ_b F_bᵀ F_b.
    """

    side: Side
    block_id: int
    iteration: int
    entry: dict
    gramian: np.ndarray


def assemble(
    side: Side,
    block_id: int,
    sparse_rows: list[tuple[int, np.ndarray, np.ndarray]],
    layout: BlockLayout,
    n_fixed: int,
) -> RowBlock:
    """A block from its sparse rows, in any order.

    Args:
        side: USERS or ITEMS.
        block_id: the block.
        sparse_rows: (row index, column indices int64 [n], ratings float32 [n]) of the block's rows
            that have cells; rows not among them are empty.
        layout: how the side's rows are dealt into blocks.
        n_fixed: the number of columns (rows of the other side).

    Raises:
        ValueError: a row outside the block, or a row twice.
    """
    row_ids = layout.rows_of(block_id)
    keys = np.array([key for key, _, _ in sparse_rows], dtype=np.int64)
    if keys.size and np.any(layout.block_of(keys) != block_id):
        raise ValueError(f"block {block_id} got rows of other blocks")
    if np.unique(keys).size != keys.size:
        raise ValueError(f"block {block_id}: a row appears twice")
    lengths = np.array([len(indices) for _, indices, _ in sparse_rows], dtype=np.int64)
    rows = np.repeat(np.asarray(layout.position(keys), dtype=np.int64), lengths)
    empty_cols, empty_vals = np.zeros(0, np.int64), np.zeros(0, np.float32)
    cols = np.concatenate([np.asarray(i, np.int64) for _, i, _ in sparse_rows] or [empty_cols])
    vals = np.concatenate([np.asarray(v, np.float32) for _, _, v in sparse_rows] or [empty_vals])
    matrix = CsrMatrix.from_triples(rows, cols, vals, (row_ids.size, n_fixed))
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
