"""How a block of rows is cut into tiles for the kernels: the rules alone, from row lengths.

NumPy only (no TensorFlow), so that a Beam worker or a planner can reason about shapes without
the kernels. `trainer.core.plans` fills the tiles with a block's entries; `trainer.core.kernels`
solves them.

A block of rows is sorted by length and cut into tiles of "lines": a line holds up to W
entries of one row, padded with the zero row appended to the fixed factors (f = 0, c = 0, so
padding adds exactly nothing to the normal equations). A row with at most `max_width` entries
takes one line of width W = the next power of two; a longer row takes ceil(n_u / max_width)
lines of width max_width, and a per-line row index folds the lines back into rows (rows with
more lines than a sub-tile holds share larger sub-tiles, packed first-fit decreasing; see
`_pack_longest`). For max_width = 4:

    row 0: items 3 7              tile W=2: lines [[3 7]]             line rows [0]
    row 1: items 2 4 5 6 8 9      tile W=4: lines [[2 4 5 6], [8 9 P P],
    row 2: items 1                                 [0 1 2 3], [5 P P P]]  line rows [0 0 1 1]
    row 3: items 0 1 2 3 5        tile W=1: lines [[1]]               line rows [0]

These tiles of lines are sub-tiles: sub-tiles of one shape are stacked T at a time into a tile,
arrays [T, B, W], and the CG kernel solves a tile in one call, looping over its sub-tiles (see
`trainer.core.kernels`). Tile shapes come from a small set (W a power of two, B and T fixed per
W), so the CG kernel is XLA-compiled once per shape and reused for every tile and iteration.
`tile_specs` states the whole layout of a block from its row lengths; both the plans
(`trainer.core.plans.plan_rows`) and the shapes a worker compiles ahead (`kernel_shapes`) are
derived from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

# The solver names of `WALSConfig.solver`, re-exported for the layout's callers.
from trainer.core.objective import CG, CHOLESKY, SOLVERS  # noqa: F401

# Rows sorted and tiled together; bounds the memory of building a plan.
DEFAULT_CHUNK_ROWS = 1 << 18
# A (sub-)tile smaller than a full one is padded to at least this fraction of it (see
# _group_rows and _stacks).
_MIN_TILE_FRACTION = 8
# Rows longer than one sub-tile are packed several to a sub-tile of this many times its lines
# (see _pack_longest); at most this many rows fit, as each has more lines than a sub-tile.
_LONG_BIN = 4


def validate_solver(solver: str, cg_steps: int = 3) -> None:
    """Raises ValueError unless `solver` is one of `SOLVERS` and `cg_steps` >= 1."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
    if int(cg_steps) != cg_steps or cg_steps < 1:
        raise ValueError(f"cg_steps must be a positive integer, got {cg_steps}")


@dataclasses.dataclass(frozen=True)
class TileShape:
    """Sizes of the tiles a plan is cut into.

    Attributes:
        max_width: W of the lines of rows longer than this; shorter rows get one line of width
            next_power_of_two(n_u). A power of two.
        tile_slots: about B · W padded entries per sub-tile.
        max_rows: at most this many rows per sub-tile (bounds the [rows, k, k] normal
            equations).
        stack_slots: about T · B · W entries per tile: up to this many slots of sub-tiles of
            one shape are stacked into one tile, which the CG kernel solves in one call, one
            sub-tile after the other (so that each sub-tile's gathered factors stay in cache
            across the CG steps). 0 stacks nothing (T = 1).
    """

    max_width: int
    tile_slots: int
    max_rows: int
    stack_slots: int = 0

    def __post_init__(self) -> None:
        if self.max_width < 1 or self.max_width & (self.max_width - 1):
            raise ValueError(f"max_width must be a power of two, got {self.max_width}")
        if self.tile_slots < 2 * self.max_width or self.max_rows < 1:
            raise ValueError("tile_slots must be >= 2 * max_width and max_rows >= 1")
        if self.stack_slots < 0:
            raise ValueError(f"stack_slots must be >= 0, got {self.stack_slots}")


# Measured on a 2-core AVX-512 CPU at k = 64 (benchmarks/solver_speed.py). CG reads the gathered
# [B, W, k] factors of a sub-tile 8 times, so its sub-tiles hold 4096 entries (1 MiB of float32
# factors, the size of the L2 cache) and 64 of them are stacked into one kernel call (a call
# costs about as much as solving a sub-tile). Its lines are 32 wide: wider lines waste more on
# each long row's last line, narrower ones add per-line work. The exact solver is bound by
# forming A, a [k, W] x [W, k] matmul per line, so it uses wider lines, one sub-tile per tile,
# and few rows per tile to bound the [rows, k, k] equations.
DEFAULT_TILES = {
    CG: TileShape(max_width=32, tile_slots=1 << 12, max_rows=1 << 12, stack_slots=1 << 18),
    CHOLESKY: TileShape(max_width=256, tile_slots=1 << 16, max_rows=1024),
}


