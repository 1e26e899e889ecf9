"""Offline evaluation of a recommender on a held-out split, in pure NumPy.

For every user u with at least one held-out item, the recommender scores all n_items items, the
items u saw in training are removed (they are never recommended, so they can never count as
hits or misses), and the K best remaining items form u's list rec_u = (rec_u[1], ..., rec_u[K]).
With R_u the set of u's held-out items, n_u = |R_u| >= 1 and hit_r = [rec_u[r] ∈ R_u]:

    precision@k = Σ_{r≤k} hit_r / k
    recall@k    = Σ_{r≤k} hit_r / min(k, n_u)
    ndcg@k      = DCG@k / IDCG@k,   DCG@k = Σ_{r≤k} hit_r / log2(r + 1),
                                    IDCG@k = Σ_{r=1..min(k, n_u)} 1 / log2(r + 1)
    map@k       = mean over users of AP@k,   AP@k = Σ_{r≤k} hit_r · P@r / min(k, n_u),
                                             P@r = Σ_{j≤r} hit_j / r
    coverage@k  = |∪_u {rec_u[1..k]}| / n_items

precision, recall, ndcg and map are means over the evaluated users; coverage is one number for
all of them. Dividing by min(k, n_u) rather than n_u makes recall@k and map@k reach 1 for a
perfect ranking even when a user has more than k held-out items.

`evaluate` runs this in batches of users, so memory is O(batch_size · n_items) whatever the
number of users; `evaluate_popularity` is the most-popular-items baseline every model must beat.
Each batch's `batch_sums` is a `RankingSums` of per-user sums; the Beam evaluation
(`trainer.beam.evaluate`) merges the same sums over blocks of users, so both give one result.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import numpy as np

from trainer.core.sparse import CsrMatrix

logger = logging.getLogger(__name__)

DEFAULT_KS = (10, 20, 50)
DEFAULT_BATCH_SIZE = 256
# top_k_excluding: each row's k-th best score is bounded below from the maxima of this many
# chunks per list place (more chunks: fewer items gathered, a longer partition of the maxima),
# and rows with more than this many candidates per place are selected by a partition instead.
_SELECTION_CHUNKS = 32
_MAX_CANDIDATES = 8
# The per-k metrics, in the order their keys appear in the result.
METRIC_NAMES = ("recall", "ndcg", "map", "precision", "coverage")

# Excluded items: a CsrMatrix with one row per batch row, a pair (indptr [b + 1], indices) whose
# row j is indices[indptr[j]:indptr[j + 1]] (indptr may be a slice of a larger matrix's indptr,
# used with that matrix's full indices), or None for no exclusions.
Exclusions = CsrMatrix | tuple[np.ndarray, np.ndarray] | None
ScoreFn = Callable[[np.ndarray], np.ndarray]
ProgressFn = Callable[[int, int], None]


def _check_k(k: int, name: str = "k") -> int:
    if isinstance(k, bool) or int(k) != k or k <= 0:
        raise ValueError(f"{name} must be a positive integer, got {k!r}")
    return int(k)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """The distinct cut-offs in ascending order; ValueError if empty or not all positive."""
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must hold at least one cut-off")
    return tuple(sorted({_check_k(k, "every k in ks") for k in ks}))


def _exclusion_rows(exclude: Exclusions, n_rows: int, n_items: int) -> tuple[np.ndarray, ...]:
    """(row, item) int64 arrays of the excluded cells of a [n_rows, n_items] batch."""
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


def dot_scores(query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """float32 [b, m] = query · candidatesᵀ, computed in float64 and rounded once to float32.

    float32 BLAS kernels round differently for different batch shapes, so X[a:b] @ Yᵀ is not
    bitwise a slice of X @ Yᵀ; in float64 the differences lie far below float32's precision, so
    a row's scores (and hence its ranking and the printed scores) do not depend on how rows are
    batched or blocked. Batch prediction, local and distributed, scores with this.

    Args:
        query: float [b, k_factors]; candidates: float [m, k_factors].
    """
    query = np.asarray(query, dtype=np.float64)
    candidates = np.asarray(candidates, dtype=np.float64)
    return (query @ candidates.T).astype(np.float32)


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
    k = _check_k(k)
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D [b, n_items], got shape {scores.shape}")
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    b, n_items = scores.shape
    ids = np.full((b, k), -1, dtype=np.int64)
    top_scores = np.full((b, k), -np.inf, dtype=np.float32)
    if b == 0 or n_items == 0:
        return ids, top_scores

    rows, items = _exclusion_rows(exclude, b, n_items)
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

    if hard.any():
        redo = np.flatnonzero(hard)
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


@dataclasses.dataclass
class RankingSums:
    """Sums of the per-user metrics over a set of users: the unit `evaluate` and the Beam
    evaluation (`trainer.beam.evaluate`) both add up, so that any split of the users into
    batches or blocks gives the same result.

    Attributes:
        ks: the cut-offs, ascending.
        users: the users evaluated (those with >= 1 held-out item).
        sums: {(metric, k): Σ over users} for recall, ndcg, map and precision.
        covered: {k: bool [n_items]}, the items in some evaluated user's top k.
        overlap: held-out (user, item) cells that are also training cells (never hit).
    """

    ks: tuple[int, ...]
    users: int
    sums: dict[tuple[str, int], float]
    covered: dict[int, np.ndarray]
    overlap: int = 0

    @classmethod
    def zero(cls, ks: Sequence[int], n_items: int) -> RankingSums:
        ks = _check_ks(ks)
        return cls(
            ks,
            0,
            {(name, k): 0.0 for k in ks for name in METRIC_NAMES if name != "coverage"},
            {k: np.zeros(n_items, dtype=bool) for k in ks},
        )

    def merge(self, other: RankingSums) -> RankingSums:
        """The sums over both sets of users (in place; returns self)."""
        if other.ks != self.ks:
            raise ValueError(f"cannot merge sums for cut-offs {other.ks} into {self.ks}")
        self.users += other.users
        self.overlap += other.overlap
        for key, value in other.sums.items():
            self.sums[key] += value
        for k in self.ks:
            self.covered[k] |= other.covered[k]
        return self

    def result(self) -> dict[str, float | int]:
        """{"recall@k", "ndcg@k", "map@k", "precision@k", "coverage@k" for each k, then
        "users_evaluated"}; the means are NaN when no user was evaluated."""
        out: dict[str, float | int] = {}
        for k in self.ks:
            n_items = self.covered[k].size
            for name in METRIC_NAMES:
                if name == "coverage":
                    n_covered = np.count_nonzero(self.covered[k])
                    value = n_covered / n_items if n_items else float("nan")
                else:
                    value = self.sums[name, k] / self.users if self.users else float("nan")
                out[f"{name}@{k}"] = float(value)
        out["users_evaluated"] = self.users
        return out


def _ranking_sums(recommended: np.ndarray, relevant: CsrMatrix, ks: tuple[int, ...]) -> RankingSums:
    """The sums of a batch: recommended int64 [b, K >= max(ks)], relevant of shape (b, n_items)."""
    n_items = relevant.shape[1]
    sums = RankingSums.zero(ks, n_items)
    evaluated = np.flatnonzero(relevant.row_counts() > 0)
    if evaluated.size == 0:
        return sums
    rec = recommended[evaluated, : max(ks)]
    # Relevant cells as sorted unique keys row * n_items + item; a recommended cell is a hit
    # iff its key is among them.
    keys = np.unique(relevant.row_ids() * n_items + relevant.indices.astype(np.int64))
    n_relevant = np.bincount(keys // n_items, minlength=relevant.shape[0])[evaluated]
    rec_keys = evaluated[:, None] * n_items + rec
    found = np.minimum(np.searchsorted(keys, rec_keys), keys.size - 1)
    hits = (rec >= 0) & (keys[found] == rec_keys)

    ranks = np.arange(1, rec.shape[1] + 1, dtype=np.float64)
    discounts = 1.0 / np.log2(ranks + 1.0)
    ideal_dcg = np.cumsum(discounts)  # ideal_dcg[m - 1] = Σ_{r=1..m} 1 / log2(r + 1)
    hit_counts = np.cumsum(hits, axis=1)
    precision_at_r = hit_counts / ranks
    for k in ks:
        n_hits = hit_counts[:, k - 1]
        denominator = np.minimum(k, n_relevant)
        dcg = hits[:, :k] @ discounts[:k]
        average_precision = (hits[:, :k] * precision_at_r[:, :k]).sum(axis=1) / denominator
        sums.sums["recall", k] += float(np.sum(n_hits / denominator))
        sums.sums["ndcg", k] += float(np.sum(dcg / ideal_dcg[denominator - 1]))
        sums.sums["map", k] += float(np.sum(average_precision))
        sums.sums["precision", k] += float(np.sum(n_hits / k))
        top = rec[:, :k]
        sums.covered[k][top[top >= 0]] = True
    sums.users = int(evaluated.size)
    return sums


def batch_sums(
    scores: np.ndarray, seen: CsrMatrix, relevant: CsrMatrix, ks: Sequence[int]
) -> RankingSums:
    """The ranking sums of one batch of users (formulas in the module doc).

    Each row's `seen` items are excluded, the max(ks) best remaining items are ranked
    (`top_k_excluding`: descending score, ties to the lower item id) and scored against the
    row's `relevant` items. Rows without relevant items add nothing.

    Args:
        scores: float [b, n_items], every item's score for each user of the batch.
        seen: CsrMatrix (b, n_items), the users' training items (excluded).
        relevant: CsrMatrix (b, n_items), the users' held-out items.
        ks: the cut-offs, each > 0.
    """
    ks = _check_ks(ks)
    b, n_items = np.shape(scores)
    if seen.shape != (b, n_items) or relevant.shape != (b, n_items):
        raise ValueError(
            f"seen {seen.shape} and relevant {relevant.shape} must match the scores' {(b, n_items)}"
        )
    ids, _ = top_k_excluding(scores, seen, ks[-1])
    sums = _ranking_sums(ids, relevant, ks)
    seen_keys = seen.row_ids() * n_items + seen.indices
    sums.overlap = int(np.isin(relevant.row_ids() * n_items + relevant.indices, seen_keys).sum())
    return sums


def warn_overlap(sums: RankingSums) -> None:
    """Logs the held-out cells that are also training cells (the split should keep them apart)."""
    if sums.overlap:
        logger.warning(
            "%d held-out (user, item) pairs are also in train and can never be hit", sums.overlap
        )


def squared_error_sums(predicted: np.ndarray, actual: np.ndarray) -> tuple[float, int]:
    """(Σ_j (predicted_j − actual_j)², nnz) in float64: the partial sums of `rmse`."""
    predicted = np.asarray(predicted, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    if predicted.shape != actual.shape:
        raise ValueError(f"predicted {predicted.shape} and actual {actual.shape} differ in shape")
    return float(np.sum(np.square(predicted - actual))), int(predicted.size)


def rmse_from_sums(squared_errors: float, count: int) -> float:
    """sqrt(Σ squared errors / nnz); see `rmse`."""
    if count == 0:
        raise ValueError("rmse of zero cells is undefined")
    return float(np.sqrt(squared_errors / count))


def rmse(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Root-mean-square error sqrt(Σ_j (predicted_j − actual_j)² / nnz), in float64.

    Args:
        predicted: float [nnz], the model's value of each held-out cell (e.g. x_u·y_i).
        actual: float [nnz], the observed rating r_ui of the same cells, in the same order.
    """
    return rmse_from_sums(*squared_error_sums(predicted, actual))


