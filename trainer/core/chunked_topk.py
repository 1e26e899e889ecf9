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
    """Every row scores item i as row[i] (the popularity baseline's c_i).

    Attributes:
        row: float32 [n_items], the scores.
        n_rows: b.
    """

    row: np.ndarray
    n_rows: int

    @property
    def n_items(self) -> int:
        return int(np.shape(self.row)[0])

    def scores(self, start: int, stop: int) -> np.ndarray:
        chunk = np.asarray(self.row[start:stop], dtype=topk.SCORE_DTYPE)
        return np.broadcast_to(chunk, (self.n_rows, chunk.size))  # a view: no copy


def chunked_top_k(
    block: BlockScores, exclude: Exclusions, k: int, item_chunk: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The k best-scored items of each row of the block, never an excluded one, chunk by chunk.

    Equal, byte for byte, to `topk.top_k_excluding(scores of the whole rows, exclude, k)`
    (module doc), with memory O(b · item_chunk + b · k) rather than O(b · n_items).

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
