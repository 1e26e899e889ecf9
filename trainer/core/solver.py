"""The WALS math: per-row least-squares solves, the Gramian and the loss, as TensorFlow kernels.

Both the local trainer (`trainer.local.train`) and the distributed trainer call these functions. Apart
from a `RowPlan` (the padded layout of a block of rows, built once per matrix) they hold no
state.

The model minimises, over the full n_users x n_items matrix,

    L = Σ_(u,i) w_ui (r_ui − x_u·y_i)² + Σ_u λ_u ‖x_u‖² + Σ_i λ_i ‖y_i‖²,

with w_ui = w0 and r_ui = 0 for unobserved cells and w_ui = w0 + f_ui for observed ones (see
`trainer.core.weights`). With the item factors Y (n_items x k) fixed, row u's optimum solves

    A_u x_u = b_u,    A_u = w0·G + Σ_(i∈obs(u)) f_ui y_i y_iᵀ + λ_u I,
                      b_u = Σ_(i∈obs(u)) (w0 + f_ui) r_ui y_i,      G = YᵀY,

so each solve touches only the row's observed items (the "Gramian trick"). The column sweep is
the same call on the transposed matrix with X fixed.

Two solvers, chosen once per fit:
    "cholesky"  solves exactly. It forms A_u ([k, k]) with batched matmuls and factorises it.
                Short rows (one line of width W <= k/2, see below) instead use the Woodbury
                identity in the eigenbasis of G (G = Q Λ Qᵀ, computed once per call), which
                only factorises a [W, W] matrix (when every λ_u > 0):
                    Z = Y_u Q,  U = diag(√f) Z,  v = Zᵀ c,  D = w0·Λ + λ_u I,
                    S = I + U D⁻¹ Uᵀ,  z = D⁻¹ (v − Uᵀ S⁻¹ U D⁻¹ v),  x_u = Q z,
                since A_u = Q (D + UᵀU) Qᵀ and b_u = Q v (c_i = (w0 + f_ui) r_ui).
    "cg"        runs a few conjugate-gradient steps warm-started from the current factors, as in
                implicit's CG. It never forms A_u; it only needs
                A_u·p = w0·G·p + Σ_i f_ui y_i (y_i·p) + λ_u p.
Rows without observations have b_u = 0 and A_u positive definite, so x_u = 0; they skip both.

Layout. A block of rows is sorted by length and cut into tiles of "lines": a line holds up to W
entries of one row, padded with the zero row appended to the fixed factors (f = 0, r = 0, so
padding adds exactly nothing). A row with at most `max_width` entries takes one line of width
W = the next power of two; a longer row takes ceil(n_u / max_width) lines of width max_width,
and a per-line row index folds the lines back into rows (rows with more lines than a
sub-tile holds share larger sub-tiles, packed first-fit decreasing; see `_pack_longest`).
For max_width = 4:

    row 0: items 3 7              tile W=2: lines [[3 7]]             line rows [0]
    row 1: items 2 4 5 6 8 9      tile W=4: lines [[2 4 5 6], [8 9 P P],
    row 2: items 1                                 [0 1 2 3], [5 P P P]]  line rows [0 0 1 1]
    row 3: items 0 1 2 3 5        tile W=1: lines [[1]]               line rows [0]

These tiles of lines are sub-tiles: sub-tiles of one shape are stacked T at a time into a tile,
arrays [T, B, W], and the CG kernel solves a tile in one call, looping over its sub-tiles: it
gathers one sub-tile's factors into [B, W, k] (sized to stay in the L2 cache), runs every CG
step on its rows with batched matmuls, and moves on. So the gathered factors are read from
cache by the steps, and a call (whose fixed cost is about that of solving one sub-tile) is paid
once per T sub-tiles. The exact solver takes one sub-tile per tile. Two tiles are in flight at
a time. Tile shapes come from a small set (W a power of two, B and T fixed per W), so the CG
kernel is XLA-compiled once per shape and reused for every tile and iteration.

All kernels are plain TensorFlow ops without device placement: they run on a GPU when one is
visible and on the CPU otherwise.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os

import numpy as np
import tensorflow as tf

from trainer.core.objective import CG, CHOLESKY, SOLVERS  # noqa: F401  (re-exported)
from trainer.core.sparse import CsrMatrix

logger = logging.getLogger(__name__)

# XLA's CPU backend optimises with LLVM at level 3 by default. Level 2 compiles the CG kernels
# faster and runs them faster: on the large benchmark (2 AVX-512 cores, k = 64) a CG iteration
# took 0.37 s against 0.51 s, with the same loss (benchmarks/solver_speed.py), and an item
# block compiled in 2.8 s against 3.1 s. A level given in XLA_FLAGS is left as it is.
XLA_OPTIMIZATION_LEVEL = 2


def _set_xla_optimization_level() -> None:
    """Adds --xla_backend_optimization_level to XLA_FLAGS, unless it is set already. XLA reads
    the variable when it first compiles, so importing this module is early enough, in the
    trainer's process and in every Beam worker that unpickles a solve."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        option = f"--xla_backend_optimization_level={XLA_OPTIMIZATION_LEVEL}"
        os.environ["XLA_FLAGS"] = f"{flags} {option}".strip()


_set_xla_optimization_level()

# Rows sorted and tiled together; bounds the memory of building a plan.
DEFAULT_CHUNK_ROWS = 1 << 18
# Entries per step when computing the loss.
_LOSS_CHUNK = 1 << 20
# Tiles solved concurrently by default. On 2 cores one CG tile at a time takes 1.4 times as long
# as two (its small ops run on one thread). Each tile's result does not depend on
# this; pass `tiles_in_flight` to `solve_planned` on larger machines.
DEFAULT_TILES_IN_FLIGHT = 2
# A (sub-)tile smaller than a full one is padded to at least this fraction of it (see
# _group_rows and _stacks).
_MIN_TILE_FRACTION = 8
# Rows longer than one sub-tile are packed several to a sub-tile of this many times its lines
# (see _pack_longest); at most this many rows fit, as each has more lines than a sub-tile.
_LONG_BIN = 4
# CG kernels with at most this many steps are unrolled; longer ones loop.
_MAX_UNROLLED_CG_STEPS = 8

