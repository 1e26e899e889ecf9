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

Where it runs: in this process by default (the dataset and both models loaded), or, given Beam
flags (the scheduled run's --distributed), on the runner: the candidate and popularity by the
distributed evaluation (`trainer.beam.eval_pipeline`), the published model by
`trainer.evaluation.published_foldin`, blockwise, with the same fold-in, chunked ranking and
sums; the launching process then reads only summary.json, config.json and the arrays' headers.
Both rank every user's items a chunk at a time (`trainer.core.chunked_topk`), so both give the
same decision.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from trainer.beam import eval_pipeline
from trainer.core import foldin, metrics
from trainer.evaluation import published_foldin
from trainer.local import dataset as data
from trainer.serving import model as model_lib
from transforms import dataset_info

logger = logging.getLogger(__name__)

PASS, REJECT = "pass", "reject"
DEFAULT_K = 20
DEFAULT_MIN_LIFT = 1.1
DEFAULT_TOLERANCE = 0.05


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


def published_scorer(published: model_lib.WALSModel, dataset: data.Dataset):
    """score_fn for `metrics.evaluate` of the published model on `dataset`, by fold-in.

    Returns:
        (score_fn, facts): score_fn maps dataset userIds int64 [b] to their
        `published_foldin.PublishedScores` over the dataset's items (ranked a chunk at a time);
        facts counts the content and the eval visitors the published model knows.
    """
    index = {content: i for i, content in enumerate(published.items)}
    item_map = np.array([index.get(c, -1) for c in dataset.items], dtype=np.int64)
    users = np.flatnonzero(dataset.heldout.row_counts() > 0).astype(np.int64)
    rows = published_foldin.map_rows(dataset.train, users, item_map, len(published.items))
    x = foldin.fold_in_rows(
        rows, published.item_factors, published.item_counts, published.wals_config()
    )
    position = np.full(dataset.train.shape[0], -1, dtype=np.int64)
    position[users] = np.arange(users.size)
    y = np.asarray(published.item_factors, dtype=np.float32)

    def score_fn(batch: np.ndarray) -> published_foldin.PublishedScores:
        return published_foldin.PublishedScores(x[position[batch]], y, item_map)

    facts = {
        "known_content": int((item_map >= 0).sum()),
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
    beam_argv: list[str] | None = None,
    item_chunk: int = 0,
) -> dict:
    """Scores the candidate, popularity and the published model; decides.

    Args:
        candidate_dir: the candidate's trainer.task --output_dir (trained on dataset_dir).
        dataset_dir: the candidate's preprocessed dataset (its eval split is the gate's data).
        published_dir: the published run's trainer.task --output_dir, or None.
        config: the thresholds.
        beam_argv: Beam pipeline flags to score on the runner (the scheduled run's
            --distributed): this process then reads only metadata (`_score_distributed`);
            None scores here, with the dataset and both models loaded (`_score_local`).
        item_chunk: items scored at once per block of users (0: `chunked_topk.item_chunk_for`).

    Returns:
        {"decision": "pass" | "reject", "reasons": [str], "k", "min_lift", "tolerance",
         "candidate": {recall@K, ndcg@K}, "popularity": {...}, "published": {...} | None,
         "published_from": str | None, "published_coverage": {...} | None}.
    """
    config.validate()
    score = _score_local if beam_argv is None else _score_distributed
    ours, baseline, theirs, coverage = score(
        candidate_dir, dataset_dir, published_dir, config.k, beam_argv, item_chunk
    )
    return _decide(config, ours, baseline, theirs, coverage, published_dir)


def _names(k: int) -> tuple[str, str]:
    return f"recall@{k}", f"ndcg@{k}"


def _pick(result: dict, k: int) -> dict:
    return {name: float(result[name]) for name in _names(k)} | {
        "users_evaluated": int(result["users_evaluated"])
    }


def _score_local(candidate_dir, dataset_dir, published_dir, k, beam_argv, item_chunk):
    """(candidate, popularity, published or None, coverage or None), scored in this process."""
    dataset = data.load_dataset(dataset_dir)
    if not dataset.heldout.nnz:
        raise ValueError(f"{dataset_dir} has no eval interactions: the gate has nothing to judge")
    candidate = model_lib.load(candidate_dir)
    if candidate.users != dataset.users or candidate.items != dataset.items:
        raise ValueError(f"{candidate_dir} was not trained on {dataset_dir} (vocabularies differ)")
    train, heldout = dataset.train, dataset.heldout
    scorer = metrics.factor_scorer(candidate.user_factors, candidate.item_factors)
    ours = _pick(metrics.evaluate(scorer, train, heldout, ks=(k,), item_chunk=item_chunk), k)
    baseline = _pick(metrics.evaluate_popularity(train, heldout, ks=(k,), item_chunk=item_chunk), k)
    if published_dir is None:
        return ours, baseline, None, None
    score_fn, coverage = published_scorer(model_lib.load(published_dir), dataset)
    theirs = metrics.evaluate(score_fn, train, heldout, ks=(k,), item_chunk=item_chunk)
    return ours, baseline, _pick(theirs, k), coverage


def _score_distributed(candidate_dir, dataset_dir, published_dir, k, beam_argv, item_chunk):
    """`_score_local`'s result from Beam runs on `beam_argv`'s runner: the candidate and
    popularity by `trainer.beam.eval_pipeline`, the published model by
    `published_foldin.score_published`; this process reads summary.json, config.json and the
    arrays' headers."""
    from apache_beam.options.pipeline_options import PipelineOptions

    summary = dataset_info.read_summary(dataset_dir)
    if not summary.get("eval_interactions"):
        raise ValueError(f"{dataset_dir} has no eval interactions: the gate has nothing to judge")
    shape = (
        model_lib.array_shape(candidate_dir, "user_factors")[0],
        model_lib.array_shape(candidate_dir, "item_factors")[0],
    )
    if shape != (summary["nusers"], summary["nitems"]):
        raise ValueError(
            f"{candidate_dir} was not trained on {dataset_dir} (it has {shape[0]} x {shape[1]} "
            f"rows, the dataset {summary['nusers']} x {summary['nitems']})"
        )
    options = PipelineOptions(beam_argv)
    evaluated = eval_pipeline.evaluate_model_distributed(
        candidate_dir, dataset_dir, options, ks=(k,), item_chunk=item_chunk
    )
    ours, baseline = _pick(evaluated["wals"], k), _pick(evaluated["popularity"], k)
    if published_dir is None:
        return ours, baseline, None, None
    theirs, coverage = published_foldin.score_published(
        published_dir, candidate_dir, dataset_dir, options, (k,), item_chunk
    )
    return ours, baseline, _pick(theirs, k), coverage


def _decide(
    config: GateConfig,
    ours: dict,
    baseline: dict,
    theirs: dict | None,
    coverage: dict | None,
    published_dir: str | None,
) -> dict:
    """The decision of the module doc from the three scorings."""
    names = _names(config.k)
    reasons = []
    recall = names[0]
    floor = config.min_lift * baseline[recall]
    if ours[recall] < floor:
        reasons.append(
            f"{recall} {ours[recall]:.4f} is below the floor {floor:.4f} "
            f"({config.min_lift} x popularity's {baseline[recall]:.4f})"
        )
    if theirs is not None:
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
        "k": config.k,
        "min_lift": config.min_lift,
        "tolerance": config.tolerance,
        "candidate": ours,
        "popularity": baseline,
        "published": theirs,
        "published_from": published_dir,
        "published_coverage": coverage,
    }
