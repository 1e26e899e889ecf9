"""Top-K of a block of rows, scored against the catalogue one chunk of items at a time.

    ids, top = chunked_top_k(FactorScores(X_b, Y), exclude, k, item_chunk)

The one routine every ranking of a block of rows against all items goes through (the
evaluation, new visitors, batch prediction, local or in Beam), so that no [rows, n_items]
score matrix is ever held. For each chunk of `item_chunk` consecutive items [s, e), in
ascending order:

    scores  = the block's scores of items s..e-1        float32 [b, e - s] (`BlockScores`)
    part    = `topk.top_k_excluding_cells` of the chunk, the row's excluded items that fall in
              [s, e) at -inf
    running = `topk.merge_top_k`(running, part)          the k best so far, best first

Exact: the top k of a row is the top k of the union of its chunks' top k's (`topk` module doc,
merge), and merging float32 scores with ties to the lower id ranks as `topk.top_k_excluding`
ranks the whole float32 row, so the lists (and the -1 / -inf padding of rows with fewer than k
unseen items) are byte-identical to `top_k_excluding(scores of the whole row, exclude, k)`,
whatever the chunk size. Rows whose chunk list cannot enter their running list (its best score
is below the running k-th, or equal to it: a later chunk's ids are larger, so it loses the
tie) skip the merge.

Memory: the peak of one call is O(b · item_chunk + b · k) whatever n_items: the chunk's
float32 scores (b · item_chunk · 4 bytes), the float64 products `topk.score` rounds them from
(formed a slab of rows at a time, at most `PRODUCT_BYTES`), the selection's work arrays (about
b · min(item_chunk, 32k) · 6 bytes more; rows with many ties are partitioned a slab of rows
at a time, about 5 · `topk._PARTITION_BYTES` of work arrays), and
the running and merged lists (b · 3k · 12 bytes); the exclusions (int64 row and item of each
excluded cell, 16 bytes a cell) are the block's own. `item_chunk_for` picks the chunk from
`DEFAULT_SCORE_BYTES` when none is given: 4,096 items for a block of 4,096 rows, whose call
then peaks at 165 MiB (tracemalloc, k = 50, 64 factors, 20,000 items; the whole [4096, 20000]
matrix and its ranking: 947 MiB), and as fast (1.2 s against 2.0 s on 2 vCPUs).

Fast path, `ConstantScores` (the popularity baseline: every row scores item i as row[i]): the
rows differ only in their excluded items, so the catalogue is ranked once per object
(`popularity_order`: items by float32 score descending, ties to the lower id, the order the
chunks and merges above produce; an `order` can be passed in to share one ranking among
blocks, `RankingCache` keeps one per worker) and each row walks that ranking: its list is the
first k items of the ranking it does not exclude, all of which lie among the first k + E_r
(E_r: the row's distinct excluded items). Cost per call: O((b · k + e) log e) time and
O(b · k + e) memory (e: excluded cells; no [b, n_items] array, no chunk), plus the
O(n_items log n_items) sort and n_items · 8 bytes of the ranking once per object; the lists
are the ones the chunked path gives, byte for byte (-inf items after the finite ones and +inf
before them, each run by id; a NaN at an item some row does not exclude is a ValueError as
there; NaN items rank last).
"""

from __future__ import annotations

import abc
import dataclasses

import numpy as np

from trainer.core import topk
from trainer.core.topk import Exclusions, positive_int

# The float32 scores of one chunk (b · item_chunk · 4 bytes) stay within this by default.
DEFAULT_SCORE_BYTES = 64 << 20
# The float64 products behind them are formed at most this many bytes at a time.
PRODUCT_BYTES = 8 << 20


