r"""Distributed batch prediction: `python -m trainer.batch_predict --distributed [Beam flags]`.

The same predictions as the local `trainer.batch_predict`, line for line, from a Beam pipeline
whose elements are blocks of users (block = userId // block_rows, `trainer.beam.layout`):

    ReadUserBlocks (`trainer.beam.model_blocks`) ─> UserBlock: X_b [b, k] and seen rows
        ─ PredictForUsers (Y = item factors, singleton side input) ─> lines
            top-K of X_b Yᵀ per user, seen items excluded
          or, with --targeting, PredictForContent:
            partial top-K users per item within the block, merged per item block by a
            CombinePerKey (`topk.merge_top_k`: exact, the global top K lies in the union of the
            blocks' top Ks)
        ─ WriteToText: <output>/predictions-SSSSS-of-NNNNN.tsv (or .jsonl)

Scores and lists are `trainer.core.topk`'s (float32 x_u · y_i, bitwise the same whatever the
block size; ties to the lower ID), as locally, ranked by `trainer.core.chunked_topk`: a block
of B visitors is scored `item_chunk` contents at a time with a running top K, so an element's
scores peak at O(B · item_chunk + B · K), never B · n_items (with --targeting, an item block of
block_rows contents is scored against the B visitors `item_chunk` visitors at a time). Lines
are formatted by `predictions.format_line`; every TSV shard starts with the header line, so
each shard is a predictions file `predictions.read_predictions` (or pandas) reads on its own.

Each worker holds the item factors ([n_items, k] float32) and the content vocabulary; user
factors and visitor IDs travel only in blocks. The output directory is staged
(`common.staging`): the shards and `predictions.json` (the completion marker: format, k,
targeting, lines, shards) appear only when the whole run succeeded. Its `lines` is an exact
count carried as pipeline output (`common.counts`: the formatting steps emit their bundle's count
and one CombineGlobally sums them), not a Beam metric, which a runner without committed metrics
reports as attempted, counting retried bundles twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from common import counts, staging, worker_threads
from trainer.beam import layout as blocks_lib
from trainer.beam.model_blocks import (
    ReadUserBlocks,
    UserBlock,
    load_vocabulary,
    model_file,
    npy_rows,
    read_npy_rows,
)
from trainer.core import topk
from trainer.core.chunked_topk import FactorScores, chunked_top_k
from trainer.serving import predictions

logger = logging.getLogger(__name__)

MARKER = "predictions.json"
SHARD_PREFIX = "predictions"
SHARD_TEMPLATE = "-SSSSS-of-NNNNN"
LINES_TAG = "lines"
COUNTS_DIR = "tmp"  # Under the staged output; removed before it is published.
_METRICS = "batch_predict"


@dataclasses.dataclass(frozen=True)
class PredictSpec:
    """What to predict; everything a worker needs, picklable.

    Attributes:
        model_dir: a trainer.task --output_dir (its `model/` subdirectory holds the files).
        k: recommendations per line, > 0.
        targeting: top-K visitors per content instead of top-K content per visitor.
        output_format: "tsv" or "jsonl".
        block_rows: users per block.
        item_chunk: candidates scored at once per block (contents; visitors with targeting);
            0: automatic (`chunked_topk.item_chunk_for`). The lines do not depend on it.
    """

    model_dir: str
    k: int = 10
    targeting: bool = False
    output_format: str = "tsv"
    block_rows: int = blocks_lib.DEFAULT_BLOCK_ROWS
    item_chunk: int = 0

    def path(self, name: str) -> str:
        """The path of one of the model's files."""
        return model_file(self.model_dir, name)


# --- predicting --------------------------------------------------------------------------------


class _CountingFn(beam.DoFn):
    """A DoFn that counts its lines per bundle (`common.counts.BundleCounts`): "lines" and
    "lines_shorter_than_k", emitted to COUNTS_TAG when the bundle ends."""

    def __init__(self, spec: PredictSpec):
        self._spec = spec
        self._counts = counts.BundleCounts(_METRICS)

    def start_bundle(self):
        self._counts.reset()

    def finish_bundle(self):
        yield from self._counts.outputs()


