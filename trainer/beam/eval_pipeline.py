"""Distributed evaluation as a pipeline of its own: a saved model on a preprocessed dataset.

    root ─ ReadEvalBlocks(model, dataset_dir) ─> PCollection[EvalBlock]
         ─ EvaluateBlocks / EvaluatePopularity (`trainer.beam.evaluate`) ─> metrics dicts

`ReadEvalBlocks` groups the dataset's `train/` and `eval/` items_for_user rows by contiguous
block of `block_rows` users (packed within each bundle before the shuffle,
`trainer.beam.row_groups`), counts the training users of each item from the packed train rows
for the popularity baseline (`count_items`), and assembles each block with its slice of the
model's user factors (read from user_factors.npy by the worker, sliced from a model in memory,
or [b, 0] for fold-in: `trainer.evaluation.published_foldin`). `evaluate_model_distributed`
runs it with the per-block sums of `trainer.beam.evaluate` and returns trainer.task's "wals"
and "popularity" metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.options.pipeline_options import PipelineOptions

from common import locations, staging, worker_threads
from common.worker_json import WriteJson, read_json
from trainer.beam import layout as blocks_lib
from trainer.beam import row_groups
from trainer.beam.combiners import CountsCombineFn
from trainer.beam.evaluate import EvalBlock, EvaluateBlocks, EvaluatePopularity
from trainer.beam.model_blocks import read_npy_rows
from trainer.core import metrics
from trainer.serving import model as model_lib
from transforms import features

logger = logging.getLogger(__name__)


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
        train = blocks_lib.assemble(0, block_id, grouped["train"], layout, self._shape[1])
        heldout = blocks_lib.assemble(0, block_id, grouped["heldout"], layout, self._shape[1])
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


def _rows_pattern(dataset_dir: str, split: str) -> str:
    return f"{dataset_dir}/{split}/{features.ITEMS_FOR_USER}-*{features.TFRECORD_SUFFIX}"


class _CountPackedItems(CountsCombineFn):
    """(block_id, packed rows) -> c_i, int64 [n_items]: the rows holding each item."""

    def add_input(self, counts, element):
        items, users = np.unique(row_groups.unpack_arrays(element[1])[2], return_counts=True)
        counts[items] += users  # a row holds an item at most once
        return counts


class ReadEvalBlocks(beam.PTransform):
    """A preprocessed dataset's train and eval rows, with a model's user factors, as blocks.

    `model`: a model directory (each block reads its slice of user_factors.npy), user factors
    float32 [n_users, k] in memory, or None for blocks without factors ([b, 0]: the gate folds
    the published model's in, `trainer.evaluation.published_foldin`).

    Input: the pipeline root. Output: PCollection[EvalBlock], one per block of `block_rows`
    users (including users without held-out items); with `count_items`, the pair (blocks,
    PCollection of one element: c_i int64 [n_items], the training users of each item, counted
    from the train rows before they are grouped). A ranking that needs the counts as a side
    input then fuses with the blocks' assembly: counted from the blocks themselves, it could
    only start once every block was assembled, and the runner would keep every block meanwhile.
    """

    def __init__(
        self,
        model,
        dataset_dir: str,
        shape: tuple[int, int],
        block_rows: int,
        count_items: bool = False,
    ):
        super().__init__()
        self._model, self._dataset_dir = model, dataset_dir.rstrip("/")
        self._shape, self._block_rows = shape, block_rows
        self._count_items = count_items

    def expand(self, root):
        layout = blocks_lib.BlockLayout(self._shape[0], self._block_rows, interleaved=False)
        packed = {
            tag: root
            | f"Read{tag.title()}"
            >> beam.io.ReadFromTFRecord(
                _rows_pattern(self._dataset_dir, split), compression_type=CompressionTypes.GZIP
            )
            | f"Pack{tag.title()}" >> row_groups.PackRows(layout, "evaluate_rows")
            for tag, split in (("train", features.TRAIN_DIR), ("heldout", features.EVAL_DIR))
        }
        blocks = (
            packed
            | "GroupRows" >> row_groups.GroupRowsByBlock(layout.n_blocks)
            | "AssembleBlocks"
            >> beam.ParDo(_AssembleEvalBlock(self._model, self._block_rows, self._shape))
        )
        if not self._count_items:
            return blocks
        counts = packed["train"] | "CountItems" >> beam.CombineGlobally(
            _CountPackedItems(self._shape[1])
        )
        return blocks, counts


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
        blocks, item_counts = pipeline | "ReadEvalBlocks" >> ReadEvalBlocks(
            source, dataset_dir, shape, block_rows, count_items=True
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
            | "EvaluatePopularity" >> EvaluatePopularity(item_counts, shape[1], ks, item_chunk),
        }
        for name, result in evaluated.items():
            _ = result | f"Write{name.title()}" >> WriteJson(f"{scratch}/{name}")
    try:
        return {name: read_json(f"{scratch}/{name}") for name in evaluated}
    finally:
        staging.delete_tree(scratch)