def next_power_of_two(n: np.ndarray | int) -> np.ndarray:
    """The smallest power of two >= n, elementwise, for n >= 1."""
    n = np.asarray(n, dtype=np.int64)
    return np.left_shift(1, np.ceil(np.log2(n)).astype(np.int64))


def padded_fixed_length(m: int) -> int:
    """The length a fixed table of m rows is padded to: the next power of two >= m (1 for 0).

    The XLA-compiled kernels are specialised to their inputs' shapes, the fixed table's
    included. The Beam trainer's join exchange gives each solving block a table of only the
    rows its cells touch; padded to this length (zero rows after the first m, which no column
    indexes, so they change nothing), blocks share a few table lengths and so their compiles.
    """
    return 1 << max(int(m) - 1, 0).bit_length()


class SubTile(NamedTuple):
    """Which rows one sub-tile holds and its shape (before its entries are filled in).

    Attributes:
        rows: int [m], the block rows of the sub-tile, in order.
        n_lines: int [m], the lines of each row.
        width: W, entries per line.
        lines: B, lines of the sub-tile (padding included).
        n_rows: R, rows of the sub-tile (padding included).
    """

    rows: np.ndarray
    n_lines: np.ndarray
    width: int
    lines: int
    n_rows: int

    @property
    def multi_line(self) -> bool:
        """Whether some row of the sub-tile spans several lines."""
        return bool(int(self.n_lines.sum()) != self.rows.size)

    @property
    def key(self) -> tuple[int, int, int, bool]:
        """(W, B, R, multi_line): sub-tiles with equal keys stack into one tile."""
        return self.width, self.lines, self.n_rows, self.multi_line


class TileSpec(NamedTuple):
    """One tile: T sub-tiles of one key, the first len(parts) holding rows, the rest padding."""

    parts: list[SubTile]
    n_tiles: int

    @property
    def multi_line(self) -> bool:
        return self.parts[0].multi_line

    @property
    def kernel_shape(self) -> tuple[int, int, int, int, bool]:
        """(T, B, W, R, multi_line): the shape the kernels see (one CG compile each)."""
        width, lines, n_rows, multi_line = self.parts[0].key
        return self.n_tiles, lines, width, n_rows, multi_line


def tile_specs(lengths: np.ndarray, chunk_rows: int, tile_shape: TileShape) -> Iterator[TileSpec]:
    """The layout of a block: its tiles in order, from the rows' lengths alone.

    Rows are taken in chunks of `chunk_rows`; each chunk's non-empty rows are sorted by
    descending length (ties by row), cut into sub-tiles (`_group_rows`) and stacked into
    tiles (`_stacks`). Every non-empty row is in exactly one tile.

    Args:
        lengths: int [n_rows], the entries of each row.
        chunk_rows: rows sorted and tiled together.
        tile_shape: the tile sizes.
    """
    lengths = np.asarray(lengths, np.int64)
    for chunk_start in range(0, lengths.size, chunk_rows):
        chunk_lengths = lengths[chunk_start : chunk_start + chunk_rows]
        order = np.argsort(-chunk_lengths, kind="stable")
        order = order[chunk_lengths[order] > 0] + chunk_start
        parts = _group_rows(order, lengths[order], tile_shape)
        keys = [part.key for part in parts]
        for first, count, n_tiles in _stacks(keys, tile_shape):
            yield TileSpec(parts[first : first + count], n_tiles)


def kernel_shapes(
    lengths: np.ndarray,
    solver: str = CG,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    tile_shape: TileShape | None = None,
) -> frozenset[tuple[int, int, int, int, bool]]:
    """The (T, B, W, R, multi_line) of the tiles `plan_rows` lays rows of these lengths out in
    (`RowPlan.kernel_shapes`), from the lengths alone (`tile_specs`), without the entries.

    Args:
        lengths: int [n_rows], the number of entries of each row.
        solver: the solver the plan is for; picks the default tile shape.
        chunk_rows, tile_shape: as for `trainer.core.plans.plan_rows`.
    """
    tile_shape = tile_shape or DEFAULT_TILES[solver]
    return frozenset(spec.kernel_shape for spec in tile_specs(lengths, chunk_rows, tile_shape))