class _PredictForUsers(_CountingFn):
    """UserBlock -> str lines: top-K unseen content per visitor, `predictions.format_line`."""

    def setup(self):
        worker_threads.apply_in_worker()  # this worker's BLAS pool

    def process(self, block: UserBlock, item_factors: np.ndarray, items: list[str]):
        spec = self._spec
        scores = FactorScores(block.factors, item_factors)
        ids, top = chunked_top_k(scores, block.seen, spec.k, spec.item_chunk)
        short = 0
        for row, visitor in enumerate(block.visitor_ids):
            valid = ids[row] >= 0
            short += not valid.all()
            ranked = [items[i] for i in ids[row][valid]]
            yield predictions.format_line(
                visitor, ranked, top[row][valid].tolist(), False, spec.output_format
            )
        self._counts.inc("lines", len(block.visitor_ids))
        self._counts.inc("lines_shorter_than_k", short)


@dataclasses.dataclass
class _TopUsers:
    """The best users so far for the items of one item block, best first.

    Attributes:
        ids: int64 [m, k], userIds (-1 past the candidates found).
        scores: float32 [m, k] (-inf past them).
        names: object [m, k], the visitorIds (None past them).
    """

    ids: np.ndarray
    scores: np.ndarray
    names: np.ndarray

    def merge(self, other: _TopUsers) -> _TopUsers:
        """The best k of both (`topk.merge_positions`: score descending, then lower userId)."""
        k = self.ids.shape[1]
        ids = np.concatenate([self.ids, other.ids], axis=1)
        scores = np.concatenate([self.scores, other.scores], axis=1)
        names = np.concatenate([self.names, other.names], axis=1)
        order = topk.merge_positions(ids, scores, k)
        return _TopUsers(
            np.take_along_axis(ids, order, axis=1),
            np.take_along_axis(scores, order, axis=1),
            np.take_along_axis(names, order, axis=1),
        )


class _PartialTopUsers(beam.DoFn):
    """UserBlock -> (item_block, _TopUsers) for every item block: each item's top-K users
    within this block, the users who have seen the item excluded."""

    def __init__(self, spec: PredictSpec):
        self._spec = spec

    def setup(self):
        worker_threads.apply_in_worker()  # this worker's BLAS pool

    def process(self, block: UserBlock, item_factors: np.ndarray):
        spec = self._spec
        seen_by_item = block.seen.transpose()  # (n_items, b)
        names = np.array(list(block.visitor_ids) + [None], dtype=object)
        n_items = item_factors.shape[0]
        for item_block in range(blocks_lib.num_blocks(n_items, spec.block_rows)):
            start, stop = blocks_lib.block_bounds(item_block, spec.block_rows, n_items)
            scores = FactorScores(item_factors[start:stop], block.factors)
            seen = seen_by_item.row_slice(start, stop)
            local, top = chunked_top_k(scores, seen, spec.k, spec.item_chunk)
            ids = np.where(local >= 0, local + block.start, -1)
            yield item_block, _TopUsers(ids, top, names[local])  # names[-1] is None


class _MergeTopUsers(beam.CombineFn):
    """_TopUsers of one item block from many user blocks -> the item block's global top K."""

    def create_accumulator(self):
        return None

    def add_input(self, accumulator, top: _TopUsers):
        return top if accumulator is None else accumulator.merge(top)

    def merge_accumulators(self, accumulators):
        merged = None
        for accumulator in accumulators:
            if accumulator is not None:
                merged = accumulator if merged is None else merged.merge(accumulator)
        return merged

    def extract_output(self, accumulator):
        return accumulator


