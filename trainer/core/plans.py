"""A block of rows laid out for the kernels: `Tile`, `RowPlan` and `plan_rows`.

NumPy only, so that a plan pickles (a Beam worker can build or receive one) and building one
costs no TensorFlow. The layout (which rows go into which tile, and the tiles' shapes) is
`trainer.core.tiling.tile_specs`; this module fills it with a block's entries. The kernels
(`trainer.core.kernels`) turn a tile's arrays into tensors the first time they solve it,
without a copy: the arrays are allocated 64-byte aligned (`trainer.core.host_arrays`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import numpy as np

from trainer.core.host_arrays import aligned_full, aligned_zeros
from trainer.core.sparse import CsrMatrix
from trainer.core.tiling import (
    CHOLESKY,
    DEFAULT_CHUNK_ROWS,
    DEFAULT_TILES,
    TileShape,
    TileSpec,
    tile_specs,
    validate_solver,
)


@dataclasses.dataclass(frozen=True)
class Tile:
    """T sub-tiles of one shape, each B lines of width W holding the entries of R rows.

    Sub-tiles `count` to T - 1 are padding: no rows, skipped by the CG kernel. The kernels keep
    what they derive from a tile (its tensors) with `memo`; that is not pickled. `plan_rows`
    allocates the arrays aligned (`trainer.core.host_arrays`), so those tensors read them in
    place: a kept plan is held once, not once more as tensors.

    Attributes:
        rows: int32 [T, R], the block row of each sub-tile row; n_rows for padding rows.
        cols: int32 [T, B, W], the column of each entry; n_other (the zero row) on padding.
        f: [T, B, W], f_ui of each entry, 0 on padding.
        c: [T, B, W], (w0 + f_ui) · t_ui of each entry, 0 on padding.
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
        """Pickles the arrays only, not what `memo` kept (names starting with "_")."""
        return {name: value for name, value in self.__dict__.items() if not name.startswith("_")}

    def memo(self, name: str, make) -> Any:
        """self._<name>, made once by make() and kept (two threads may both make it; either
        wins). For values derived from the arrays, e.g. the kernels' tensors."""
        attribute = f"_{name}"
        value = self.__dict__.get(attribute)
        if value is None:
            value = make()
            object.__setattr__(self, attribute, value)
        return value

    def flat(self) -> Tile:
        """The same entries as one sub-tile (T = 1) of T · B lines and T · R rows; kept."""
        return self.memo("flat", self._flatten)

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
    """A block of rows laid out for the kernels; build it with `plan_rows`.

    The layout depends only on the matrix, f, λ and w0, so a trainer builds one plan per side
    (or block) and reuses it in every iteration.

    Attributes:
        shape: (n_rows, n_other) of the block; its columns index the fixed factors.
        w0: the unobserved weight folded into the tiles' `c`.
        dtype: the NumPy float dtype of the tiles and the kernels.
        tiles: every non-empty row is in exactly one tile.
        gather_index: int32 [n_rows]; row u's solution is row gather_index[u] of the tiles'
            outputs concatenated in order, followed by one zero row (for empty rows).
        nnz: the block's number of entries.
        min_reg: the smallest λ_u of a non-empty row (inf without any); the Woodbury path
            needs λ_u > 0.
    """

    shape: tuple[int, int]
    w0: float
    dtype: np.dtype
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


class RowsToPlan(Protocol):
    """What a plan is built from: a block's least-squares problem
    (`trainer.core.problem.RowProblem`)."""

    targets: CsrMatrix
    f: np.ndarray
    reg: np.ndarray
    w0: float


def as_numpy_dtype(dtype) -> np.dtype:
    """A NumPy dtype from a NumPy dtype, its name or a `tf.DType` (without importing TF)."""
    return np.dtype(getattr(dtype, "as_numpy_dtype", dtype))


