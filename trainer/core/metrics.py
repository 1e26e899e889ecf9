"""The ranking metrics: offline evaluation of a recommender on a held-out split, in NumPy.

For every user u with at least one held-out item, the recommender scores all n_items items, the
items u saw in training are removed (they are never recommended, so they can never count as
hits or misses), and the K = max(ks) best remaining items form u's list rec_u = (rec_u[1], ...,
rec_u[K]): `trainer.core.topk.top_k_excluding`, score descending, ties to the lower item id. A
factor model is scored by `factor_scorer` (`topk.score`, float32) chunk by chunk of items
(`trainer.core.chunked_topk.chunked_top_k`, the same lists), so these lists are the ones batch
prediction and the quality gate produce for the same model. The metrics need only these top-K
lists, never the whole score rows.
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

`evaluate` runs this in batches of users; a scorer that returns `BlockScores` (as
`factor_scorer` does) is ranked in chunks of items, so memory is
O(batch_size · item_chunk + batch_size · K) whatever the numbers of users and items (a scorer
that returns the whole [batch_size, n_items] matrix: O(batch_size · n_items));
`evaluate_popularity` is the most-popular-items baseline every model must beat: its
`ConstantScores` rank the catalogue once and each user walks that ranking past its training
items (`chunked_topk` module doc, fast path; the same lists).
Each batch's `batch_sums` is a `RankingSums` of per-user sums; the Beam evaluation
(`trainer.beam.evaluate`) merges the same sums over blocks of users, so both give one result.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import numpy as np

from trainer.core import chunked_topk, topk
from trainer.core.chunked_topk import BlockScores, ConstantScores, FactorScores
from trainer.core.sparse import CsrMatrix
from trainer.core.topk import positive_int

logger = logging.getLogger(__name__)

DEFAULT_KS = (10, 20, 50)
DEFAULT_BATCH_SIZE = 256
# The per-k metrics, in the order their keys appear in the result.
METRIC_NAMES = ("recall", "ndcg", "map", "precision", "coverage")

# userIds int [b] -> their scores: float [b, n_items], or `BlockScores` (ranked chunk by chunk).
ScoreFn = Callable[[np.ndarray], np.ndarray | BlockScores]
ProgressFn = Callable[[int, int], None]


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """The distinct cut-offs in ascending order; ValueError if empty or not all positive."""
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must hold at least one cut-off")
    return tuple(sorted({positive_int(k, "every k in ks") for k in ks}))


def factor_scorer(user_factors: np.ndarray, item_factors: np.ndarray) -> ScoreFn:
    """The score_fn of a factor model: userIds int [b] -> `FactorScores` of X[users] Yᵀ
    (`topk.score`, float32, as every other ranking of the model), scored chunk by chunk of
    items when ranked."""
    return lambda users: FactorScores(user_factors[users], item_factors)


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
    scores: np.ndarray | BlockScores,
    seen: CsrMatrix,
    relevant: CsrMatrix,
    ks: Sequence[int],
    item_chunk: int = 0,
) -> RankingSums:
    """The ranking sums of one batch of users (formulas in the module doc).

    Each row's `seen` items are excluded, the max(ks) best remaining items are ranked
    (descending score, ties to the lower item id) and scored against the row's `relevant`
    items. Rows without relevant items add nothing.

    Args:
        scores: the batch's scores: `BlockScores`, ranked chunk by chunk of `item_chunk` items
            (`chunked_top_k`: memory O(b · item_chunk + b · max(ks))), or every item's score,
            float [b, n_items] (`topk.top_k_excluding`); both give the same lists.
        seen: CsrMatrix (b, n_items), the users' training items (excluded).
        relevant: CsrMatrix (b, n_items), the users' held-out items.
        ks: the cut-offs, each > 0.
        item_chunk: items scored at once for `BlockScores`; 0: `chunked_topk.item_chunk_for`.
    """
    ks = _check_ks(ks)
    if isinstance(scores, BlockScores):
        b, n_items = scores.n_rows, scores.n_items
    else:
        b, n_items = np.shape(scores)
    if seen.shape != (b, n_items) or relevant.shape != (b, n_items):
        raise ValueError(
            f"seen {seen.shape} and relevant {relevant.shape} must match the scores' {(b, n_items)}"
        )
    if isinstance(scores, BlockScores):
        ids, _ = chunked_topk.chunked_top_k(scores, seen, ks[-1], item_chunk)
    else:
        ids, _ = topk.top_k_excluding(scores, seen, ks[-1])
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
    return popularity_from_counts(train.col_counts())


def popularity_from_counts(item_counts: np.ndarray) -> np.ndarray:
    """`popularity_scores` from the item counts c_i (int [n_items]): float32 [n_items]."""
    return np.asarray(item_counts).astype(np.float32)


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
    item_chunk: int = 0,
) -> dict[str, float | int]:
    """Ranking metrics of a recommender on the held-out split, with training items excluded.

    For each batch of users with at least one held-out item, `score_fn` scores every item
    (chunk by chunk of items when it returns `BlockScores`), the user's training items are
    dropped and the max(ks) best kept (`batch_sums`), and the lists are scored against the
    held-out items (formulas in the module doc). Held-out items that also
    appear in the user's training row can never be hit; they are counted and logged as a
    warning, since the split should keep them disjoint.

    Args:
        score_fn: maps user ids int64 [b] to their scores: `BlockScores` (for factors:
            `factor_scorer(X, Y)`), or float [b, n_items].
        train: the training matrix, shape (n_users, n_items); its entries are excluded.
        heldout: the held-out matrix, same shape; its entries are the relevant items.
        ks: the cut-offs, each > 0.
        batch_size: users scored at once; memory is O(batch_size · item_chunk +
            batch_size · max(ks)) for `BlockScores`, else O(batch_size · n_items).
        progress: called after each batch as progress(users_done, users_total).
        users: int [n], the users to evaluate (e.g. `sample_users`); those without
            held-out items are skipped. Default: every user.
        item_chunk: items scored at once (`BlockScores` only); 0: automatic
            (`chunked_topk.item_chunk_for`). The result does not depend on it.

    Returns:
        A flat dict: for each k ascending, "recall@k", "ndcg@k", "map@k", "precision@k",
        "coverage@k" (floats), then "users_evaluated" (int, the users with >= 1 held-out item).
        Means over zero users are NaN.
    """
    sums = ranking_sums(score_fn, train, heldout, ks, batch_size, progress, users, item_chunk)
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
    item_chunk: int = 0,
) -> RankingSums:
    """The `RankingSums` that `evaluate` reports (same arguments), batch by batch, so that
    memory stays that of one batch (`evaluate`: batch_size) however many users are scored."""
    ks = _check_ks(ks)
    batch_size = positive_int(batch_size, "batch_size")
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
        scores = score_fn(batch)
        if isinstance(scores, BlockScores):
            shape = (scores.n_rows, scores.n_items)
        else:
            scores = np.asarray(scores)
            shape = scores.shape
        if shape != (batch.size, n_items):
            raise ValueError(
                f"score_fn returned shape {shape} for {batch.size} users, expected "
                f"{(batch.size, n_items)}"
            )
        seen, relevant = take_rows(train, batch), take_rows(heldout, batch)
        sums.merge(batch_sums(scores, seen, relevant, ks, item_chunk))
        done = min(start + batch_size, users.size)
        logger.debug("evaluated %d of %d users", done, users.size)
        if progress is not None:
            progress(done, int(users.size))
    return sums


def sample_users(heldout: CsrMatrix, n_users: int, seed: int) -> np.ndarray:
    """A seeded sample of n_users of the users with >= 1 held-out item: int64 [m], ascending,
    m = min(n_users, their number) (all of them when n_users >= their number)."""
    n_users = positive_int(n_users, "n_users")
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
    item_chunk: int = 0,
) -> dict[str, float | int]:
    """`evaluate` of the popularity baseline: every user scores item i as c_i (see
    `popularity_scores`), so each gets the most popular items not in its training row (the
    catalogue sorted once, `chunked_topk.popularity_order`, for every batch)."""
    scores = popularity_scores(train)
    order = chunked_topk.popularity_order(scores)  # one ranking for every batch

    def score_fn(user_ids: np.ndarray) -> BlockScores:
        return ConstantScores(scores, user_ids.size, order)

    return evaluate(score_fn, train, heldout, ks, batch_size, progress, item_chunk=item_chunk)
