"""Scoring and top-k: the one way every part of the trainer ranks items for a user.

    scores = score(X[users], Y)                        # float32 [b, n_items], x_u · y_i
    ids, top = top_k_excluding(scores, seen, k)        # the k best unseen items of each row
    ids, top = merge_top_k(ids_parts, top_parts, k)    # top-k of chunks -> top-k of the whole

Precision: one, float32. Factors are float32 and so are the scores (`score`): each x_u · y_i of
the float32 factors is summed in float64 and rounded once to float32. Every ranking (the
trainer's metrics.json, the quality gate, new visitors, batch prediction, local or in Beam, and
`WALSModel.recommend`) ranks these same float32 numbers, and a row's scores do not depend on the
batch or block it is scored in. A float32 matrix product would not give that: BLAS picks its
kernel by shape (matrix-vector for one row, other kernels for a few columns or small products),
each summing in its own order, so `X[a:b] @ Yᵀ` in float32 is not bitwise a slice of `X @ Yᵀ`
(measured: one row, or two to four columns, differ in the last bits). Summed in float64, those
differences lie about 2⁻²⁹ below float32's resolution, and the one rounding erases them (a score
could only flip at an exact rounding midpoint). Scoring costs about twice a float32 product.

Ranking: by score descending, ties to the lower index (item id, or user id when ranking users),
padding (id -1, score -inf) after every eligible item when fewer than k are eligible. The
SavedModel's TF top-k (`trainer.serving.export`, `tf.math.top_k`) follows the same tie rule; its
scores are TensorFlow's float32 product, so two items whose scores differ in the last bits may
come out in the other order there.

Merge: the top k of a set of items is the top k of the union of the top k's of any partition of
it into chunks (an item outside its chunk's top k has k better items in that chunk), so blocked
or chunked scoring (`trainer.beam.predict` scores visitors block by block) ends in
`merge_top_k`, which gives exactly the list `top_k_excluding` gives on the whole row.
"""

from __future__ import annotations

import numpy as np

from trainer.core.sparse import CsrMatrix

SCORE_DTYPE = np.float32
# top_k_excluding: each row's k-th best score is bounded below from the maxima of this many
# chunks per list place (more chunks: fewer items gathered, a longer partition of the maxima),
# and rows with more than this many candidates per place are selected by a partition instead.
_SELECTION_CHUNKS = 32
_MAX_CANDIDATES = 8
# Rows selected by partition are taken this many bytes of their scores at a time.
_PARTITION_BYTES = 8 << 20

# Excluded items: a CsrMatrix with one row per batch row, a pair (indptr [b + 1], indices) whose
# row j is indices[indptr[j]:indptr[j + 1]] (indptr may be a slice of a larger matrix's indptr,
# used with that matrix's full indices), or None for no exclusions.
Exclusions = CsrMatrix | tuple[np.ndarray, np.ndarray] | None


