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

The trainer's pipeline can apply `EvaluateBlocks` to its own blocks; `evaluate_model_distributed`
runs it as a pipeline of its own on a saved model and a preprocessed dataset.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from common import locations, staging, worker_threads
from trainer.beam import layout as blocks_lib
from trainer.beam.model_blocks import read_npy_rows
from trainer.core import metrics
from trainer.core.chunked_topk import ConstantScores, FactorScores
from trainer.core.sparse import CsrMatrix
from trainer.serving import model as model_lib
from transforms import examples, features

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


class _CombineSums(beam.CombineFn):
    """_Sums of blocks -> the metrics dict (as `metrics.evaluate`, with "rmse" first)."""

    def __init__(self, ks: tuple[int, ...], n_items: int, with_rmse: bool):
        self._ks, self._n_items, self._with_rmse = ks, n_items, with_rmse

    def create_accumulator(self):
        return _Sums(metrics.RankingSums.zero(self._ks, self._n_items))

    def add_input(self, accumulator, sums: _Sums):
        return accumulator.merge(sums)

    def merge_accumulators(self, accumulators):
        accumulators = iter(accumulators)
        total = next(accumulators)
        for other in accumulators:
            total.merge(other)
        return total

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


class _CountItems(beam.CombineFn):
    """EvalBlock -> c_i, int64 [n_items]: the training users of each item."""

    def __init__(self, n_items: int):
        self._n_items = n_items

    def create_accumulator(self):
        return np.zeros(self._n_items, dtype=np.int64)

    def add_input(self, counts, block: EvalBlock):
        return counts + block.train.col_counts()

    def merge_accumulators(self, accumulators):
        return sum(accumulators, np.zeros(self._n_items, dtype=np.int64))

    def extract_output(self, counts):
        return counts


class _PopularityBlock(beam.DoFn):
    """EvalBlock -> _Sums of the popularity baseline: every user scores item i as c_i (ranked
    `item_chunk` items at a time, as `block_sums`)."""

    def __init__(self, ks: tuple[int, ...], item_chunk: int = 0):
        self._ks, self._item_chunk = ks, item_chunk

    def process(self, block: EvalBlock, counts: np.ndarray):
        users = np.flatnonzero(block.heldout.row_counts() > 0)
        yield _Sums(
            metrics.batch_sums(
                ConstantScores(metrics.popularity_from_counts(counts), users.size),
                metrics.take_rows(block.train, users),
                metrics.take_rows(block.heldout, users),
                self._ks,
                self._item_chunk,
            )
        )


class EvaluatePopularity(beam.PTransform):
    """PCollection[EvalBlock] -> PCollection[dict] of one element: `metrics.evaluate_popularity`
    (the most popular unseen items for everyone), popularity counted from the blocks' train rows.
    """

    def __init__(self, n_items: int, ks: Sequence[int] = metrics.DEFAULT_KS, item_chunk: int = 0):
        super().__init__()
        self._n_items = n_items
        self._ks = tuple(sorted(set(ks)))
        self._item_chunk = item_chunk

    def expand(self, eval_blocks):
        counts = eval_blocks | "CountItems" >> beam.CombineGlobally(_CountItems(self._n_items))
        return (
            eval_blocks
            | "SumBlocks"
            >> beam.ParDo(
                _PopularityBlock(self._ks, self._item_chunk), beam.pvalue.AsSingleton(counts)
            )
            | "CombineSums" >> beam.CombineGlobally(_CombineSums(self._ks, self._n_items, False))
        )


# --- a pipeline of its own: a saved model on a preprocessed dataset ----------------------------


class _AssembleEvalBlock(beam.DoFn):
    """(block_id, {"train": rows, "heldout": rows, "ids": ...}) -> EvalBlock, with the block's
    user factors read from the model's user_factors.npy (or sliced from a model in memory)."""

    def __init__(self, source, block_rows: int, shape: tuple[int, int]):
        self._source = source  # a model directory, or user factors float32 [n_users, k]
        self._block_rows = block_rows
        self._shape = shape

    def process(self, element):
        block_id, grouped = element
        layout = blocks_lib.BlockLayout(self._shape[0], self._block_rows, interleaved=False)
        train = blocks_lib.assemble(0, block_id, list(grouped["train"]), layout, self._shape[1])
        heldout = blocks_lib.assemble(0, block_id, list(grouped["heldout"]), layout, self._shape[1])
        start, stop = blocks_lib.block_bounds(block_id, self._block_rows, self._shape[0])
        if self._source is None:  # blocks for fold-in (the gate's published model)
            factors = np.zeros((stop - start, 0), dtype=np.float32)
        elif isinstance(self._source, str):
            path = f"{self._source.rstrip('/')}/{model_lib.MODEL_SUBDIR}/user_factors.npy"
            factors = read_npy_rows(path, start, stop)
        else:
            factors = self._source[start:stop]
        yield EvalBlock(
            block_id, train.row_ids, factors.astype(np.float32), train.rows, heldout.rows
        )


def _key_by_block(record: bytes, block_rows: int):
    """A `key/indices/values` Example -> (block_id, (userId, itemIds int64 [n], ratings [n]))."""
    key, indices, values = examples.parse_sparse_example(record)
    indices = np.asarray(indices, dtype=np.int64)
    values = np.asarray(values, dtype=np.float32)
    return int(blocks_lib.contiguous_block_of(key, block_rows)), (int(key), indices, values)