class _FormatContentLines(_CountingFn):
    """(item_block, _TopUsers) -> str lines, one per content of the block."""

    def process(self, element, items: list[str]):
        item_block, top = element
        start = item_block * self._spec.block_rows
        short = 0
        for row in range(top.ids.shape[0]):
            valid = top.ids[row] >= 0
            short += not valid.all()
            yield predictions.format_line(
                items[start + row],
                list(top.names[row][valid]),
                top.scores[row][valid].tolist(),
                True,
                self._spec.output_format,
            )
        self._counts.inc("lines", top.ids.shape[0])
        self._counts.inc("lines_shorter_than_k", short)


class PredictForUsers(beam.PTransform):
    """PCollection[UserBlock] -> each visitor's line (top-K unseen content).

    Output: a DoOutputsTuple with
        lines: PCollection[str];
        counts: PCollection[dict[str, int]], exact counts "lines" and "lines_shorter_than_k"
            (also Beam counters, namespace 'batch_predict').

    Args:
        spec: what to predict.
        item_factors: PCollection[np.ndarray] of one element, Y float32 [n_items, k].
        items: PCollection[list[str]] of one element, the content vocabulary.
    """

    def __init__(self, spec: PredictSpec, item_factors, items):
        super().__init__()
        self._spec, self._item_factors, self._items = spec, item_factors, items

    def expand(self, user_blocks):
        return user_blocks | "TopContentPerVisitor" >> beam.ParDo(
            _PredictForUsers(self._spec),
            beam.pvalue.AsSingleton(self._item_factors),
            beam.pvalue.AsSingleton(self._items),
        ).with_outputs(counts.COUNTS_TAG, main=LINES_TAG)


class PredictForContent(beam.PTransform):
    """PCollection[UserBlock] -> each content's line (top-K visitors who have not seen it), for
    --targeting.

    Output and Args: as `PredictForUsers`.
    """

    def __init__(self, spec: PredictSpec, item_factors, items):
        super().__init__()
        self._spec, self._item_factors, self._items = spec, item_factors, items

    def expand(self, user_blocks):
        return (
            user_blocks
            | "TopVisitorsPerBlock"
            >> beam.ParDo(_PartialTopUsers(self._spec), beam.pvalue.AsSingleton(self._item_factors))
            | "MergeTopVisitors" >> beam.CombinePerKey(_MergeTopUsers())
            | "FormatContentLines"
            >> beam.ParDo(
                _FormatContentLines(self._spec), beam.pvalue.AsSingleton(self._items)
            ).with_outputs(counts.COUNTS_TAG, main=LINES_TAG)
        )


def build_pipeline(
    pipeline: beam.Pipeline, spec: PredictSpec, output_prefix: str, counts_path: str
) -> None:
    """Adds the whole prediction to `pipeline`: read blocks, predict, write shards under
    `output_prefix` + SHARD_TEMPLATE + ".tsv" (or ".jsonl") and the counts of their lines to
    `counts_path` (`common.counts.WriteCounts`: {"lines": n, "lines_shorter_than_k": m},
    zeros left out)."""
    n_items = npy_rows(spec.path("item_factors.npy"))
    model_files = pipeline | "ModelFiles" >> beam.Create(
        [(spec.path("item_factors.npy"), spec.path("vocab_items.txt"))]
    )
    item_factors = model_files | "LoadItemFactors" >> beam.Map(
        lambda paths: read_npy_rows(paths[0]).astype(np.float32)
    )
    items = model_files | "LoadContentVocabulary" >> beam.Map(
        lambda paths: _checked_vocabulary(paths[1], n_items)
    )
    predict = PredictForContent if spec.targeting else PredictForUsers
    header = predictions.header_line(spec.targeting, spec.output_format)
    predicted = (
        pipeline
        | "ReadUserBlocks" >> ReadUserBlocks(spec.model_dir, spec.block_rows, n_items)
        | "Predict" >> predict(spec, item_factors, items)
    )
    _ = (predicted[counts.COUNTS_TAG],) | "WriteCounts" >> counts.WriteCounts(counts_path)
    _ = predicted[LINES_TAG] | "WriteShards" >> beam.io.WriteToText(
        output_prefix,
        file_name_suffix=f".{spec.output_format}",
        append_trailing_newlines=False,  # format_line ends each line with '\n'
        shard_name_template=SHARD_TEMPLATE,
        header=header,
    )


