"""The quality gate of scheduled runs: the candidate against the published model, as TFX's
Evaluator blesses a model before its Pusher publishes it.

Both models are scored on the same data, the candidate's eval split, with the same code
(`trainer.core.metrics.evaluate`, every visitor's training items excluded):

- the candidate by its own factors: scores[u] = x_u · Yᵀ (`metrics.factor_scorer`, the scores
  and lists of metrics.json and batch prediction: `trainer.core.topk`);
- the published model by fold-in: each eval visitor's training row (the candidate's train split,
  its contentIds mapped into the published vocabulary, its ratings as preprocessed) is solved
  against the published item factors (WALS's row projection, all rows in one batched solve:
  `trainer.core.foldin.fold_in_rows`, whose problem states the equations), so visitors it never
  saw count too; content it does not know can never be recommended by it and scores lowest;
- the popularity baseline, which ranks content by its number of training visitors.

A candidate is blessed when both hold:

    floor:           recall@K(candidate) >= min_lift · recall@K(popularity)
    non-regression:  m(candidate) >= (1 - tolerance) · m(published), m in {recall@K, ndcg@K}

With nothing published yet, only the floor applies.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from trainer.core import foldin, metrics, topk
from trainer.core.sparse import CsrMatrix
from trainer.local import dataset as data
from trainer.serving import model as model_lib

logger = logging.getLogger(__name__)

PASS, REJECT = "pass", "reject"
DEFAULT_K = 20
DEFAULT_MIN_LIFT = 1.1
DEFAULT_TOLERANCE = 0.05
_UNKNOWN_SCORE = np.float32(-1e30)  # content the published model cannot recommend


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """The thresholds (see the module docstring).

    Attributes:
        k: the cut-off K of Recall@K and NDCG@K.
        min_lift: the floor, as a ratio to popularity's Recall@K.
        tolerance: the largest relative drop from the published model's metrics allowed.
    """

    k: int = DEFAULT_K
    min_lift: float = DEFAULT_MIN_LIFT
    tolerance: float = DEFAULT_TOLERANCE

    def validate(self) -> None:
        if self.k < 1:
            raise ValueError(f"--gate_k must be >= 1, got {self.k}")
        if self.min_lift < 0:
            raise ValueError(f"--gate_min_lift must be >= 0, got {self.min_lift}")
        if not 0 <= self.tolerance < 1:
            raise ValueError(f"--gate_tolerance must be in [0, 1), got {self.tolerance}")


def _rows_in_vocabulary(
    train: CsrMatrix, users: np.ndarray, item_map: np.ndarray, n_items: int
) -> CsrMatrix:
    """The train rows of `users`, columns mapped by item_map (-1: dropped), sorted per row.

    Returns:
        [len(users), n_items] CsrMatrix in the target vocabulary's item indices.
    """
    rows = metrics.take_rows(train, users)
    row_ids = np.repeat(np.arange(users.size), rows.row_counts())
    mapped = item_map[rows.indices]
    keep = mapped >= 0
    row_ids, mapped, values = row_ids[keep], mapped[keep], rows.values[keep]
    order = np.lexsort((mapped, row_ids))
    counts = np.bincount(row_ids, minlength=users.size)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return CsrMatrix(
        indptr,
        mapped[order].astype(np.int64),
        values[order].astype(np.float32),
        (users.size, n_items),
    )


def published_scorer(published: model_lib.WALSModel, dataset: data.Dataset):
    """score_fn for `metrics.evaluate` of the published model on `dataset`, by fold-in.

    Returns:
        (score_fn, facts): score_fn maps dataset userIds int64 [b] to float32 [b, n_items of
        the dataset]; facts counts the content the published model knows.
    """
    index = {content: i for i, content in enumerate(published.items)}
    item_map = np.array([index.get(c, -1) for c in dataset.items], dtype=np.int64)
    known = item_map >= 0
    users = np.flatnonzero(dataset.heldout.row_counts() > 0).astype(np.int64)
    rows = _rows_in_vocabulary(dataset.train, users, item_map, len(published.items))
    x = foldin.fold_in_rows(
        rows, published.item_factors, published.item_counts, published.wals_config()
    )
    position = np.full(dataset.train.shape[0], -1, dtype=np.int64)
    position[users] = np.arange(users.size)
    y = np.zeros((len(dataset.items), published.item_factors.shape[1]), np.float32)
    y[known] = published.item_factors[item_map[known]]

    def score_fn(batch: np.ndarray) -> np.ndarray:
        scores = topk.score(x[position[batch]], y)
        scores[:, ~known] = _UNKNOWN_SCORE
        return scores

    facts = {
        "known_content": int(known.sum()),
        "content": len(dataset.items),
        "known_visitors": sum(published.user_index(dataset.users[u]) is not None for u in users),
        "eval_visitors": int(users.size),
    }
    return score_fn, facts


def _drop(candidate: float, baseline: float) -> float:
    return 0.0 if baseline <= 0 else (baseline - candidate) / baseline


def evaluate(
    candidate_dir: str,
    dataset_dir: str,
    published_dir: str | None,
    config: GateConfig,
) -> dict:
    """Scores the candidate, popularity and the published model; decides.

    Args:
        candidate_dir: the candidate's trainer.task --output_dir (trained on dataset_dir).
        dataset_dir: the candidate's preprocessed dataset (its eval split is the gate's data).
        published_dir: the published run's trainer.task --output_dir, or None.
        config: the thresholds.

    Returns:
        {"decision": "pass" | "reject", "reasons": [str], "k", "min_lift", "tolerance",
         "candidate": {recall@K, ndcg@K}, "popularity": {...}, "published": {...} | None,
         "published_from": str | None, "published_coverage": {...} | None}.
    """
    config.validate()
    dataset = data.load_dataset(dataset_dir)
    if not dataset.heldout.nnz:
        raise ValueError(f"{dataset_dir} has no eval interactions: the gate has nothing to judge")
    candidate = model_lib.load(candidate_dir)
    if candidate.users != dataset.users or candidate.items != dataset.items:
        raise ValueError(f"{candidate_dir} was not trained on {dataset_dir} (vocabularies differ)")
    k = config.k
    names = (f"recall@{k}", f"ndcg@{k}")

    def pick(result: dict) -> dict:
        return {name: float(result[name]) for name in names} | {
            "users_evaluated": int(result["users_evaluated"])
        }

    train, heldout = dataset.train, dataset.heldout
    ours = pick(
        metrics.evaluate(
            metrics.factor_scorer(candidate.user_factors, candidate.item_factors),
            train,
            heldout,
            ks=(k,),
        )
    )
    baseline = pick(metrics.evaluate_popularity(train, heldout, ks=(k,)))
    reasons = []
    recall = names[0]
    floor = config.min_lift * baseline[recall]
    if ours[recall] < floor:
        reasons.append(
            f"{recall} {ours[recall]:.4f} is below the floor {floor:.4f} "
            f"({config.min_lift} x popularity's {baseline[recall]:.4f})"
        )
    theirs, coverage = None, None
    if published_dir is not None:
        score_fn, coverage = published_scorer(model_lib.load(published_dir), dataset)
        theirs = pick(metrics.evaluate(score_fn, train, heldout, ks=(k,)))
        for name in names:
            drop = _drop(ours[name], theirs[name])
            if drop > config.tolerance:
                reasons.append(
                    f"{name} {ours[name]:.4f} is {100 * drop:.1f}% below the published "
                    f"model's {theirs[name]:.4f} (tolerance {100 * config.tolerance:.1f}%)"
                )
    decision = REJECT if reasons else PASS
    logger.info(
        "gate: %s; candidate %s, popularity %s, published %s%s",
        decision,
        ours,
        baseline,
        theirs,
        "".join(f"\n  {reason}" for reason in reasons),
    )
    return {
        "decision": decision,
        "reasons": reasons,
        "k": k,
        "min_lift": config.min_lift,
        "tolerance": config.tolerance,
        "candidate": ours,
        "popularity": baseline,
        "published": theirs,
        "published_from": published_dir,
        "published_coverage": coverage,
    }