def _read_rows(root, dataset_dir: str, split: str, block_rows: int, label: str):
    pattern = f"{dataset_dir}/{split}/{features.ITEMS_FOR_USER}-*{features.TFRECORD_SUFFIX}"
    return (
        root
        | f"Read{label}"
        >> beam.io.ReadFromTFRecord(pattern, compression_type=CompressionTypes.GZIP)
        | f"KeyByBlock{label}" >> beam.Map(_key_by_block, block_rows)
    )


class ReadEvalBlocks(beam.PTransform):
    """A preprocessed dataset's train and eval rows, with a model's user factors, as blocks.

    `model`: a model directory (each block reads its slice of user_factors.npy), user factors
    float32 [n_users, k] in memory, or None for blocks without factors ([b, 0]: the gate folds
    the published model's in, `trainer.evaluation.published_foldin`).

    Input: the pipeline root. Output: PCollection[EvalBlock], one per block of `block_rows`
    users (including users without held-out items).
    """

    def __init__(self, model, dataset_dir: str, shape: tuple[int, int], block_rows: int):
        super().__init__()
        self._model, self._dataset_dir = model, dataset_dir.rstrip("/")
        self._shape, self._block_rows = shape, block_rows

    def expand(self, root):
        block_rows = self._block_rows
        block_ids = (
            root
            | "BlockIds" >> beam.Create(range(blocks_lib.num_blocks(self._shape[0], block_rows)))
            | "KeyBlockIds" >> beam.Map(lambda block_id: (block_id, None))
        )
        train = _read_rows(root, self._dataset_dir, features.TRAIN_DIR, block_rows, "Train")
        heldout = _read_rows(root, self._dataset_dir, features.EVAL_DIR, block_rows, "Heldout")
        return (
            {"ids": block_ids, "train": train, "heldout": heldout}
            | "GroupRows" >> beam.CoGroupByKey()
            | "AssembleBlocks"
            >> beam.ParDo(_AssembleEvalBlock(self._model, block_rows, self._shape))
        )


def evaluate_model_distributed(
    model_dir_or_model: str | model_lib.WALSModel,
    dataset_dir: str,
    pipeline_options: PipelineOptions | list[str] | None = None,
    ks: Sequence[int] = metrics.DEFAULT_KS,
    block_rows: int = blocks_lib.DEFAULT_BLOCK_ROWS,
    item_chunk: int = 0,
) -> dict[str, dict[str, float | int]]:
    """The metrics of a saved model on a preprocessed dataset's eval split, from one Beam run.

    Args:
        model_dir_or_model: a trainer.task --output_dir (workers read their blocks' factors
            from it), or a loaded WALSModel (its user factors then travel with the pipeline:
            use a directory for large models).
        dataset_dir: the preprocessed dataset the model was trained on (`train/` and `eval/`
            items_for_user TFRecords).
        pipeline_options: Beam options (or their flags), e.g. the runner. The workers leave
            their results under --temp_location, else under the model directory
            (`common.locations.scratch_dir`); they are deleted once read.
        ks: the cut-offs.
        block_rows: users per block.
        item_chunk: items scored at once per block (0: automatic, `chunked_topk.item_chunk_for`);
            a block's scores peak at O(block_rows · item_chunk). The result does not depend on it.

    Returns:
        {"wals": {"rmse", "recall@k", ..., "users_evaluated"}, "popularity": {...}}, the
        "wals" and "popularity" entries of trainer.task's metrics.json.
    """
    if isinstance(model_dir_or_model, str):  # the launcher reads the arrays' headers only
        source = model_dir_or_model
        shape = (
            model_lib.array_shape(source, "user_factors")[0],
            model_lib.array_shape(source, "item_factors")[0],
        )
    else:
        model = model_dir_or_model
        shape = (len(model.users), len(model.items))
        source = np.asarray(model.user_factors, dtype=np.float32)
    if pipeline_options is None or isinstance(pipeline_options, list):
        pipeline_options = PipelineOptions(pipeline_options or [])
    scratch = locations.scratch_dir(
        pipeline_options, "evaluate", source if isinstance(source, str) else None
    )
    with (
        worker_threads.local_budget(pipeline_options),
        beam.Pipeline(options=pipeline_options) as pipeline,
    ):
        blocks = pipeline | "ReadEvalBlocks" >> ReadEvalBlocks(
            source, dataset_dir, shape, block_rows
        )
        if isinstance(source, str):
            path = f"{source.rstrip('/')}/{model_lib.MODEL_SUBDIR}/item_factors.npy"
            item_factors = (
                pipeline
                | "ItemFactorsPath" >> beam.Create([path])
                | "LoadItemFactors" >> beam.Map(lambda p: read_npy_rows(p).astype(np.float32))
            )
        else:
            factors = np.asarray(model.item_factors, dtype=np.float32)
            item_factors = pipeline | "ItemFactors" >> beam.Create([factors])
        evaluated = {
            "wals": blocks
            | "EvaluateModel" >> EvaluateBlocks(item_factors, shape[1], ks, item_chunk=item_chunk),
            "popularity": blocks
            | "EvaluatePopularity" >> EvaluatePopularity(shape[1], ks, item_chunk),
        }
        for name, result in evaluated.items():
            _ = (
                result
                | f"ToJson{name.title()}" >> beam.Map(json.dumps)
                | f"Write{name.title()}"
                >> beam.io.WriteToText(f"{scratch}/{name}", num_shards=1, shard_name_template="")
            )
    try:
        return {name: _read_json(f"{scratch}/{name}") for name in evaluated}
    finally:
        staging.delete_tree(scratch)


def _read_json(path: str) -> dict:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return json.loads(handle.read().decode("utf-8"))