def _check_model(spec: PredictSpec) -> None:
    """Raises FileNotFoundError or ValueError before any pipeline starts."""
    if not FileSystems.exists(spec.path("config.json")):
        raise FileNotFoundError(f"no trained model under {spec.model_dir}")
    n_users = npy_rows(spec.path("user_factors.npy"))
    npy_rows(spec.path("item_factors.npy"))  # present and readable
    if npy_rows(spec.path("seen_indptr.npy")) != n_users + 1:
        raise ValueError(f"{spec.model_dir}: seen_indptr does not have {n_users + 1} entries")


def _checked_vocabulary(path: str, n_items: int) -> list[str]:
    """The content vocabulary, read on a worker (the launcher reads only the arrays' headers).

    Raises:
        ValueError: it does not hold one ID per row of the item factors.
    """
    items = load_vocabulary(path)
    if len(items) != n_items:
        raise ValueError(f"{path} has {len(items)} IDs, the item factors {n_items} rows")
    return items


def write_predictions(spec: PredictSpec, output_dir: str, beam_argv: list[str]) -> int:
    """Runs the distributed prediction and publishes `output_dir` (replacing an earlier
    prediction output of ours, never anything else).

    Args:
        spec: what to predict.
        output_dir: the directory of shards to write (local or any Beam filesystem).
        beam_argv: Beam pipeline flags (--runner, --direct_num_workers, --temp_location, ...).

    Returns:
        The number of lines written after the headers (visitors, or contents with targeting).

    Raises:
        FileNotFoundError: no model under spec.model_dir.
        staging.OutputExistsError: output_dir holds something else.
    """
    if spec.output_format not in predictions.FORMATS:
        raise ValueError(f"unknown format {spec.output_format!r}")
    if spec.k <= 0 or spec.block_rows <= 0:
        raise ValueError(f"k and block_rows must be > 0, got {spec.k} and {spec.block_rows}")
    if spec.item_chunk < 0:
        raise ValueError(f"item_chunk must be >= 0, got {spec.item_chunk}")
    _check_model(spec)
    with staging.staged_output(output_dir, overwrite=True, marker=MARKER) as staged:
        options = PipelineOptions(beam_argv)
        pipeline = beam.Pipeline(options=options)
        counts_path = f"{staged}/{COUNTS_DIR}/counts.json"
        build_pipeline(pipeline, spec, f"{staged}/{SHARD_PREFIX}", counts_path)
        with worker_threads.local_budget(options):
            result = pipeline.run()
            result.wait_until_finish()
        lines = counts.read_counts(counts_path).get("lines", 0)
        staging.delete_tree(f"{staged}/{COUNTS_DIR}")
        shards = sorted(
            m.path.rsplit("/", 1)[-1]
            for m in FileSystems.match([f"{staged}/{SHARD_PREFIX}-*"])[0].metadata_list
        )
        manifest = {
            "format": spec.output_format,
            "targeting": spec.targeting,
            "k": spec.k,
            "lines": lines,
            "shards": shards,
            "model_dir": spec.model_dir,
        }
        with FileSystems.create(f"{staged}/{MARKER}") as handle:
            handle.write(json.dumps(manifest, indent=1).encode("utf-8"))
    logger.info("wrote %d predictions in %d shards to %s", lines, len(shards), output_dir)
    return lines


def shard_paths(output_dir: str) -> list[str]:
    """The shards of a distributed prediction output, in shard order."""
    pattern = f"{output_dir.rstrip('/')}/{SHARD_PREFIX}-*"
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