def _group_rows(rows: np.ndarray, lengths: np.ndarray, shape: TileShape) -> list[SubTile]:
    """Cuts rows sorted by descending length into sub-tiles.

    Args:
        rows: int [m], block rows sorted by descending length, all non-empty.
        lengths: int [m], their lengths.
        shape: the tile sizes.

    Returns:
        The sub-tiles. Groups with at least one full sub-tile pad their last sub-tile to the
        full size (so large blocks use few shapes); groups smaller than one sub-tile round B and
        R up to powers of two, and to at least 1/_MIN_TILE_FRACTION of a full sub-tile, so that
        every width has at most log2(_MIN_TILE_FRACTION) + 1 shapes however many blocks are
        planned (each shape is one XLA compile per process).
    """
    wide = shape.max_width
    tiles = []
    short = lengths <= wide
    widths = next_power_of_two(lengths[short])
    for width in np.unique(widths)[::-1]:
        members = rows[short][widths == width]
        capacity = max(1, min(shape.tile_slots // int(width), shape.max_rows))
        for start in range(0, members.size, capacity):
            part = members[start : start + capacity]
            size = capacity
            if members.size < capacity:
                size = max(int(next_power_of_two(part.size)), capacity // _MIN_TILE_FRACTION, 1)
            tiles.append(SubTile(part, np.ones(part.size, np.int64), int(width), size, size))
    long_rows = rows[~short]
    if long_rows.size:
        n_lines = -(-lengths[~short] // wide)
        line_cap = shape.tile_slots // wide
        row_cap = max(1, min(line_cap // 2, shape.max_rows))
        longest = n_lines > line_cap
        tiles.extend(_pack_longest(long_rows[longest], n_lines[longest], wide, line_cap))
        long_rows, n_lines = long_rows[~longest], n_lines[~longest]
        full = n_lines.sum() >= line_cap
        start = 0
        while start < long_rows.size:
            stop = start
            used = 0
            while (
                stop < long_rows.size
                and stop - start < row_cap
                and used + n_lines[stop] <= line_cap
            ):
                used += n_lines[stop]
                stop += 1
            if full:
                size, n_tile_rows = line_cap, row_cap
            else:
                size = max(int(next_power_of_two(used)), line_cap // _MIN_TILE_FRACTION, 1)
                n_tile_rows = max(
                    int(next_power_of_two(stop - start)), row_cap // _MIN_TILE_FRACTION, 1
                )
            tiles.append(
                SubTile(long_rows[start:stop], n_lines[start:stop], wide, size, n_tile_rows)
            )
            start = stop
    return tiles


def _step_up(n: int, base: int) -> int:
    """The smallest of base · (1, 1.5, 2, 3, 4, 6, 8, ...) that is >= n (base >= 2)."""
    size = base
    while True:
        if size >= n:
            return size
        if size * 3 // 2 >= n:
            return size * 3 // 2
        size *= 2


def _pack_longest(
    rows: np.ndarray, n_lines: np.ndarray, width: int, line_cap: int
) -> list[SubTile]:
    """Sub-tiles of the rows longer than one sub-tile (more than line_cap lines of `width`).

    Rows of up to _LONG_BIN · line_cap lines are packed first-fit decreasing into sub-tiles of
    that many lines and _LONG_BIN rows (each row has more than line_cap lines, so fewer fit);
    only the last, least filled, sub-tile shrinks, to a 1.5x step above line_cap. A longer row
    gets a sub-tile of its own, of a 1.5x step above that size. Padding a row to the next
    power of two instead wastes a quarter of its slots on average.

    Args:
        rows: int [m], rows sorted by descending length.
        n_lines: int [m], their lines, each > line_cap.
        width: W.
        line_cap: lines of a full ordinary sub-tile.
    """
    bin_lines = _LONG_BIN * line_cap
    tiles = []
    bins: list[list[int]] = []  # row positions of each open sub-tile
    used: list[int] = []
    for position, lines in enumerate(n_lines.tolist()):
        if lines > bin_lines:
            size = _step_up(lines, bin_lines)
            one = slice(position, position + 1)
            tiles.append(SubTile(rows[one], n_lines[one], width, size, 1))
            continue
        for slot, members in enumerate(bins):
            if used[slot] + lines <= bin_lines and len(members) < _LONG_BIN:
                members.append(position)
                used[slot] += lines
                break
        else:
            bins.append([position])
            used.append(lines)
    for slot, members in enumerate(bins):
        size = bin_lines if slot < len(bins) - 1 else _step_up(used[slot], line_cap)
        tiles.append(
            SubTile(rows[members], n_lines[members], width, min(size, bin_lines), _LONG_BIN)
        )
    return tiles


def _stacks(keys: list[tuple[int, int, int, bool]], shape: TileShape) -> list[tuple[int, int, int]]:
    """How runs of sub-tiles of one shape stack into tiles: (first, count, T) per tile.

    `keys` are the sub-tiles' (W, B, R, multi_line), in order. A sub-tile shape stacks into
    tiles of two sizes only, T = the full capacity (about stack_slots / (B · W)) or T =
    1/_MIN_TILE_FRACTION of it, whatever the block: each tile shape is one XLA compile per
    process, and a worker of the distributed trainer that meets a new block then finds its
    shapes compiled. A run fills full tiles; what is left goes into one more full tile if it
    fills more than half of one, else into small tiles. Padding sub-tiles are skipped, not
    solved.
    """
    stacks = []
    start = 0
    while start < len(keys):
        stop = start + 1
        while stop < len(keys) and keys[stop] == keys[start]:
            stop += 1
        width, size = keys[start][0], keys[start][1]
        capacity = max(1, shape.stack_slots // (size * width))
        small = max(1, capacity // _MIN_TILE_FRACTION)
        first = start
        while first < stop:
            left = stop - first
            n_tiles = capacity if 2 * left > capacity else small
            stacks.append((first, min(n_tiles, left), n_tiles))
            first += min(n_tiles, left)
        start = stop
    return stacks