FloatArray = np.ndarray | tf.Tensor


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


def validate_solver(solver: str, cg_steps: int = 3) -> None:
    """Raises ValueError unless `solver` is one of `SOLVERS` and `cg_steps` >= 1."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
    if int(cg_steps) != cg_steps or cg_steps < 1:
        raise ValueError(f"cg_steps must be a positive integer, got {cg_steps}")


def _as_tensor(value: FloatArray, dtype: tf.DType) -> tf.Tensor:
    """`value` as a tensor of `dtype`, casting NumPy arrays and tensors of other float types."""
    return tf.cast(tf.convert_to_tensor(value), dtype)


def gramian(factors: FloatArray, dtype: tf.DType = tf.float32) -> tf.Tensor:
    """G = FᵀF.

    Args:
        factors: [n, k] factor matrix F.
        dtype: computation dtype.

    Returns:
        [k, k] tensor of `dtype`, G_ab = Σ_n F_na F_nb.
    """
    factors = _as_tensor(factors, dtype)
    return tf.matmul(factors, factors, transpose_a=True)


# Attributes a Tile computes on first use and does not pickle.
_CACHED = ("_tensors", "_flat")


@dataclasses.dataclass(frozen=True)
class Tile:
    """T sub-tiles of one shape, each B lines of width W holding the entries of R rows.

    NumPy arrays only, so that a plan pickles (a Beam worker can build or receive one); the
    kernels turn them into tensors the first time they run and keep those (not pickled).
    Sub-tiles `count` to T - 1 are padding: no rows, skipped by the CG kernel.

    Attributes:
        rows: int32 [T, R], the block row of each sub-tile row; n_rows for padding rows.
        cols: int32 [T, B, W], the column of each entry; n_other (the zero row) on padding.
        f: [T, B, W], f_ui of each entry, 0 on padding.
        c: [T, B, W], (w0 + f_ui) · r_ui of each entry, 0 on padding.
        line_rows: int32 [T, B], the sub-tile row (in [0, R)) each line belongs to.
        reg: [T, R], λ_u of each sub-tile row; 1 on padding rows so that their A stays
            invertible.
        multi_line: whether some row spans several lines (else line j is sub-tile row j).
        count: the sub-tiles holding rows, the first `count` of the T.
    """

    rows: np.ndarray
    cols: np.ndarray
    f: np.ndarray
    c: np.ndarray
    line_rows: np.ndarray
    reg: np.ndarray
    multi_line: bool
    count: int

    def __getstate__(self) -> dict:
        """Pickles the arrays only, not the cached tensors."""
        return {name: value for name, value in self.__dict__.items() if name not in _CACHED}

    def _cached(self, name: str, make):
        """self.<name>, made once by make() (two threads may both make it; either wins)."""
        value = self.__dict__.get(name)
        if value is None:
            value = make()
            object.__setattr__(self, name, value)
        return value

    def tensors(self) -> dict[str, tf.Tensor]:
        """The arrays as tensors, converted on first use and kept."""
        names = ("rows", "cols", "f", "c", "line_rows", "reg")
        return self._cached(
            "_tensors", lambda: {name: tf.convert_to_tensor(getattr(self, name)) for name in names}
        )

    def flat(self) -> Tile:
        """The same entries as one sub-tile (T = 1) of T · B lines and T · R rows; kept."""
        return self._cached("_flat", self._flatten)

    def _flatten(self) -> Tile:
        n_tiles, n_lines, width = self.cols.shape
        n_rows = self.reg.shape[1]
        offsets = (np.arange(n_tiles, dtype=np.int32) * n_rows)[:, None]
        return Tile(
            rows=self.rows.reshape(1, -1),
            cols=self.cols.reshape(1, n_tiles * n_lines, width),
            f=self.f.reshape(1, n_tiles * n_lines, width),
            c=self.c.reshape(1, n_tiles * n_lines, width),
            line_rows=(self.line_rows + offsets).reshape(1, -1),
            reg=self.reg.reshape(1, -1),
            multi_line=self.multi_line or n_lines != n_rows,
            count=1,
        )


@dataclasses.dataclass(frozen=True)
class RowPlan:
    """A block of rows laid out for `solve_planned`; build it with `plan_rows`.

    The layout depends only on the matrix, f, λ and w0, so a trainer builds one plan per side
    and reuses it in every iteration.

    Attributes:
        shape: (n_rows, n_other) of the block; its columns index the fixed factors.
        w0: the unobserved weight folded into the tiles' `c`.
        dtype: the float dtype of the kernels.
        tiles: every non-empty row is in exactly one tile.
        gather_index: int32 NumPy [n_rows]; row u's solution is row gather_index[u] of the tiles'
            outputs concatenated in order, followed by one zero row (for empty rows).
        nnz: the block's number of entries.
        min_reg: the smallest λ_u of a non-empty row (inf without any); the Woodbury path
            needs λ_u > 0.
    """

    shape: tuple[int, int]
    w0: float
    dtype: tf.DType
    tiles: tuple[Tile, ...]
    gather_index: np.ndarray
    nnz: int
    min_reg: float

    @property
    def padded_slots(self) -> int:
        """Σ over tiles of T · B · W: stored entries, padding included (the plan's size)."""
        return int(sum(tile.cols.size for tile in self.tiles))

    @property
    def solved_slots(self) -> int:
        """Σ over tiles of count · B · W: entries the kernels gather, padding included."""
        return int(sum(tile.count * tile.cols[0].size for tile in self.tiles))

    @property
    def tile_shapes(self) -> set[tuple[int, int, int, int]]:
        """The distinct (T, B, W, R) of the tiles (`kernel_shapes` without multi_line)."""
        return {shape[:4] for shape in self.kernel_shapes}

    @property
    def kernel_shapes(self) -> frozenset[tuple[int, int, int, int, bool]]:
        """The distinct (T, B, W, R, multi_line) of the tiles: one CG kernel compile each."""
        return frozenset(
            (*tile.cols.shape, int(tile.reg.shape[1]), tile.multi_line) for tile in self.tiles
        )


def _next_power_of_two(n: np.ndarray | int) -> np.ndarray:
    """The smallest power of two >= n, elementwise, for n >= 1."""
    n = np.asarray(n, dtype=np.int64)
    return np.left_shift(1, np.ceil(np.log2(n)).astype(np.int64))


def _group_rows(
    rows: np.ndarray, lengths: np.ndarray, shape: TileShape
) -> list[tuple[np.ndarray, np.ndarray, int, int, int]]:
    """Cuts rows sorted by descending length into tiles.

    Args:
        rows: int [m], block rows sorted by descending length, all non-empty.
        lengths: int [m], their lengths.
        shape: the tile sizes.

    Returns:
        A list of (rows, lines per row, W, B, R) per tile. Groups with at least one full tile
        pad their last tile to the full size (so large blocks use few shapes); groups smaller
        than one tile round B and R up to powers of two, and to at least 1/_MIN_TILE_FRACTION
        of a full tile, so that every width has at most log2(_MIN_TILE_FRACTION) + 1 shapes
        however many blocks are planned (each shape is one XLA compile per process).
    """
    wide = shape.max_width
    tiles = []
    short = lengths <= wide
    widths = _next_power_of_two(lengths[short])
    for width in np.unique(widths)[::-1]:
        members = rows[short][widths == width]
        capacity = max(1, min(shape.tile_slots // int(width), shape.max_rows))
        for start in range(0, members.size, capacity):
            part = members[start : start + capacity]
            size = capacity
            if members.size < capacity:
                size = max(int(_next_power_of_two(part.size)), capacity // _MIN_TILE_FRACTION, 1)
            tiles.append((part, np.ones(part.size, np.int64), int(width), size, size))
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
                size = max(int(_next_power_of_two(used)), line_cap // _MIN_TILE_FRACTION, 1)
                n_tile_rows = max(
                    int(_next_power_of_two(stop - start)), row_cap // _MIN_TILE_FRACTION, 1
                )
            tiles.append((long_rows[start:stop], n_lines[start:stop], wide, size, n_tile_rows))
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
) -> list[tuple[np.ndarray, np.ndarray, int, int, int]]:
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

    Returns:
        (rows, lines per row, W, B, R) per sub-tile, as `_group_rows`.
    """
    bin_lines = _LONG_BIN * line_cap
    tiles = []
    bins: list[list[int]] = []  # row positions of each open sub-tile
    used: list[int] = []
    for position, lines in enumerate(n_lines.tolist()):
        if lines > bin_lines:
            size = _step_up(lines, bin_lines)
            one = slice(position, position + 1)
            tiles.append((rows[one], n_lines[one], width, size, 1))
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
        tiles.append((rows[members], n_lines[members], width, min(size, bin_lines), _LONG_BIN))
    return tiles


def _is_multi_line(part: tuple[np.ndarray, np.ndarray, int, int, int]) -> bool:
    """Whether some row of a sub-tile spec (from `_group_rows`) spans several lines."""
    members, n_lines = part[0], part[1]
    return bool(int(n_lines.sum()) != members.size)


def _build_tile(
    rows: CsrMatrix,
    f: np.ndarray,
    c: np.ndarray,
    reg: np.ndarray,
    parts: list[tuple[np.ndarray, np.ndarray, int, int, int]],
    n_tiles: int,
    multi_line: bool,
) -> Tile:
    """Builds a tile of T = n_tiles sub-tiles of one shape from `_group_rows` specs, in one pass.

    Sub-tile t holds the rows of parts[t] (t < len(parts)); sub-tiles from len(parts) on are
    padding. f, c and reg already have the kernels' dtype.
    """
    n_rows, n_other = rows.shape
    width, size, n_tile_rows = parts[0][2], parts[0][3], parts[0][4]
    members = np.concatenate([part[0] for part in parts])
    n_lines = np.concatenate([part[1] for part in parts]).astype(np.int64, copy=False)
    rows_per_part = np.array([part[0].size for part in parts], dtype=np.int64)
    lines_per_part = np.array([int(part[1].sum()) for part in parts], dtype=np.int64)
    part_of_row = np.repeat(np.arange(len(parts), dtype=np.int64), rows_per_part)
    # Each row's place in its sub-tile, and each line's row, place in its row and in its sub-tile.
    row_in_part = (
        np.arange(members.size, dtype=np.int64)
        - (np.cumsum(rows_per_part) - rows_per_part)[part_of_row]
    )
    line_row = np.repeat(np.arange(members.size, dtype=np.int64), n_lines)
    line_in_row = (
        np.arange(line_row.size, dtype=np.int64) - (np.cumsum(n_lines) - n_lines)[line_row]
    )
    part_of_line = part_of_row[line_row]
    line_in_part = (
        np.arange(line_row.size, dtype=np.int64)
        - (np.cumsum(lines_per_part) - lines_per_part)[part_of_line]
    )
    start = rows.indptr[members][line_row] + line_in_row * width
    stop = rows.indptr[members + 1][line_row]
    position = start[:, None] + np.arange(width, dtype=np.int64)[None, :]
    mask = position < stop[:, None]
    position = np.where(mask, position, 0)

    cols = np.full((n_tiles, size, width), n_other, dtype=np.int32)
    cols[part_of_line, line_in_part] = np.where(mask, rows.indices[position], n_other)
    tile_f = np.zeros((n_tiles, size, width), dtype=f.dtype)
    tile_f[part_of_line, line_in_part] = np.where(mask, f[position], 0)
    tile_c = np.zeros((n_tiles, size, width), dtype=c.dtype)
    tile_c[part_of_line, line_in_part] = np.where(mask, c[position], 0)
    # Padding lines hold no entries, so they may point at any sub-tile row: use row 0.
    line_rows = np.zeros((n_tiles, size), dtype=np.int32)
    line_rows[part_of_line, line_in_part] = row_in_part[line_row]
    tile_rows = np.full((n_tiles, n_tile_rows), n_rows, dtype=np.int32)
    tile_rows[part_of_row, row_in_part] = members
    tile_reg = np.ones((n_tiles, n_tile_rows), dtype=reg.dtype)
    tile_reg[part_of_row, row_in_part] = reg[members]
    return Tile(
        rows=tile_rows,
        cols=cols,
        f=tile_f,
        c=tile_c,
        line_rows=line_rows,
        reg=tile_reg,
        multi_line=multi_line,
        count=len(parts),
    )


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


def _sub_tile_key(part: tuple[np.ndarray, np.ndarray, int, int, int]) -> tuple[int, int, int, bool]:
    """(W, B, R, multi_line) of a `_group_rows` sub-tile spec."""
    return part[2], part[3], part[4], _is_multi_line(part)


def _build_tiles(
    rows: CsrMatrix,
    f: np.ndarray,
    c: np.ndarray,
    reg: np.ndarray,
    parts: list[tuple[np.ndarray, np.ndarray, int, int, int]],
    shape: TileShape,
) -> list[Tile]:
    """The tiles of `_stacks` over the sub-tile specs of `_group_rows`."""
    keys = [_sub_tile_key(part) for part in parts]
    return [
        _build_tile(rows, f, c, reg, parts[first : first + count], n_tiles, keys[first][3])
        for first, count, n_tiles in _stacks(keys, shape)
    ]


def _chunk_parts(lengths: np.ndarray, chunk_rows: int, tile_shape: TileShape):
    """The `_group_rows` sub-tile specs of each chunk of `chunk_rows` rows, chunk by chunk."""
    for chunk_start in range(0, lengths.size, chunk_rows):
        chunk_lengths = lengths[chunk_start : chunk_start + chunk_rows]
        order = np.argsort(-chunk_lengths, kind="stable")
        order = order[chunk_lengths[order] > 0] + chunk_start
        yield _group_rows(order, lengths[order], tile_shape)


def kernel_shapes(
    lengths: np.ndarray,
    solver: str = CG,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    tile_shape: TileShape | None = None,
) -> frozenset[tuple[int, int, int, int, bool]]:
    """The (T, B, W, R, multi_line) of the tiles `plan_rows` lays rows of these lengths out in
    (`RowPlan.kernel_shapes`), from the lengths alone, without building the tiles.

    Args:
        lengths: int [n_rows], the number of entries of each row.
        solver, chunk_rows, tile_shape: as for `plan_rows`.
    """
    tile_shape = tile_shape or DEFAULT_TILES[solver]
    shapes = set()
    for parts in _chunk_parts(np.asarray(lengths, np.int64), chunk_rows, tile_shape):
        keys = [_sub_tile_key(part) for part in parts]
        for first, _, n_tiles in _stacks(keys, tile_shape):
            width, size, n_rows, multi_line = keys[first]
            shapes.add((n_tiles, size, width, n_rows, multi_line))
    return frozenset(shapes)


def warm_up(
    shapes,
    n_other: int,
    k: int,
    dtype: tf.DType = tf.float32,
    cg_steps: int = 3,
) -> None:
    """XLA-compiles the CG kernel for tiles of `shapes` ((T, B, W, R, multi_line), from
    `kernel_shapes`) against n_other fixed rows of k factors, by running it on zeros with no
    sub-tile to solve. A process that solves many blocks (a Beam worker) compiles every shape
    of a side at once, rather than one block's shapes each time it meets a new block."""
    fixed_ext = tf.zeros([n_other + 1, k], dtype)
    w0_gramian = tf.zeros([k, k], dtype)
    for n_tiles, size, width, n_rows, multi_line in sorted(shapes):
        kernel = _kernel(dtype, CG, bool(multi_line), int(cg_steps), True)
        kernel(
            fixed_ext,
            w0_gramian,
            tf.zeros([n_tiles, size, width], tf.int32),
            tf.zeros([n_tiles, size, width], dtype),
            tf.zeros([n_tiles, size, width], dtype),
            tf.zeros([n_tiles, size], tf.int32),
            tf.ones([n_tiles, n_rows], dtype),
            tf.zeros([n_tiles, n_rows, k], dtype),
            tf.constant(0, tf.int32),
        )


def plan_rows(
    rows: CsrMatrix,
    f: np.ndarray,
    reg: np.ndarray,
    w0: float,
    solver: str = CHOLESKY,
    dtype: tf.DType = tf.float32,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    tile_shape: TileShape | None = None,
) -> RowPlan:
    """Lays out a block of rows as padded tiles for `solve_planned`.

    Rows are taken in chunks of `chunk_rows`; each chunk is sorted by length and cut into
    tiles (see the module docstring). Solutions do not depend on the chunking beyond
    round-off.

    Args:
        rows: the n_rows x n_other block to solve; its columns index the fixed factors.
        f: float [nnz], f_ui of each entry of `rows`, in its nnz order; >= 0.
        reg: float [n_rows], λ_u of each row.
        w0: the unobserved weight, >= 0.
        solver: the solver the plan is for; picks the default tile shape.
        dtype: the float dtype of the kernels (tf.float32, or tf.float64 for tests).
        chunk_rows: rows sorted and tiled together.
        tile_shape: tile sizes; `DEFAULT_TILES[solver]` when None.

    Returns:
        The plan.
    """
    validate_solver(solver)
    n_rows, n_other = rows.shape
    f = np.asarray(f)
    reg = np.asarray(reg)
    if f.shape != (rows.nnz,):
        raise ValueError(f"f must have one weight per entry, shape ({rows.nnz},), got {f.shape}")
    if f.size and not f.min() >= 0:
        raise ValueError("observed weights f must be >= 0")
    if reg.shape != (n_rows,):
        raise ValueError(f"reg must have one λ per row, shape ({n_rows},), got {reg.shape}")
    if not w0 >= 0:
        raise ValueError(f"unobserved weight w0 must be >= 0, got {w0}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    if n_other >= np.iinfo(np.int32).max:
        raise ValueError(f"at most {np.iinfo(np.int32).max - 1} fixed rows, got {n_other}")
    tile_shape = tile_shape or DEFAULT_TILES[solver]
    np_dtype = dtype.as_numpy_dtype
    c = ((w0 + f.astype(np.float64)) * rows.values).astype(np_dtype)
    f = f.astype(np_dtype)
    reg = reg.astype(np_dtype)
    lengths = rows.row_counts()
    tiles = []
    for parts in _chunk_parts(lengths, chunk_rows, tile_shape):
        tiles.extend(_build_tiles(rows, f, c, reg, parts, tile_shape))
    gather_index = np.empty(n_rows, dtype=np.int64)
    offset = 0
    for tile in tiles:
        tile_rows = tile.rows.ravel()
        real = tile_rows < n_rows
        gather_index[tile_rows[real]] = offset + np.flatnonzero(real)
        offset += tile_rows.size
    gather_index[lengths == 0] = offset
    if offset >= np.iinfo(np.int32).max:
        raise ValueError("too many rows in one plan; use row_slice to split the block")
    return RowPlan(
        shape=(n_rows, n_other),
        w0=float(w0),
        dtype=dtype,
        tiles=tuple(tiles),
        gather_index=gather_index.astype(np.int32),
        nnz=rows.nnz,
        min_reg=float(reg[lengths > 0].min()) if rows.nnz else float("inf"),
    )


def _observed_product(
    y: tf.Tensor, weights: tf.Tensor, line_rows: tf.Tensor, multi_line: bool, n_rows: tf.Tensor
) -> tf.Tensor:
    """Σ_(lines l of row u) Σ_w weights_lw y_lw: [B, W, k], [B, W] -> [R, k]."""
    per_line = tf.einsum("bw,bwk->bk", weights, y)
    if not multi_line:
        return per_line
    return tf.math.unsorted_segment_sum(per_line, line_rows, n_rows)


def observed_gramians(y: tf.Tensor, f: tf.Tensor) -> tf.Tensor:
    """Σ_i f_i y_i y_iᵀ per row: y [B, W, k], f [B, W] -> [B, k, k] (padding has f = 0)."""
    return tf.matmul(y * f[:, :, None], y, transpose_a=True)


def solve_normal_equations(
    observed: tf.Tensor, rhs: tf.Tensor, w0_gramian: tf.Tensor, reg: tf.Tensor
) -> tf.Tensor:
    """The exact row solve x = A⁻¹ b with A = w0·G + observed + λ I, for a batch of rows.

    Args:
        observed: [R, k, k] Σ_i f_ui y_i y_iᵀ (`observed_gramians`).
        rhs: [R, k] b_u = Σ_i (w0 + f_ui) r_ui y_i.
        w0_gramian: [k, k] w0·G.
        reg: [R] λ_u.

    Returns:
        [R, k] the solutions, by Cholesky factorisation (A is symmetric positive definite).
    """
    a = observed + w0_gramian[None, :, :]
    a = tf.linalg.set_diag(a, tf.linalg.diag_part(a) + reg[:, None])
    return tf.linalg.cholesky_solve(tf.linalg.cholesky(a), rhs[:, :, None])[:, :, 0]


def _per_line(x: tf.Tensor, line_rows: tf.Tensor, multi_line: bool) -> tf.Tensor:
    """Each line's row of x: [R, k] -> [B, k]."""
    return tf.gather(x, line_rows) if multi_line else x


def _cg_steps(
    y: tf.Tensor,
    f: tf.Tensor,
    c: tf.Tensor,
    line_rows: tf.Tensor,
    reg: tf.Tensor,
    x: tf.Tensor,
    w0_gramian: tf.Tensor,
    multi_line: bool,
    steps: int | tf.Tensor,
) -> tf.Tensor:
    """`steps` CG steps on the rows of one sub-tile, from x.

    Args:
        y: [B, W, k] the gathered fixed factors of the lines' entries.
        f, c: [B, W] f_ui and (w0 + f_ui) r_ui of the entries (0 on padding).
        line_rows: int32 [B] the row of each line; reg [R] λ_u; x [R, k] the warm start.
        w0_gramian: [k, k] w0·G.
        multi_line: whether some row spans several lines.
        steps: a Python int (unrolled) or a scalar tensor (a loop).

    Returns:
        [R, k] x after the steps.
    """
    n_rows = tf.shape(reg)[0]
    reg = reg[:, None]

    def apply(p):
        # A p = w0·G p + Σ_i f_i y_i (y_i·p) + λ p   (G symmetric: G p = (pᵀ G)ᵀ).
        yp = tf.einsum("bwk,bk->bw", y, _per_line(p, line_rows, multi_line))
        observed = _observed_product(y, f * yp, line_rows, multi_line, n_rows)
        return observed + tf.matmul(p, w0_gramian) + reg * p

    # r = b − A x = Σ_i y_i (c_i − f_i y_i·x) − w0·G x − λ x.
    yx = tf.einsum("bwk,bk->bw", y, _per_line(x, line_rows, multi_line))
    r = _observed_product(y, c - f * yx, line_rows, multi_line, n_rows)
    r = r - tf.matmul(x, w0_gramian) - reg * x
    p = r
    rs = tf.reduce_sum(r * r, axis=1, keepdims=True)
    for _ in range(steps) if isinstance(steps, int) else tf.range(steps):
        ap = apply(p)
        alpha = tf.math.divide_no_nan(rs, tf.reduce_sum(p * ap, axis=1, keepdims=True))
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = tf.reduce_sum(r * r, axis=1, keepdims=True)
        p = r + tf.math.divide_no_nan(rs_new, rs) * p
        rs = rs_new
    return x


@functools.cache
def _kernel(dtype: tf.DType, solver: str, multi_line: bool, cg_steps: int, jit_compile: bool):
    """The traced tile kernel for one configuration; shapes are dynamic.

    The CG kernel loops over a tile's sub-tiles: it gathers one sub-tile's factors ([B, W, k],
    512 KiB by default, so they stay in the L2 cache), runs the CG steps on its rows and moves
    on, so a call costs one launch however many sub-tiles it holds. With `jit_compile` it is
    XLA-compiled once per tile shape; XLA fuses the gathers and the elementwise work around
    the two [B, W, k] contractions of each step, and the loop reuses one buffer for the
    gathered factors. Up to `_MAX_UNROLLED_CG_STEPS` steps are unrolled; more steps use a loop
    so that compile time stays flat. The exact solver never uses XLA (its Cholesky
    factorisation is much slower there) and takes one sub-tile (`Tile.flat`).
    """
    specs = [
        tf.TensorSpec([None, None], dtype),  # fixed_ext [n_other + 1, k]
        tf.TensorSpec([None, None], dtype),  # w0 · G [k, k]
        tf.TensorSpec([None, None, None], tf.int32),  # cols [T, B, W]
        tf.TensorSpec([None, None, None], dtype),  # f [T, B, W]
        tf.TensorSpec([None, None, None], dtype),  # c [T, B, W]
        tf.TensorSpec([None, None], tf.int32),  # line_rows [T, B]
        tf.TensorSpec([None, None], dtype),  # reg [T, R]
    ]

    if solver == CHOLESKY:

        @tf.function(input_signature=specs)
        def cholesky_tile(fixed_ext, w0_gramian, cols, f, c, line_rows, reg):
            cols, f, c, line_rows, reg = cols[0], f[0], c[0], line_rows[0], reg[0]
            n_rows = tf.shape(reg)[0]
            y = tf.gather(fixed_ext, cols)  # [B, W, k]
            a = observed_gramians(y, f)  # [B, k, k]
            if multi_line:
                a = tf.math.unsorted_segment_sum(a, line_rows, n_rows)  # [R, k, k]
            rhs = _observed_product(y, c, line_rows, multi_line, n_rows)  # [R, k]
            return solve_normal_equations(a, rhs, w0_gramian, reg)

        return cholesky_tile

    specs = specs + [
        tf.TensorSpec([None, None, None], dtype),  # x0 [T, R, k], the sub-tile rows' warm start
        tf.TensorSpec([], tf.int32),  # count: sub-tiles to solve, the first of the T
    ]
    steps = cg_steps if cg_steps <= _MAX_UNROLLED_CG_STEPS else tf.constant(cg_steps)

    @tf.function(input_signature=specs, jit_compile=jit_compile)
    def cg_tile(fixed_ext, w0_gramian, cols, f, c, line_rows, reg, x0, count):
        n_tiles = tf.shape(cols)[0]
        solutions = tf.TensorArray(dtype, size=n_tiles, element_shape=[None, None])

        def solve_one(t, solutions):
            y = tf.gather(fixed_ext, cols[t])  # [B, W, k]
            x = _cg_steps(y, f[t], c[t], line_rows[t], reg[t], x0[t], w0_gramian, multi_line, steps)
            return t + 1, solutions.write(t, x)

        _, solutions = tf.while_loop(lambda t, _: t < count, solve_one, (0, solutions))
        return solutions.stack()  # [T, R, k]; sub-tiles from count on are zeros

    return cg_tile


def _short(tile: Tile, k: int) -> bool:
    """Whether the exact solver takes the Woodbury path for a tile: one line of <= k/2."""
    return not tile.multi_line and 2 * int(tile.cols.shape[2]) <= k


@functools.cache
def _woodbury_kernel(dtype: tf.DType):
    """The exact solve of single-line tiles of width W <= k/2, by Woodbury (module docstring)."""

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None], dtype),  # fixed_ext Q [n_other + 1, k]
            tf.TensorSpec([None], dtype),  # w0 Λ [k], eigenvalues of w0·G
            tf.TensorSpec([None, None], dtype),  # Q [k, k], eigenvectors of G in columns
            tf.TensorSpec([None, None], tf.int32),  # cols [B, W]
            tf.TensorSpec([None, None], dtype),  # f [B, W]
            tf.TensorSpec([None, None], dtype),  # c [B, W]
            tf.TensorSpec([None], dtype),  # reg [B]
        ]
    )
    def woodbury_tile(fixed_rotated, w0_eigenvalues, basis, cols, f, c, reg):
        z = tf.gather(fixed_rotated, cols)  # [B, W, k], Z = Y_u Q
        d = w0_eigenvalues[None, :] + reg[:, None]  # [B, k], D = w0 Λ + λ_u
        v = tf.einsum("bw,bwk->bk", c, z)  # Zᵀ c
        u = tf.sqrt(f)[:, :, None] * z  # U = diag(√f) Z
        u_d = u / d[:, None, :]  # U D⁻¹
        s = tf.matmul(u_d, u, transpose_b=True)  # [B, W, W], U D⁻¹ Uᵀ
        s = tf.linalg.set_diag(s, tf.linalg.diag_part(s) + 1)
        rhs = tf.einsum("bwk,bk->bw", u_d, v)[:, :, None]  # U D⁻¹ v
        t = tf.linalg.cholesky_solve(tf.linalg.cholesky(s), rhs)[:, :, 0]
        solution = (v - tf.einsum("bw,bwk->bk", t, u)) / d  # z = D⁻¹ (v − Uᵀ t)
        return tf.matmul(solution, basis, transpose_b=True)  # x = Q z, as rows

    return woodbury_tile


def solve_planned(
    plan: RowPlan,
    fixed: FloatArray,
    gramian_matrix: FloatArray,
    solver: str = CHOLESKY,
    x0: FloatArray | None = None,
    cg_steps: int = 3,
    jit_compile: bool = True,
    tiles_in_flight: int = DEFAULT_TILES_IN_FLIGHT,
) -> tf.Tensor:
    """Solves every row of a planned block: x_u = A_u⁻¹ b_u (exactly, or by CG from x0).

    Args:
        plan: the block's layout from `plan_rows`.
        fixed: [n_other, k] fixed factors (Y when solving users).
        gramian_matrix: [k, k] G = fixedᵀ fixed over all of `fixed`, from `gramian`.
        solver: "cholesky" for the exact solve, "cg" for `cg_steps` conjugate-gradient steps.
        x0: [n_rows, k] warm start for "cg" (the current factors); zeros when None. Unused by
            "cholesky".
        cg_steps: CG iterations per row.
        jit_compile: XLA-compile the CG kernel (about 0.5 s per distinct tile shape, then about
            twice as fast). Turn off for one-off solves of many small blocks.
        tiles_in_flight: tiles solved concurrently (threads); results do not depend on it.

    Returns:
        [n_rows, k] tensor of plan.dtype; rows without observations are 0.
    """
    validate_solver(solver, cg_steps)
    dtype = plan.dtype
    n_rows, n_other = plan.shape
    fixed = _as_tensor(fixed, dtype)
    if fixed.shape.rank != 2 or fixed.shape[0] != n_other:
        raise ValueError(f"fixed must be [{n_other}, k], got {fixed.shape}")
    k = int(fixed.shape[1])
    w0_gramian = plan.w0 * _as_tensor(gramian_matrix, dtype)
    if w0_gramian.shape != (k, k):
        raise ValueError(f"gramian must be [{k}, {k}], got {w0_gramian.shape}")
    fixed_ext = tf.concat([fixed, tf.zeros([1, k], dtype)], axis=0)
    if solver == CG:
        x0 = tf.zeros([n_rows, k], dtype) if x0 is None else _as_tensor(x0, dtype)
        if x0.shape != (n_rows, k):
            raise ValueError(f"x0 must be [{n_rows}, {k}], got {x0.shape}")
        x0_ext = tf.concat([x0, tf.zeros([1, k], dtype)], axis=0)
    woodbury = solver == CHOLESKY and plan.min_reg > 0
    if woodbury and any(_short(tile.flat(), k) for tile in plan.tiles):
        eigenvalues, basis = tf.linalg.eigh(w0_gramian)
        eigenvalues = tf.maximum(eigenvalues, 0)  # G is positive semi-definite
        fixed_rotated = tf.matmul(fixed_ext, basis)

    def solve_tile(tile: Tile) -> tf.Tensor:
        """[T · R, k] the solutions of a tile's rows, sub-tile after sub-tile."""
        if solver == CG:
            arrays = tile.tensors()
            kernel = _kernel(dtype, CG, tile.multi_line, int(cg_steps), jit_compile)
            # Without XLA the padding sub-tiles are solved too (to 0): the loop writes all T.
            count = tile.count if jit_compile else int(tile.cols.shape[0])
            # The warm start is gathered here, not in the kernel: the kernel's shapes are then
            # the tile's alone, not the block's row count, so a worker compiles each tile shape
            # once for all the blocks it solves.
            solutions = kernel(
                fixed_ext,
                w0_gramian,
                *(arrays[name] for name in ("cols", "f", "c", "line_rows", "reg")),
                tf.gather(x0_ext, arrays["rows"]),
                tf.constant(count, tf.int32),
            )
            return tf.reshape(solutions, [-1, k])
        tile = tile.flat()
        arrays = tile.tensors()
        if woodbury and _short(tile, k):
            kernel = _woodbury_kernel(dtype)
            cols, f, c, reg = (arrays[name][0] for name in ("cols", "f", "c", "reg"))
            return kernel(fixed_rotated, eigenvalues, basis, cols, f, c, reg)
        kernel = _kernel(dtype, CHOLESKY, tile.multi_line, 0, False)
        names = ("cols", "f", "c", "line_rows", "reg")
        return kernel(fixed_ext, w0_gramian, *(arrays[name] for name in names))

    if tiles_in_flight < 1:
        raise ValueError(f"tiles_in_flight must be >= 1, got {tiles_in_flight}")
    with concurrent.futures.ThreadPoolExecutor(tiles_in_flight) as pool:
        outputs = list(pool.map(solve_tile, plan.tiles))
    outputs.append(tf.zeros([1, k], dtype))
    return tf.gather(tf.concat(outputs, axis=0), plan.gather_index)


def solve_rows(
    fixed: FloatArray,
    gramian_matrix: FloatArray,
    rows: CsrMatrix,
    f: np.ndarray,
    reg: np.ndarray,
    w0: float,
    solver: str = CHOLESKY,
    x0: FloatArray | None = None,
    cg_steps: int = 3,
    dtype: tf.DType = tf.float32,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    jit_compile: bool = True,
) -> np.ndarray:
    """Solves a block of rows against fixed factors: `plan_rows` then `solve_planned`.

    For each row u of `rows`:
        A_u = w0·G + Σ_(i∈obs(u)) f_ui y_i y_iᵀ + λ_u I,   b_u = Σ_(i∈obs(u)) (w0 + f_ui) r_ui y_i,
        x_u = A_u⁻¹ b_u   (exact for "cholesky"; `cg_steps` CG steps from x0_u for "cg").

    Args:
        fixed: [n_other, k] fixed factors y_i.
        gramian_matrix: [k, k] G = fixedᵀ fixed, from `gramian`.
        rows: the n_rows x n_other block to solve (entries r_ui; columns index `fixed`).
        f: float [nnz], f_ui aligned with `rows`' nnz order.
        reg: float [n_rows], λ_u.
        w0: the unobserved weight.
        solver: "cholesky" or "cg".
        x0: [n_rows, k] CG warm start; zeros when None.
        cg_steps: CG iterations.
        dtype: computation dtype.
        chunk_rows: rows sorted and tiled together.
        jit_compile: XLA-compile the CG kernel; see `solve_planned`.

    Returns:
        NumPy [n_rows, k] array of `dtype`.
    """
    plan = plan_rows(rows, f, reg, w0, solver=solver, dtype=dtype, chunk_rows=chunk_rows)
    return solve_planned(plan, fixed, gramian_matrix, solver, x0, cg_steps, jit_compile).numpy()


@functools.cache
def _loss_kernel(dtype: tf.DType):
    """Per-chunk sums of the observed loss terms, accumulated in float64.

    XLA-compiled, so that the two gathers fuse with the products instead of materialising
    [chunk, k] twice (0.25 s -> 0.12 s for 4.5M cells at k = 64 on 2 cores). Every chunk has
    _LOSS_CHUNK entries, the last one padded and masked by `count`, so there is one compile per
    pair of factor table shapes.
    """

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None], dtype),  # X
            tf.TensorSpec([None, None], dtype),  # Y
            tf.TensorSpec([None], tf.int32),  # row of each entry
            tf.TensorSpec([None], tf.int32),  # column of each entry
            tf.TensorSpec([None], tf.float32),  # r
            tf.TensorSpec([None], tf.float32),  # f
            tf.TensorSpec([], tf.int32),  # count: the entries that are real, the first ones
        ],
        jit_compile=True,
    )
    def observed_sums(x, y, row_ids, col_ids, r, f, count):
        prediction = tf.reduce_sum(tf.gather(x, row_ids) * tf.gather(y, col_ids), axis=1)
        real = tf.range(tf.shape(r)[0]) < count
        prediction = tf.where(real, tf.cast(prediction, tf.float64), 0.0)
        squared = tf.square(tf.cast(r, tf.float64) - prediction)
        f = tf.cast(f, tf.float64)
        return (
            tf.reduce_sum(squared),
            tf.reduce_sum(f * squared),
            tf.reduce_sum(tf.square(prediction)),
        )

    return observed_sums