def item_chunk_for(n_rows: int, item_chunk: int = 0, score_bytes: int = DEFAULT_SCORE_BYTES):
    """Items scored at once for a block of `n_rows` rows: `item_chunk` when > 0, else the most
    whose float32 scores fit in `score_bytes` (b · chunk · 4 <= score_bytes), at least 1."""
    if isinstance(item_chunk, bool) or int(item_chunk) != item_chunk or item_chunk < 0:
        raise ValueError(f"item_chunk must be an integer >= 0 (0: automatic), got {item_chunk!r}")
    if item_chunk:
        return int(item_chunk)
    return max(1, int(score_bytes) // (4 * max(int(n_rows), 1)))


class BlockScores(abc.ABC):
    """A block's scores, given a range of items at a time: what `chunked_top_k` ranks.

    Attributes:
        n_rows: b, the rows of the block.
        n_items: the items every row is scored against.
    """

    n_rows: int
    n_items: int

    @abc.abstractmethod
    def scores(self, start: int, stop: int) -> np.ndarray:
        """float32 [b, stop - start]: each row's scores of items start, ..., stop - 1."""


@dataclasses.dataclass(frozen=True)
class FactorScores(BlockScores):
    """s[u, i] = x_u · y_i by `topk.score` (float32; a row's scores do not depend on the rows
    or items scored with it).

    Attributes:
        query: float [b, k_factors], the block's factors (e.g. X_b).
        candidates: float [n_items, k_factors], the items' factors Y.
    """

    query: np.ndarray
    candidates: np.ndarray

    @property
    def n_rows(self) -> int:
        return int(np.shape(self.query)[0])

    @property
    def n_items(self) -> int:
        return int(np.shape(self.candidates)[0])

    def scores(self, start: int, stop: int) -> np.ndarray:
        return topk.score(self.query, self.candidates[start:stop], PRODUCT_BYTES)


@dataclasses.dataclass(frozen=True)
class ConstantScores(BlockScores):
    """Every row scores item i as row[i] (the popularity baseline's c_i); ranked by walking one
    ranking of the catalogue (module doc, fast path).

    Attributes:
        row: float32 [n_items], the scores (other dtypes are taken as float32).
        n_rows: b.
        order: int64 [n_items], `popularity_order(row)`: computed when None; pass the one of
            an equal row to share it between blocks (it is trusted, only its shape checked).
    """

    row: np.ndarray
    n_rows: int
    order: np.ndarray | None = None

    def __post_init__(self):
        row = np.asarray(self.row, dtype=topk.SCORE_DTYPE)
        if row.ndim != 1:
            raise ValueError(f"row must be 1-D [n_items], got shape {row.shape}")
        order = popularity_order(row) if self.order is None else np.asarray(self.order)
        if order.shape != row.shape or not np.issubdtype(order.dtype, np.integer):
            raise ValueError(f"order must be int [{row.size}], got {order.dtype} {order.shape}")
        object.__setattr__(self, "row", row)
        object.__setattr__(self, "order", order.astype(np.int64, copy=False))

    @property
    def n_items(self) -> int:
        return int(np.shape(self.row)[0])

    def scores(self, start: int, stop: int) -> np.ndarray:
        chunk = np.asarray(self.row[start:stop], dtype=topk.SCORE_DTYPE)
        return np.broadcast_to(chunk, (self.n_rows, chunk.size))  # a view: no copy


def popularity_order(row: np.ndarray) -> np.ndarray:
    """int64 [n_items]: the items by float32(row) descending, ties to the lower id (a stable
    sort; -0.0 ties 0.0, +inf first, -inf after every finite score, NaN last), the order
    `topk.top_k_excluding` ranks a row of these scores in."""
    scores = np.asarray(row, dtype=topk.SCORE_DTYPE)
    return np.argsort(-scores, kind="stable").astype(np.int64, copy=False)


class RankingCache:
    """The `popularity_order` of the last row asked for, kept while the row stays the same: for
    a caller that ranks block after block against one row (a DoFn's side input).

    Memory: the row's reference and its ranking, n_items · 8 bytes.
    """

    def __init__(self):
        self._row: np.ndarray | None = None
        self._order: np.ndarray | None = None

    def order(self, row: np.ndarray) -> np.ndarray:
        """`popularity_order(row)`, sorted again only when `row` is neither the last row's
        object nor bitwise equal to it (an O(n_items) comparison, no sort)."""
        row = np.asarray(row)
        if self._row is not row:
            if self._row is None or not _same_bits(self._row, row):
                self._order = popularity_order(row)
            self._row = row
        return self._order


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return np.array_equal(*(np.ascontiguousarray(x).view(np.uint8) for x in (a, b)))


def chunked_top_k(
    block: BlockScores, exclude: Exclusions, k: int, item_chunk: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The k best-scored items of each row of the block, never an excluded one, chunk by chunk.

    Equal, byte for byte, to `topk.top_k_excluding(scores of the whole rows, exclude, k)`
    (module doc), with memory O(b · item_chunk + b · k) rather than O(b · n_items); a
    `ConstantScores` block walks its one ranking instead (module doc, fast path: memory
    O(b · k + excluded cells), `item_chunk` checked but not used).

    Args:
        block: the block's scores (`FactorScores`, `ConstantScores`); a chunk's scores are taken
            as float32. Must not be NaN at non-excluded items.
        exclude: the items each row must never return: a CsrMatrix (b, n_items), a pair
            (indptr int [b + 1], indices int), or None (`topk.Exclusions`).
        k: the list length, > 0.
        item_chunk: items scored at once, > 0; 0: `item_chunk_for(b)`.

    Returns:
        (ids int64 [b, k], scores float32 [b, k]), best first, padded with (-1, -inf).
    """
    k = positive_int(k)
    b, n_items = int(block.n_rows), int(block.n_items)
    chunk = item_chunk_for(b, item_chunk)
    rows, items = topk.excluded_cells(exclude, b, n_items)
    if isinstance(block, ConstantScores):
        return _walk_ranking(block, rows, items, k)
    by_item = np.argsort(items, kind="stable")
    rows, items = rows[by_item], items[by_item]
    ids = np.full((b, k), -1, dtype=np.int64)
    top = np.full((b, k), -np.inf, dtype=topk.SCORE_DTYPE)
    for start in range(0, n_items, chunk):
        stop = min(start + chunk, n_items)
        scores = np.asarray(block.scores(start, stop), dtype=topk.SCORE_DTYPE)
        if scores.shape != (b, stop - start):
            raise ValueError(f"scores of items [{start}, {stop}) have shape {scores.shape}")
        first, last = np.searchsorted(items, [start, stop])
        part_ids, part_top = topk.top_k_excluding_cells(
            scores, rows[first:last], items[first:last] - start, k
        )
        del scores
        part_ids[part_ids >= 0] += start
        _merge_into(ids, top, part_ids, part_top)
    return ids, top


def _merge_into(ids: np.ndarray, top: np.ndarray, part_ids: np.ndarray, part_top: np.ndarray):
    """Merges a later chunk's lists into the running ones, in place (`topk.merge_top_k`).

    A row takes part only if the chunk's best can enter: it is an item (not padding) and the
    running list has padding or a k-th score below it (an equal score loses: larger id).
    """
    k = ids.shape[1]
    enters = (part_ids[:, 0] >= 0) & ((ids[:, -1] < 0) | (part_top[:, 0] > top[:, -1]))
    if not enters.any():
        return
    merged_ids, merged_top = topk.merge_top_k(
        np.concatenate([ids[enters], part_ids[enters]], axis=1),
        np.concatenate([top[enters], part_top[enters]], axis=1),
        k,
    )
    ids[enters], top[enters] = merged_ids, merged_top


def _walk_ranking(
    block: ConstantScores, rows: np.ndarray, items: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """`chunked_top_k` of a `ConstantScores` (module doc, fast path): each row's first k items
    of `block.order` that it does not exclude.

    Row r walks the first m_r = min(n_items, k + E_r) places of the ranking (E_r: its distinct
    excluded items; at most E_r of those places are excluded, so k are not, or all its
    eligible items are there), the walked (row, item) cells looked up among the sorted excluded
    keys row · n_items + item.
    """
    b, n_items = block.n_rows, block.n_items
    ids = np.full((b, k), -1, dtype=np.int64)
    top = np.full((b, k), -np.inf, dtype=topk.SCORE_DTYPE)
    if b == 0 or n_items == 0:
        return ids, top
    excluded = np.unique(rows * n_items + items)  # sorted, distinct: duplicates count once
    _check_no_nan(block, excluded)
    lengths = np.minimum(n_items, k + np.bincount(excluded // n_items, minlength=b))
    starts = np.cumsum(lengths) - lengths
    walk_rows = np.repeat(np.arange(b, dtype=np.int64), lengths)
    walked = block.order[np.arange(walk_rows.size) - np.repeat(starts, lengths)]
    keys = walk_rows * n_items + walked
    found = np.minimum(np.searchsorted(excluded, keys), max(excluded.size - 1, 0))
    eligible = excluded[found] != keys if excluded.size else np.ones(keys.size, dtype=bool)
    del keys, found
    seen_eligible = np.cumsum(eligible)  # eligible places up to and including each one
    before = seen_eligible[starts] - eligible[starts]  # eligible places before each row
    rank = seen_eligible - 1 - np.repeat(before, lengths)
    take = eligible & (rank < k)
    ids[walk_rows[take], rank[take]] = walked[take]
    top[walk_rows[take], rank[take]] = block.row[walked[take]]
    return ids, top


def _check_no_nan(block: ConstantScores, excluded: np.ndarray) -> None:
    """ValueError unless every row excludes every NaN-scored item (as the chunked path); NaN
    ranks last, so a row without NaN has none at its ranking's end (O(1))."""
    if not np.isnan(block.row[block.order[-1]]):
        return
    n_nan = int(np.count_nonzero(np.isnan(block.row)))
    nan_cells = excluded[np.isnan(block.row[excluded % block.n_items])]
    if (np.bincount(nan_cells // block.n_items, minlength=block.n_rows) < n_nan).any():
        raise ValueError("scores contain NaN at non-excluded items")
