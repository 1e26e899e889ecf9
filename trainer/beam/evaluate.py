"""Distributed evaluation: `trainer.core.metrics` summed over blocks of users in Beam.

    user blocks ─ EvaluateBlocks(item_factors) ─> {"rmse", "recall@k", ..., "users_evaluated"}

Each block scores its users against every item (Y a singleton side input; `topk.score`,
float32, bitwise the scores of the local evaluation), excludes their training items and adds
`metrics.batch_sums` of the block, exactly the per-batch sums the local `metrics.evaluate`
adds. The items are scored `item_chunk` at a time with a running top max(ks)
(`trainer.core.chunked_topk`), so an element of B users peaks at O(B · item_chunk + B · max(ks))
of scores, never B · n_items. A CombineFn merges the sums (`RankingSums.merge`; its coverage
holds one bool per item and cut-off) and the squared errors of the held-out cells for RMSE. The
result therefore equals the local evaluation of the same model whatever the block size, chunk
size or worker count (up to float round-off in the sums).

The trainer's pipeline can apply `EvaluateBlocks` to its own blocks;
`trainer.beam.eval_pipeline` reads the blocks of a preprocessed dataset (`ReadEvalBlocks`) and
runs both transforms as a pipeline of its own on a saved model (`evaluate_model_distributed`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from common import worker_threads
from trainer.beam.combiners import PartialSumsCombineFn
from trainer.core import metrics
from trainer.core.chunked_topk import ConstantScores, FactorScores, RankingCache
from trainer.core.sparse import CsrMatrix

logger = logging.getLogger(__name__)

_METRICS = "evaluate"


@dataclasses.dataclass(frozen=True)
class EvalBlock:
    """A block of users with what evaluating them needs.

    Attributes:
        block_id: the block's number.
        user_ids: int64 [b], the users' userIds (rows of the model).
        factors: float32 [b, k], the users' factors X_b.
        train: CsrMatrix (b, n_items), the users' training items (excluded from the lists).
        heldout: CsrMatrix (b, n_items), the users' held-out items and ratings.
    """

    block_id: int
    user_ids: np.ndarray
    factors: np.ndarray
    train: CsrMatrix
    heldout: CsrMatrix


@dataclasses.dataclass
class _Sums:
    """The accumulator: ranking sums, and Σ squared error and count of the held-out cells."""

    ranking: metrics.RankingSums
    squared_errors: float = 0.0
    cells: int = 0

    def merge(self, other: _Sums) -> _Sums:
        self.ranking.merge(other.ranking)
        self.squared_errors += other.squared_errors
        self.cells += other.cells
        return self


def block_sums(
    block: EvalBlock,
    item_factors: np.ndarray,
    ks: Sequence[int],
    with_rmse: bool = True,
    item_chunk: int = 0,
) -> _Sums:
    """The sums of one block: `metrics.batch_sums` of its users with >= 1 held-out item, scored
    X_b Yᵀ by `topk.score` as the local evaluation scores (`item_chunk` items at a time: peak
    O(B · item_chunk + B · max(ks)) for B users, 0: `chunked_topk.item_chunk_for`), and their
    held-out cells' squared errors."""
    users = np.flatnonzero(block.heldout.row_counts() > 0)
    relevant = metrics.take_rows(block.heldout, users)
    scores = FactorScores(block.factors[users], item_factors)
    seen = metrics.take_rows(block.train, users)
    sums = _Sums(metrics.batch_sums(scores, seen, relevant, ks, item_chunk))
    if with_rmse and relevant.nnz:
        rows = users[relevant.row_ids()]
        predicted = np.einsum(
            "ij,ij->i", block.factors[rows], item_factors[relevant.indices.astype(np.int64)]
        )
        sums.squared_errors, sums.cells = metrics.squared_error_sums(predicted, relevant.values)
    return sums


class _CombineSums(PartialSumsCombineFn):
    """_Sums of blocks -> the metrics dict (as `metrics.evaluate`, with "rmse" first)."""

    def __init__(self, ks: tuple[int, ...], n_items: int, with_rmse: bool):
        self._ks, self._n_items, self._with_rmse = ks, n_items, with_rmse

    def create_accumulator(self):
        return _Sums(metrics.RankingSums.zero(self._ks, self._n_items))

    def add_input(self, accumulator, sums: _Sums):
        return accumulator.merge(sums)

    def extract_output(self, accumulator):
        metrics.warn_overlap(accumulator.ranking)
        out = {}
        if self._with_rmse:
            cells = accumulator.cells
            rmse = metrics.rmse_from_sums(accumulator.squared_errors, cells) if cells else np.nan
            out["rmse"] = float(rmse)
        return {**out, **accumulator.ranking.result()}