def observed_sums(
    rows: CsrMatrix,
    f: np.ndarray,
    solved: FloatArray,
    fixed: FloatArray,
    dtype: tf.DType = tf.float32,
) -> tuple[float, float, float]:
    """Sums over a block's observed cells, for the loss (`trainer.core.problem.loss_sums`).

    With p_ui = x_u·y_i computed in `dtype` and the sums accumulated in float64:
        (Σ (t_ui − p_ui)²,  Σ f_ui (t_ui − p_ui)²,  Σ p_ui²).

    Args:
        rows: [n_rows, n_fixed] the block, values t_ui.
        f: float [nnz], f_ui in `rows`' nnz order.
        solved: [n_rows, k] the block's factors x_u.
        fixed: [n_fixed, k] the other side's factors y_i.
        dtype: computation dtype of the predictions.
    """
    x = _as_tensor(solved, dtype)
    y = _as_tensor(fixed, dtype)
    if x.shape[0] != rows.shape[0] or y.shape[0] != rows.shape[1]:
        raise ValueError(f"factors {x.shape} and {y.shape} do not match the block {rows.shape}")
    if max(rows.shape) > np.iinfo(np.int32).max:
        raise ValueError(f"at most {np.iinfo(np.int32).max} rows and columns, got {rows.shape}")
    kernel = _loss_kernel(dtype)
    entries = (
        rows.row_ids().astype(np.int32),
        rows.indices.astype(np.int32, copy=False),
        rows.values,
        np.asarray(f, dtype=np.float32),
    )
    # Chunks of one length (a power of two for small blocks): one compile per table shapes.
    chunk = min(_LOSS_CHUNK, int(_next_power_of_two(max(rows.nnz, 1))))
    squared = weighted = predicted_sq = 0.0
    for lo in range(0, rows.nnz, chunk):
        count = min(rows.nnz - lo, chunk)
        parts = [values[lo : lo + count] for values in entries]
        if count < chunk:  # the last chunk: padded with entries of row 0, column 0, masked
            parts = [np.pad(values, (0, chunk - count)) for values in parts]
        sums = kernel(x, y, *parts, tf.constant(count, tf.int32))
        squared += float(sums[0])
        weighted += float(sums[1])
        predicted_sq += float(sums[2])
    return squared, weighted, predicted_sq
