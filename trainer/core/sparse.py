"""A minimal compressed-sparse-row matrix for the rating matrix, in pure NumPy.

The trainer needs only a handful of operations on the rating matrix R (n_users x n_items):
per-row and per-column counts, the transpose (for the column sweep), slicing a block of rows
(for chunked and distributed solves), and building it from (row, col, value) triples. Keeping
them here avoids a SciPy dependency on Beam workers.

Layout, for the 3 x 4 matrix

    [[1 . 2 .]
     [. . . .]
     [. 3 . 4]]

    indptr  = [0, 2, 2, 4]        row u owns entries indptr[u]:indptr[u + 1]
    indices = [0, 2, 1, 3]        column of each entry
    values  = [1, 2, 3, 4]        r_ui of each entry

Entries are ordered row-major ("nnz order"); within a row, columns ascend. Arrays that carry
one value per entry (such as the observed weights f_ui) are aligned with that order, and
`transpose_with_perm` returns the permutation that carries them to the transpose's order.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def _stable_argsort(keys: np.ndarray, bound: int) -> np.ndarray:
    """np.argsort(keys, kind="stable") for integer keys in [0, bound), as int64 [n].

    NumPy's stable sort is a radix sort for 16-bit keys and a merge sort (several times
    slower) for wider ones, so keys below 2^32 are sorted 16 bits at a time, least
    significant half first (an LSD radix sort: each pass is stable, so ties keep their order).
    """
    if bound <= 1 << 16:
        return np.argsort(keys.astype(np.uint16), kind="stable")
    if bound > 1 << 32:
        return np.argsort(keys, kind="stable")
    keys = keys.astype(np.uint32, copy=False)
    low = np.argsort((keys & 0xFFFF).astype(np.uint16), kind="stable")
    high = np.argsort((keys[low] >> 16).astype(np.uint16), kind="stable")
    return low[high]


@dataclasses.dataclass(frozen=True)
class CsrMatrix:
    """A sparse matrix in CSR layout.

    Attributes:
        indptr: int64 [n_rows + 1], non-decreasing, indptr[0] == 0 and indptr[-1] == nnz.
        indices: int32 or int64 [nnz], the column of each entry, in [0, n_cols).
        values: float32 [nnz], the value of each entry.
        shape: (n_rows, n_cols).
    """

    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        indptr = np.asarray(self.indptr, dtype=np.int64)
        indices = np.asarray(self.indices)
        if indices.dtype not in (np.int32, np.int64):
            indices = indices.astype(np.int64)
        values = np.asarray(self.values, dtype=np.float32)
        n_rows, n_cols = (int(n) for n in self.shape)
        object.__setattr__(self, "indptr", indptr)
        object.__setattr__(self, "indices", indices)
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "shape", (n_rows, n_cols))
        if n_rows < 0 or n_cols < 0:
            raise ValueError(f"shape must be non-negative, got {self.shape}")
        if indptr.shape != (n_rows + 1,):
            raise ValueError(
                f"indptr must have n_rows + 1 = {n_rows + 1} entries, got {indptr.shape}"
            )
        if indices.ndim != 1 or values.shape != indices.shape:
            raise ValueError(
                f"indices and values must be 1-D of equal length, got {indices.shape} "
                f"and {values.shape}"
            )
        if indptr[0] != 0 or indptr[-1] != indices.size or np.any(np.diff(indptr) < 0):
            raise ValueError("indptr must start at 0, be non-decreasing and end at nnz")
        if indices.size and (indices.min() < 0 or indices.max() >= n_cols):
            raise ValueError(f"column indices must lie in [0, {n_cols})")

    @property
    def nnz(self) -> int:
        """The number of stored entries."""
        return int(self.indices.size)

    def row_counts(self) -> np.ndarray:
        """Entries per row: int64 [n_rows], n_u = indptr[u + 1] - indptr[u]."""
        return np.diff(self.indptr)

    def col_counts(self) -> np.ndarray:
        """Entries per column: int64 [n_cols], c_i = |{u : (u, i) stored}|."""
        return np.bincount(self.indices, minlength=self.shape[1]).astype(np.int64)

    def row_ids(self) -> np.ndarray:
        """The row of each entry: int64 [nnz], in nnz order."""
        return np.repeat(np.arange(self.shape[0], dtype=np.int64), self.row_counts())

    def transpose_with_perm(self) -> tuple[CsrMatrix, np.ndarray]:
        """The transpose Rᵀ in CSR layout, and the permutation between the two nnz orders.

        Returns:
            (transposed, perm): `transposed` has shape (n_cols, n_rows), rows of Rᵀ list their
            columns (R's rows) in ascending order. `perm` is int64 [nnz] with
            transposed.values == self.values[perm]; carry any per-entry array `a` across with
            `a[perm]`, and back with `a_t[np.argsort(perm)]`.
        """
        n_rows, n_cols = self.shape
        perm = _stable_argsort(self.indices, n_cols)
        indptr = np.zeros(n_cols + 1, dtype=np.int64)
        np.cumsum(self.col_counts(), out=indptr[1:])
        index_dtype = np.int32 if n_rows <= np.iinfo(np.int32).max else np.int64
        indices = self.row_ids()[perm].astype(index_dtype)
        transposed = CsrMatrix(indptr, indices, self.values[perm], (n_cols, n_rows))
        return transposed, perm

    def transpose(self) -> CsrMatrix:
        """The transpose Rᵀ, shape (n_cols, n_rows); see `transpose_with_perm`."""
        return self.transpose_with_perm()[0]

    def row_slice(self, start: int, stop: int) -> CsrMatrix:
        """Rows [start, stop) as a CsrMatrix of shape (stop - start, n_cols).

        Its entries are self's entries indptr[start]:indptr[stop], in the same order.
        """
        if not 0 <= start <= stop <= self.shape[0]:
            raise ValueError(f"row slice [{start}, {stop}) is outside [0, {self.shape[0]}]")
        lo, hi = self.indptr[start], self.indptr[stop]
        return CsrMatrix(
            self.indptr[start : stop + 1] - lo,
            self.indices[lo:hi],
            self.values[lo:hi],
            (stop - start, self.shape[1]),
        )

    def take_rows(self, order: np.ndarray) -> CsrMatrix:
        """Rows order[0], order[1], ... as a CsrMatrix of shape (len(order), n_cols).

        Args:
            order: int [m], row indices in [0, n_rows) (a permutation, or any selection).

        Returns:
            Row j is self's row order[j], with its entries in the same order.
        """
        order = np.asarray(order, dtype=np.int64)
        counts = self.row_counts()[order]
        indptr = np.zeros(order.size + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        source = np.arange(indptr[-1], dtype=np.int64) + np.repeat(
            self.indptr[order] - indptr[:-1], counts
        )
        return CsrMatrix(
            indptr, self.indices[source], self.values[source], (order.size, self.shape[1])
        )

    def to_dense(self) -> np.ndarray:
        """The dense float64 [n_rows, n_cols] matrix; for tests and small matrices only."""
        dense = np.zeros(self.shape, dtype=np.float64)
        dense[self.row_ids(), self.indices] = self.values
        return dense

    @classmethod
    def from_triples(
        cls,
        rows: np.ndarray,
        cols: np.ndarray,
        values: np.ndarray,
        shape: tuple[int, int],
    ) -> CsrMatrix:
        """Builds a CsrMatrix from coordinate triples; duplicate (row, col) pairs are summed.

        Args:
            rows: int [nnz_in], row of each triple, in [0, shape[0]).
            cols: int [nnz_in], column of each triple, in [0, shape[1]).
            values: float [nnz_in], value of each triple.
            shape: (n_rows, n_cols).

        Returns:
            The matrix with entries sorted row-major, columns ascending within a row.
        """
        rows = np.asarray(rows, dtype=np.int64).ravel()
        cols = np.asarray(cols, dtype=np.int64).ravel()
        values = np.asarray(values, dtype=np.float64).ravel()
        n_rows, n_cols = (int(n) for n in shape)
        if not rows.size == cols.size == values.size:
            raise ValueError(
                f"rows, cols and values differ in length: {rows.size}, {cols.size}, {values.size}"
            )
        if rows.size and (rows.min() < 0 or rows.max() >= n_rows):
            raise ValueError(f"row indices must lie in [0, {n_rows})")
        if cols.size and (cols.min() < 0 or cols.max() >= n_cols):
            raise ValueError(f"column indices must lie in [0, {n_cols})")
        keys = rows * n_cols + cols
        unique_keys, inverse = np.unique(keys, return_inverse=True)
        summed = np.bincount(inverse, weights=values, minlength=unique_keys.size)
        unique_rows = unique_keys // max(n_cols, 1)
        indptr = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(unique_rows, minlength=n_rows), out=indptr[1:])
        index_dtype = np.int32 if n_cols <= np.iinfo(np.int32).max else np.int64
        indices = (unique_keys % max(n_cols, 1)).astype(index_dtype)
        return cls(indptr, indices, summed.astype(np.float32), (n_rows, n_cols))