def popularity_scores(train: CsrMatrix) -> np.ndarray:
    """The popularity baseline's score of each item: float32 [n_items], c_i = |{u : r_ui stored}|.

    Every user gets the same scores; with training items excluded, this recommends the most
    popular items the user has not seen. Counts stored entries, so `train` must not repeat a
    (user, item) pair (as `CsrMatrix.from_triples` guarantees).
    """
    return train.col_counts().astype(np.float32)


def take_rows(matrix: CsrMatrix, rows: np.ndarray) -> CsrMatrix:
    """The given rows of `matrix`, in the given order: shape (len(rows), n_cols)
    (`CsrMatrix.take_rows`)."""
    return matrix.take_rows(rows)


def evaluate(
    score_fn: ScoreFn,
    train: CsrMatrix,
    heldout: CsrMatrix,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: ProgressFn | None = None,
    users: np.ndarray | None = None,
) -> dict[str, float | int]:
    """Ranking metrics of a recommender on the held-out split, with training items excluded.

    For each batch of users with at least one held-out item, `score_fn` scores every item,
    `top_k_excluding` drops the user's training items and keeps the max(ks) best, and the lists
    are scored against the held-out items (formulas in the module doc). Held-out items that also
    appear in the user's training row can never be hit; they are counted and logged as a
    warning, since the split should keep them disjoint.

    Args:
        score_fn: maps user ids int64 [b] to scores float [b, n_items] (e.g. X[u] @ Yᵀ).
        train: the training matrix, shape (n_users, n_items); its entries are excluded.
        heldout: the held-out matrix, same shape; its entries are the relevant items.
        ks: the cut-offs, each > 0.
        batch_size: users scored at once; memory is O(batch_size · n_items).
        progress: called after each batch as progress(users_done, users_total).
        users: int [n], the users to evaluate (e.g. `sample_users`); those without
            held-out items are skipped. Default: every user.

    Returns:
        A flat dict: for each k ascending, "recall@k", "ndcg@k", "map@k", "precision@k",
        "coverage@k" (floats), then "users_evaluated" (int, the users with >= 1 held-out item).
        Means over zero users are NaN.
    """
    sums = ranking_sums(score_fn, train, heldout, ks, batch_size, progress, users)
    warn_overlap(sums)
    return sums.result()