class _BlockSums(beam.DoFn):
    def __init__(self, ks: tuple[int, ...], with_rmse: bool, item_chunk: int = 0):
        self._ks, self._with_rmse, self._item_chunk = ks, with_rmse, item_chunk
        self._users = Metrics.counter(_METRICS, "users_evaluated")
        self._blocks = Metrics.counter(_METRICS, "blocks")

    def setup(self):
        worker_threads.apply_in_worker()  # this worker's BLAS pool

    def process(self, block: EvalBlock, item_factors: np.ndarray):
        sums = block_sums(block, item_factors, self._ks, self._with_rmse, self._item_chunk)
        self._blocks.inc()
        self._users.inc(sums.ranking.users)
        yield sums


class EvaluateBlocks(beam.PTransform):
    """PCollection[EvalBlock] -> PCollection[dict[str, float | int]] of one element: "rmse",
    then for each k "recall@k", "ndcg@k", "map@k", "precision@k", "coverage@k", then
    "users_evaluated", equal to `{"rmse": metrics.rmse(...), **metrics.evaluate(...)}`.

    Args:
        item_factors: PCollection[np.ndarray] of one element, Y float32 [n_items, k].
        n_items: the number of items (for coverage).
        ks: the cut-offs.
        with_rmse: also compute "rmse" of the held-out cells (x_u · y_i against r_ui).
        item_chunk: items scored at once per block (`block_sums`); 0: automatic.
    """

    def __init__(
        self,
        item_factors,
        n_items: int,
        ks: Sequence[int] = metrics.DEFAULT_KS,
        with_rmse: bool = True,
        item_chunk: int = 0,
    ):
        super().__init__()
        self._item_factors = item_factors
        self._n_items = n_items
        self._ks = tuple(sorted(set(ks)))
        self._with_rmse = with_rmse
        self._item_chunk = item_chunk

    def expand(self, eval_blocks):
        return (
            eval_blocks
            | "SumBlocks"
            >> beam.ParDo(
                _BlockSums(self._ks, self._with_rmse, self._item_chunk),
                beam.pvalue.AsSingleton(self._item_factors),
            )
            | "CombineSums"
            >> beam.CombineGlobally(_CombineSums(self._ks, self._n_items, self._with_rmse))
        )


class _PopularityBlock(beam.DoFn):
    """EvalBlock -> _Sums of the popularity baseline: every user scores item i as c_i, each
    user's list walking one ranking of the catalogue (`chunked_topk.ConstantScores`), sorted
    once per worker while the counts side input stays the same (`RankingCache`)."""

    def __init__(self, ks: tuple[int, ...], item_chunk: int = 0):
        self._ks, self._item_chunk = ks, item_chunk
        self._rankings = RankingCache()

    def process(self, block: EvalBlock, counts: np.ndarray):
        users = np.flatnonzero(block.heldout.row_counts() > 0)
        popular = metrics.popularity_from_counts(counts)
        yield _Sums(
            metrics.batch_sums(
                ConstantScores(popular, users.size, self._rankings.order(counts)),
                metrics.take_rows(block.train, users),
                metrics.take_rows(block.heldout, users),
                self._ks,
                self._item_chunk,
            )
        )


class EvaluatePopularity(beam.PTransform):
    """PCollection[EvalBlock] -> PCollection[dict] of one element: `metrics.evaluate_popularity`
    (the most popular unseen items for everyone).

    Args:
        item_counts: PCollection of one element, c_i int64 [n_items]: the training users of each
            item (`eval_pipeline.ReadEvalBlocks(count_items=True)` counts them from the train
            rows; counted from the blocks themselves, the ranking could only start once every
            block was assembled).
        n_items: the number of items.
        ks: the cut-offs.
        item_chunk: items ranked at once per block (`block_sums`); 0: automatic.
    """

    def __init__(
        self, item_counts, n_items: int, ks: Sequence[int] = metrics.DEFAULT_KS, item_chunk: int = 0
    ):
        super().__init__()
        self._item_counts = item_counts
        self._n_items = n_items
        self._ks = tuple(sorted(set(ks)))
        self._item_chunk = item_chunk

    def expand(self, eval_blocks):
        return (
            eval_blocks
            | "SumBlocks"
            >> beam.ParDo(
                _PopularityBlock(self._ks, self._item_chunk),
                beam.pvalue.AsSingleton(self._item_counts),
            )
            | "CombineSums" >> beam.CombineGlobally(_CombineSums(self._ks, self._n_items, False))
        )