def positive_int(value: int, name: str = "k") -> int:
    """`value` as an int; ValueError unless it is a positive integer (bools are not)."""
    if isinstance(value, bool) or int(value) != value or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def score(
    query: np.ndarray, candidates: np.ndarray, product_bytes: int | None = None
) -> np.ndarray:
    """float32 [b, m]: s[u, i] = Σ_f query[u, f] · candidates[i, f] (module doc: precision).

    The factors are taken as float32, the products summed in float64 and rounded once to
    float32, so a row's scores are bitwise the same whichever rows and columns it is scored
    with.

    Args:
        query: float [b, k_factors], e.g. the users' factors X_b.
        candidates: float [m, k_factors], e.g. the item factors Y.
        product_bytes: when given, the float64 products are formed a slab of rows at a time,
            at most max(product_bytes, m · 8) bytes of them at once (the same scores); None:
            all b · m · 8 bytes at once.
    """
    query = np.asarray(query, dtype=SCORE_DTYPE)
    candidates = np.asarray(candidates, dtype=SCORE_DTYPE)
    if query.ndim != 2 or candidates.ndim != 2 or query.shape[1] != candidates.shape[1]:
        raise ValueError(
            f"query {query.shape} and candidates {candidates.shape} must be [b, k] and [m, k]"
        )
    transposed = candidates.astype(np.float64).T
    if product_bytes is None:
        return (query.astype(np.float64) @ transposed).astype(SCORE_DTYPE)
    b, m = query.shape[0], candidates.shape[0]
    out = np.empty((b, m), dtype=SCORE_DTYPE)
    slab = max(1, int(product_bytes) // (8 * max(m, 1)))
    for start in range(0, b, slab):
        out[start : start + slab] = query[start : start + slab].astype(np.float64) @ transposed
    return out


def excluded_cells(exclude: Exclusions, n_rows: int, n_items: int) -> tuple[np.ndarray, ...]:
    """(rows, items): int64 arrays [e] of the excluded cells of a [n_rows, n_items] batch,
    checked against that shape (ValueError)."""
    if exclude is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if isinstance(exclude, CsrMatrix):
        if exclude.shape != (n_rows, n_items):
            raise ValueError(
                f"exclude has shape {exclude.shape}, expected the scores' shape {(n_rows, n_items)}"
            )
        return exclude.row_ids(), exclude.indices.astype(np.int64)
    indptr, indices = (np.asarray(a) for a in exclude)
    indptr = indptr.astype(np.int64)
    if indptr.shape != (n_rows + 1,):
        raise ValueError(f"exclude indptr must have {n_rows + 1} entries, got {indptr.shape}")
    counts = np.diff(indptr)
    if np.any(counts < 0) or indptr[0] < 0 or indptr[-1] > indices.size:
        raise ValueError("exclude indptr must be non-decreasing and lie within the indices")
    rows = np.repeat(np.arange(n_rows, dtype=np.int64), counts)
    items = indices[indptr[0] : indptr[-1]].astype(np.int64)
    if items.size and (items.min() < 0 or items.max() >= n_items):
        raise ValueError(f"excluded item ids must lie in [0, {n_items})")
    return rows, items


def top_k_excluding(
    scores: np.ndarray, exclude: Exclusions, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The k best-scored items of each row, never returning an excluded item.

    Rows are ranked by descending score, ties broken by the lower item id. Each row's items are
    dealt into C = min(n_items, `_SELECTION_CHUNKS`·k) strided chunks (chunk j: items j, j + C,
    j + 2C, ...), excluded cells counting as -inf. The k-th largest chunk maximum t is a lower
    bound of the row's k-th best eligible score (k distinct items reach it), so the row's top k
    lie in the chunks whose maximum reaches t (the k best chunks) and in the < C items after
    the last whole chunk: only those are gathered, and the ones scoring >= t are sorted by
    (score descending, id ascending). The one pass over the whole [b, n_items] block is the
    chunk maxima; the scores are not copied (the chunks holding excluded cells are re-gathered
    with those cells at -inf). Rows where the bound does not narrow the choice (t = -inf, or
    more than `_MAX_CANDIDATES`·k candidates at or above it) are selected by
    `_select_by_partition` instead, with the same result.

    Args:
        scores: float [b, n_items], the score of every item for each row; integer scores are
            taken as float64. Must not be NaN (except at excluded cells). An eligible item with
            score -inf is still returned, after every finite-scored one.
        exclude: the items each row must never return (typically its training items): a
            CsrMatrix of shape (b, n_items), a pair (indptr int [b + 1], indices int) whose row j
            is indices[indptr[j]:indptr[j + 1]], or None.
        k: the list length, > 0.

    Returns:
        (ids, top_scores): ids int64 [b, k] and top_scores float32 [b, k], best first. A row with
        fewer than k eligible (non-excluded) items is padded with id -1 and score -inf.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D [b, n_items], got shape {scores.shape}")
    return top_k_excluding_cells(scores, *excluded_cells(exclude, *scores.shape), k)


def top_k_excluding_cells(
    scores: np.ndarray, rows: np.ndarray, items: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """`top_k_excluding` with the excluded cells given as (rows, items), int64 [e] each, in
    any order, duplicates allowed (`excluded_cells`; not checked here)."""
    k = positive_int(k)
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    b, n_items = scores.shape
    ids = np.full((b, k), -1, dtype=np.int64)
    top_scores = np.full((b, k), -np.inf, dtype=np.float32)
    if b == 0 or n_items == 0:
        return ids, top_scores

    k_eff = min(k, n_items)
    n_chunks = min(n_items, _SELECTION_CHUNKS * k_eff)
    width = n_items // n_chunks
    # The scores are not copied: the chunks holding excluded cells get their maxima recomputed,
    # and the excluded cells among the gathered items are set to -inf there.
    chunks = scores[:, : width * n_chunks].reshape(b, width, n_chunks)  # [r, t, j]: item t·C + j
    in_body = items < width * n_chunks
    excluded_keys = rows[in_body] * n_chunks + items[in_body] % n_chunks  # (row, chunk) keys
    excluded_places = items[in_body] // n_chunks
    maxima = chunks.max(axis=1)  # [b, C]
    fixed = np.unique(excluded_keys)
    values = _gather_chunks(chunks, fixed, excluded_keys, excluded_places, n_chunks)
    maxima[fixed // n_chunks, fixed % n_chunks] = values.max(axis=1, initial=-np.inf)
    tail = np.array(scores[:, width * n_chunks :], copy=True)  # [b, < C]: items width·C, ...
    tail[rows[~in_body], items[~in_body] - width * n_chunks] = -np.inf
    if np.isnan(maxima).any() or np.isnan(tail).any():
        raise ValueError("scores contain NaN at non-excluded items")
    bound = np.partition(maxima, n_chunks - k_eff, axis=1)[:, n_chunks - k_eff]

    # Candidates (row, item, score): the items of the chunks reaching the bound, and of the tail,
    # that score >= the bound.
    chunk_rows, chunk_ids = np.nonzero(maxima >= bound[:, None])
    chosen = chunk_rows * n_chunks + chunk_ids  # ascending
    gathered = _gather_chunks(chunks, chosen, excluded_keys, excluded_places, n_chunks)
    in_chunk = gathered >= bound[chunk_rows, None]
    slot, offset = np.nonzero(in_chunk)
    tail_rows, tail_ids = np.nonzero(tail >= bound[:, None])
    cand_rows = np.concatenate([chunk_rows[slot], tail_rows])
    cand_items = np.concatenate([chunk_ids[slot] + offset * n_chunks, tail_ids + width * n_chunks])
    cand_scores = np.concatenate([gathered[in_chunk], tail[tail_rows, tail_ids]])
    n_candidates = np.bincount(cand_rows, minlength=b)
    hard = (bound == -np.inf) | (n_candidates > _MAX_CANDIDATES * k_eff)
    if hard.any():
        keep = ~hard[cand_rows]
        cand_rows, cand_items, cand_scores = cand_rows[keep], cand_items[keep], cand_scores[keep]
        n_candidates[hard] = 0
    # By row, then score descending, then id ascending (lexsort: the last key is primary).
    order = np.lexsort((cand_items, -cand_scores, cand_rows))
    starts = np.cumsum(n_candidates) - n_candidates
    rank = np.arange(order.size) - np.repeat(starts, n_candidates)
    listed = rank < k_eff
    take, place = order[listed], rank[listed]
    # An easy row has >= k_eff candidates, all eligible (their scores exceed -inf).
    ids[cand_rows[take], place] = cand_items[take]
    top_scores[cand_rows[take], place] = cand_scores[take]

    # The hard rows are re-selected a slab at a time: the partition's work arrays (the masked
    # scores, their partitioned copy, bool masks, an int32 running count: ~20 bytes a cell) stay
    # within a multiple of _PARTITION_BYTES however many rows are hard (ties: popularity).
    hard_rows = np.flatnonzero(hard)
    slab = max(1, _PARTITION_BYTES // (scores.dtype.itemsize * n_items))
    for first in range(0, hard_rows.size, slab):
        redo = hard_rows[first : first + slab]
        in_redo = np.isin(rows, redo)
        excluded = np.zeros((redo.size, n_items), dtype=bool)
        excluded[np.searchsorted(redo, rows[in_redo]), items[in_redo]] = True
        masked = np.where(excluded, -np.inf, scores[redo])
        ids[redo, :k_eff], top_scores[redo, :k_eff] = _select_by_partition(masked, excluded, k_eff)
    return ids, top_scores


def _gather_chunks(
    chunks: np.ndarray,
    keys: np.ndarray,
    excluded_keys: np.ndarray,
    excluded_places: np.ndarray,
    n_chunks: int,
) -> np.ndarray:
    """The scores of some chunks with their excluded cells at -inf: float [len(keys), width].

    Args:
        chunks: float [b, width, n_chunks], chunk j of row r is chunks[r, :, j].
        keys: int, ascending unique row · n_chunks + j of the chunks to gather.
        excluded_keys: int [e], the chunk key of each excluded cell (of the chunked items).
        excluded_places: int [e], each excluded cell's place t in its chunk.
    """
    gathered = chunks[keys // n_chunks, :, keys % n_chunks]
    if keys.size and excluded_keys.size:
        found = np.minimum(np.searchsorted(keys, excluded_keys), keys.size - 1)
        hit = keys[found] == excluded_keys
        gathered[found[hit], excluded_places[hit]] = -np.inf
    return gathered


def _select_by_partition(
    masked: np.ndarray, excluded: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The exact top k of each row, whatever its ties and -inf cells: (ids int64 [r, k], -1
    padded, scores float [r, k]), best first.

    Args:
        masked: float [r, n_items] scores, excluded cells -inf.
        excluded: bool [r, n_items], the excluded cells.
        k: <= n_items.
    """
    n_items = masked.shape[1]
    threshold = np.partition(masked, n_items - k, axis=1)[:, n_items - k]  # the k-th largest
    chosen = _select_with_ties(masked, excluded, threshold, k)
    padding = chosen < 0
    chosen_scores = np.take_along_axis(masked, np.maximum(chosen, 0), axis=1)
    chosen_scores[padding] = -np.inf
    # Sort by (padding last, score descending, id ascending); lexsort's last key is primary.
    order = np.lexsort((chosen, -chosen_scores, padding), axis=1)
    return np.take_along_axis(chosen, order, axis=1), np.take_along_axis(chosen_scores, order, 1)


def _select_with_ties(
    masked: np.ndarray,
    excluded: np.ndarray,
    threshold: np.ndarray,
    k: int,
) -> np.ndarray:
    """Exact top-k sets for rows with ties at the threshold: int64 [r, k], -1 padded, unsorted.

    Each row takes every eligible item scoring above its threshold, then the lowest-id eligible
    items scoring exactly the threshold until it holds min(k, n_eligible) items.
    """
    above = masked > threshold[:, None]  # Excluded cells are -inf, never above.
    tied = (masked == threshold[:, None]) & ~excluded
    n_eligible = masked.shape[1] - np.count_nonzero(excluded, axis=1)
    need = np.minimum(k, n_eligible) - np.count_nonzero(above, axis=1)
    take = above | (tied & (np.cumsum(tied, axis=1, dtype=np.int32) <= need[:, None]))
    rows, items = np.nonzero(take)
    counts = np.count_nonzero(take, axis=1)
    slots = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
    out = np.full((masked.shape[0], k), -1, dtype=np.int64)
    out[rows, slots] = items
    return out


def merge_positions(ids: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Where each row's merged top k lies among its candidates: int64 [b, min(k, n)].

    The candidates are partial top-k lists laid side by side (e.g. `np.concatenate(parts,
    axis=1)`), ranked as `top_k_excluding` ranks: score descending, ties to the lower id, the
    padding (id -1) last. Use it to carry other per-candidate values (names) along;
    `merge_top_k` takes the ids and scores.

    Args:
        ids: int [b, n], the candidates' ids, -1 for padding; a row's ids other than -1 are
            distinct (the lists come from disjoint chunks).
        scores: float [b, n], their scores (padding: -inf).
        k: the merged list's length, > 0.
    """
    k = positive_int(k)
    ids = np.asarray(ids)
    scores = np.asarray(scores)
    if ids.ndim != 2 or ids.shape != scores.shape:
        raise ValueError(f"ids {ids.shape} and scores {scores.shape} must both be [b, n]")
    # lexsort's last key is primary: padding last, then score descending, then id ascending.
    order = np.lexsort((ids, -scores, ids < 0), axis=1)
    return order[:, :k].astype(np.int64)


def merge_top_k(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top k of partial top-k lists: what `top_k_excluding` returns for the whole row.

    If the lists are the top k's (with the same exclusions) of chunks that partition a row's
    items, the result equals `top_k_excluding` on the whole row (module docstring: merge).

    Args:
        ids: int [b, n], the partial lists side by side, ids in the whole row's numbering,
            -1 for padding (see `merge_positions`).
        scores: float [b, n], their scores.
        k: the list length, > 0.

    Returns:
        (ids int64 [b, k], scores float32 [b, k]), best first, padded with (-1, -inf).
    """
    positions = merge_positions(ids, scores, k)
    b, width = positions.shape
    merged_ids = np.full((b, k), -1, dtype=np.int64)
    merged_scores = np.full((b, k), -np.inf, dtype=np.float32)
    merged_ids[:, :width] = np.take_along_axis(np.asarray(ids), positions, axis=1)
    merged_scores[:, :width] = np.take_along_axis(np.asarray(scores), positions, axis=1)
    return merged_ids, merged_scores