def ranking_sums(
    score_fn: ScoreFn,
    train: CsrMatrix,
    heldout: CsrMatrix,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: ProgressFn | None = None,
    users: np.ndarray | None = None,
) -> RankingSums:
    """The `RankingSums` that `evaluate` reports (same arguments), batch by batch, so that
    memory stays O(batch_size · n_items) however many users are scored."""
    ks = _check_ks(ks)
    batch_size = _check_k(batch_size, "batch_size")
    if train.shape != heldout.shape:
        raise ValueError(f"train {train.shape} and heldout {heldout.shape} differ in shape")
    n_items = train.shape[1]
    has_heldout = heldout.row_counts() > 0
    if users is None:
        users = np.flatnonzero(has_heldout).astype(np.int64)
    else:
        users = np.asarray(users, dtype=np.int64)
        if users.ndim != 1 or np.any(users < 0) or np.any(users >= train.shape[0]):
            raise ValueError(f"users must be a 1-D array of row ids in [0, {train.shape[0]})")
        users = users[has_heldout[users]]
    sums = RankingSums.zero(ks, n_items)
    for start in range(0, users.size, batch_size):
        batch = users[start : start + batch_size]
        scores = np.asarray(score_fn(batch))
        if scores.shape != (batch.size, n_items):
            raise ValueError(
                f"score_fn returned shape {scores.shape} for {batch.size} users, expected "
                f"{(batch.size, n_items)}"
            )
        sums.merge(batch_sums(scores, take_rows(train, batch), take_rows(heldout, batch), ks))
        done = min(start + batch_size, users.size)
        logger.debug("evaluated %d of %d users", done, users.size)
        if progress is not None:
            progress(done, int(users.size))
    return sums


def sample_users(heldout: CsrMatrix, n_users: int, seed: int) -> np.ndarray:
    """A seeded sample of n_users of the users with >= 1 held-out item: int64 [m], ascending,
    m = min(n_users, their number) (all of them when n_users >= their number)."""
    n_users = _check_k(n_users, "n_users")
    candidates = np.flatnonzero(heldout.row_counts() > 0).astype(np.int64)
    if n_users >= candidates.size:
        return candidates
    rng = np.random.default_rng([seed, 19])
    return np.sort(rng.choice(candidates, n_users, replace=False))


def evaluate_popularity(
    train: CsrMatrix,
    heldout: CsrMatrix,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: ProgressFn | None = None,
) -> dict[str, float | int]:
    """`evaluate` of the popularity baseline: every user scores item i as c_i (see
    `popularity_scores`), so each gets the most popular items not in its training row."""
    scores = popularity_scores(train)

    def score_fn(user_ids: np.ndarray) -> np.ndarray:
        return np.broadcast_to(scores, (user_ids.size, scores.size))

    return evaluate(score_fn, train, heldout, ks, batch_size, progress)