def plan_rows(
    rows: CsrMatrix,
    f: np.ndarray,
    reg: np.ndarray,
    w0: float,
    solver: str = CHOLESKY,
    dtype=np.float32,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    tile_shape: TileShape | None = None,
) -> RowPlan:
    """Lays out a block of rows as padded tiles for the kernels.

    The layout is `trainer.core.tiling.tile_specs` of the rows' lengths. Solutions do not
    depend on the chunking beyond round-off. The normal equations the tiles hold are those of
    `trainer.core.problem`: per entry f_ui and c_ui = (w0 + f_ui)·t_ui, per row λ_u.

    Args:
        rows: the n_rows x n_other block to solve, values t_ui; its columns index the fixed
            factors.
        f: float [nnz], f_ui of each entry of `rows`, in its nnz order; >= 0.
        reg: float [n_rows], λ_u of each row.
        w0: the unobserved weight, >= 0.
        solver: the solver the plan is for; picks the default tile shape.
        dtype: the float dtype of the kernels (NumPy or TensorFlow; float32, or float64 for
            tests).
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
    np_dtype = as_numpy_dtype(dtype)
    c = ((w0 + f.astype(np.float64)) * rows.values).astype(np_dtype)
    f = f.astype(np_dtype)
    reg = reg.astype(np_dtype)
    lengths = rows.row_counts()
    tiles = [
        _build_tile(rows, f, c, reg, spec) for spec in tile_specs(lengths, chunk_rows, tile_shape)
    ]
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
        dtype=np_dtype,
        tiles=tuple(tiles),
        gather_index=gather_index.astype(np.int32),
        nnz=rows.nnz,
        min_reg=float(reg[lengths > 0].min()) if rows.nnz else float("inf"),
    )


def _build_tile(
    rows: CsrMatrix, f: np.ndarray, c: np.ndarray, reg: np.ndarray, spec: TileSpec
) -> Tile:
    """Fills one tile of `tile_specs` with its rows' entries, in one pass.

    Sub-tile t holds the rows of spec.parts[t] (t < len(spec.parts)); the sub-tiles after
    them are padding. f, c and reg already have the kernels' dtype.
    """
    parts, n_tiles = spec.parts, spec.n_tiles
    n_rows, n_other = rows.shape
    width, size, n_tile_rows = parts[0].width, parts[0].lines, parts[0].n_rows
    members = np.concatenate([part.rows for part in parts])
    n_lines = np.concatenate([part.n_lines for part in parts]).astype(np.int64, copy=False)
    rows_per_part = np.array([part.rows.size for part in parts], dtype=np.int64)
    lines_per_part = np.array([int(part.n_lines.sum()) for part in parts], dtype=np.int64)
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

    cols = aligned_full((n_tiles, size, width), n_other, np.int32)
    cols[part_of_line, line_in_part] = np.where(mask, rows.indices[position], n_other)
    tile_f = aligned_zeros((n_tiles, size, width), f.dtype)
    tile_f[part_of_line, line_in_part] = np.where(mask, f[position], 0)
    tile_c = aligned_zeros((n_tiles, size, width), c.dtype)
    tile_c[part_of_line, line_in_part] = np.where(mask, c[position], 0)
    # Padding lines hold no entries, so they may point at any sub-tile row: use row 0.
    line_rows = aligned_zeros((n_tiles, size), np.int32)
    line_rows[part_of_line, line_in_part] = row_in_part[line_row]
    tile_rows = aligned_full((n_tiles, n_tile_rows), n_rows, np.int32)
    tile_rows[part_of_row, row_in_part] = members
    tile_reg = aligned_full((n_tiles, n_tile_rows), 1, reg.dtype)
    tile_reg[part_of_row, row_in_part] = reg[members]
    return Tile(
        rows=tile_rows,
        cols=cols,
        f=tile_f,
        c=tile_c,
        line_rows=line_rows,
        reg=tile_reg,
        multi_line=spec.multi_line,
        count=len(parts),
    )
