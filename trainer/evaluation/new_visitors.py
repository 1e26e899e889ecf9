"""What new visitors are served: held-out visitors folded in and scored ("strong generalization").

Preprocessing with `--holdout_visitors F` keeps a hash-chosen share of visitors out of training
and writes each one's cells as a fold-in part and a target part under `heldout/` (see
`pipeline.holdout`; `trainer.evaluation.heldout_visitors` reads them). Here, as in Liang et al.
2018 and Rendle et al. 2022, every held-out visitor v with both parts non-empty is

    folded in:  x_v = argmin_x Σ_i w_vi (t_vi − x·y_i)² + λ_v‖x‖²   over v's fold-in cells,
                the exact row solve against the trained item factors Y, batched over all
                held-out visitors (`trainer.core.foldin.fold_in_rows`; the normal equations are
                stated once, at `trainer.core.problem.define_rows`)
    ranked:     every item by y_i·x_v (`trainer.core.topk`, float32), except v's fold-in items,
                `item_chunk` items at a time with a running top max(ks)
                (`trainer.core.chunked_topk`: a block of B visitors peaks at
                O(B · item_chunk + B · max(ks)) of scores, never B · n_items)
    scored:     against v's target items, with `trainer.core.metrics.batch_sums` (the metrics and
                cut-offs of the known-visitor evaluation)

and the popularity baseline (items by train count c_i) is ranked and scored the same way. The
local trainer calls `evaluate`; `--distributed` runs `EvaluateNewVisitors`, the same per-block
sums over blocks of held-out visitors merged by a Beam CombineFn, so both give one result.

    metrics.json["new_visitors"] = {"wals": {...}, "popularity": {...}, "visitors": N,
                                    "fold_in_seconds": s}
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from common import locations, staging, worker_threads
from common.worker_json import WriteJson, read_json
from trainer.beam.combiners import PartialSumsCombineFn
from trainer.beam.model_blocks import read_npy_rows
from trainer.core import metrics
from trainer.core.chunked_topk import ConstantScores, FactorScores, RankingCache, popularity_order
from trainer.core.foldin import fold_in_rows
from trainer.core.objective import WALSConfig
from trainer.core.sparse import CsrMatrix
from trainer.evaluation.heldout_visitors import (
    HeldOutVisitors,
    assemble,
    has_heldout,
    load_heldout,
)
from trainer.serving import model as model_lib
from transforms import features
from transforms.examples import parse_heldout_example

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_ROWS = 4096
# has_heldout is part of this module's interface (trainer.task asks it before `evaluate_model`).
__all__ = [
    "DEFAULT_BLOCK_ROWS",
    "EvaluateNewVisitors",
    "block_sums",
    "evaluate",
    "evaluate_distributed",
    "evaluate_model",
    "format_metrics",
    "has_heldout",
    "visitor_block",
]


def block_sums(
    foldin: CsrMatrix,
    target: CsrMatrix,
    item_factors: np.ndarray,
    item_counts: np.ndarray,
    config: WALSConfig,
    ks: Sequence[int],
    item_chunk: int = 0,
    order: np.ndarray | None = None,
) -> tuple[metrics.RankingSums, metrics.RankingSums]:
    """(WALS, popularity) ranking sums of a block of held-out visitors (module docstring).

    Scores are y_i·x_v by `topk.score` (float32, bitwise the same whatever the block), so a
    visitor's ranking does not depend on the block it is in. WALS scores `item_chunk` items at
    a time (0: `chunked_topk.item_chunk_for`), so the scores of a block of B visitors peak at
    O(B · item_chunk + B · max(ks)); the result does not depend on it. Popularity walks one
    ranking of the catalogue, `order` = `chunked_topk.popularity_order(item_counts)` (sorted
    here when None; pass it to sort once for many blocks): O(B · max(ks) + foldin cells).
    """
    x = fold_in_rows(foldin, item_factors, item_counts, config)
    wals = metrics.batch_sums(FactorScores(x, item_factors), foldin, target, ks, item_chunk)
    scores = metrics.popularity_from_counts(item_counts)
    popular = ConstantScores(scores, foldin.shape[0], order)
    popularity = metrics.batch_sums(popular, foldin, target, ks, item_chunk)
    return wals, popularity


def _result(wals: metrics.RankingSums, popularity: metrics.RankingSums, seconds: float) -> dict:
    return {
        "wals": wals.result(),
        "popularity": popularity.result(),
        "visitors": wals.users,
        "fold_in_seconds": round(seconds, 3),
    }


def evaluate(
    heldout: HeldOutVisitors,
    item_factors: np.ndarray,
    item_counts: np.ndarray,
    config: WALSConfig,
    ks: Sequence[int] = metrics.DEFAULT_KS,
    batch_size: int = DEFAULT_BLOCK_ROWS,
    item_chunk: int = 0,
) -> dict:
    """metrics.json's "new_visitors": {"wals", "popularity", "visitors", "fold_in_seconds"}.

    Visitors are folded in and scored `batch_size` at a time, `item_chunk` items at a time
    (`block_sums`: memory O(batch_size · item_chunk + batch_size · max(ks))).
    """
    n_items = item_factors.shape[0]
    wals = metrics.RankingSums.zero(ks, n_items)
    popularity = metrics.RankingSums.zero(ks, n_items)
    start = time.perf_counter()
    order = popularity_order(item_counts)  # one ranking for every block
    n = len(heldout.visitors)
    for first in range(0, n, batch_size):
        rows = np.arange(first, min(first + batch_size, n))
        sums = block_sums(
            metrics.take_rows(heldout.foldin, rows),
            metrics.take_rows(heldout.target, rows),
            item_factors,
            item_counts,
            config,
            ks,
            item_chunk,
            order,
        )
        wals.merge(sums[0])
        popularity.merge(sums[1])
    return _result(wals, popularity, time.perf_counter() - start)


def evaluate_model(
    model: model_lib.WALSModel, dataset_dir: str, ks: Sequence[int], item_chunk: int = 0
) -> dict:
    """`evaluate` of a trained model on a dataset's held-out visitors."""
    heldout = load_heldout(dataset_dir, len(model.items))
    config = model.wals_config()
    return evaluate(
        heldout, model.item_factors, model.item_counts, config, ks, item_chunk=item_chunk
    )


def format_metrics(result: dict) -> str:
    """The new-visitor table of metrics.json's "new_visitors" (empty string when absent)."""
    new = result.get("new_visitors")
    if not new:
        return ""
    lines = [
        f"new visitors (held out whole, folded in): {new['visitors']:,} visitors, fold-in "
        f"{new['fold_in_seconds']:.2f} s",
        f"{'metric':<16} {'WALS':>10} {'popularity':>12} {'ratio':>8}",
    ]
    for name, ours in new["wals"].items():
        base = new["popularity"].get(name)
        if base is None or isinstance(ours, int):
            continue
        ratio = f"{ours / base:8.2f}" if base > 0 else f"{'':>8}"
        lines.append(f"{name:<16} {ours:>10.4f} {base:>12.4f} {ratio}")
    return "\n".join(lines)


# --- distributed: a Beam pipeline over blocks of held-out visitors -----------------------------


def visitor_block(visitor_id: str, n_blocks: int) -> int:
    """The block of a held-out visitor: sha256(visitorId)[:8] mod n_blocks."""
    digest = hashlib.sha256(visitor_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % n_blocks


def _keyed_record(record: bytes, part: str, n_blocks: int) -> tuple[int, tuple[str, bytes]]:
    """A held-out part's Example -> (its visitor's block, (part, the Example as it is)): both
    parts of a visitor go to one block, and the shuffle moves the compact serialized record."""
    visitor = parse_heldout_example(record)[0]
    return visitor_block(visitor, n_blocks), (part, record)


def _visitor_rows(records) -> list[tuple[str, tuple, tuple]]:
    """A block's (part, Example) records -> (visitor, fold-in cells, target cells) of each
    visitor with both parts (cells: (indices, ratings, raw))."""
    parts: dict[str, dict] = {}
    for part, record in records:
        visitor, indices, values, raw = parse_heldout_example(record)
        parts.setdefault(visitor, {})[part] = (indices, values, raw)
    return [
        (visitor, by_part[features.FOLDIN], by_part[features.TARGET])
        for visitor, by_part in parts.items()
        if features.FOLDIN in by_part and features.TARGET in by_part
    ]


class _BlockSums(beam.DoFn):
    """(block, [(part, held-out Example)]) -> (wals RankingSums, popularity RankingSums) of the
    block's visitors with both parts."""

    def __init__(self, config: WALSConfig, ks: tuple[int, ...], item_chunk: int = 0):
        self._config, self._ks, self._item_chunk = config, ks, item_chunk
        self._rankings = RankingCache()  # popularity sorted once per worker and counts

    def setup(self):
        worker_threads.apply_in_worker()  # before this worker's TensorFlow runtime starts (fold-in)

    def process(self, element, item_factors: np.ndarray, item_counts: np.ndarray):
        _, records = element
        _, foldin, target, _ = assemble(_visitor_rows(records), item_factors.shape[0])
        config, ks = self._config, self._ks
        order = self._rankings.order(item_counts)
        yield block_sums(
            foldin, target, item_factors, item_counts, config, ks, self._item_chunk, order
        )


class _MergeSums(PartialSumsCombineFn):
    """(wals, popularity) RankingSums of blocks -> their sums, merged (`RankingSums.merge`)."""

    def __init__(self, ks: tuple[int, ...], n_items: int):
        self._ks, self._n_items = ks, n_items

    def create_accumulator(self):
        return (
            metrics.RankingSums.zero(self._ks, self._n_items),
            metrics.RankingSums.zero(self._ks, self._n_items),
        )

    def add_input(self, accumulator, sums):
        accumulator[0].merge(sums[0])
        accumulator[1].merge(sums[1])
        return accumulator

    def extract_output(self, accumulator):
        return {"wals": accumulator[0].result(), "popularity": accumulator[1].result()}


class EvaluateNewVisitors(beam.PTransform):
    """A dataset's held-out visitors -> one dict {"wals": {...}, "popularity": {...}}.

    Input: the pipeline root. Output: PCollection[dict] of one element, equal to `evaluate`'s
    "wals" and "popularity" (up to float round-off in the sums).

    Args:
        dataset_dir: a `--holdout_visitors` preprocessing output.
        item_factors: PCollection of one element, Y float32 [n_items, k] (a side input).
        item_counts: PCollection of one element, c_i int64 [n_items] (a side input).
        config: the model's hyperparameters.
        n_items: the number of items.
        ks: the cut-offs.
        n_blocks: blocks of visitors (by a hash of the visitor ID); the unit of work.
        item_chunk: items scored at once per block (`block_sums`); 0: automatic.
    """

    def __init__(
        self,
        dataset_dir,
        item_factors,
        item_counts,
        config,
        n_items,
        ks,
        n_blocks,
        item_chunk: int = 0,
    ):
        super().__init__()
        self._dir = dataset_dir.rstrip("/")
        self._item_factors, self._item_counts = item_factors, item_counts
        self._config, self._n_items = config, n_items
        self._ks, self._n_blocks = tuple(sorted(set(ks))), max(int(n_blocks), 1)
        self._item_chunk = item_chunk

    def expand(self, root):
        parts = []
        for part in (features.FOLDIN, features.TARGET):
            pattern = f"{self._dir}/{features.HELDOUT_DIR}/{part}-*{features.TFRECORD_SUFFIX}"
            parts.append(
                root
                | f"Read{part.title()}"
                >> beam.io.ReadFromTFRecord(pattern, compression_type=CompressionTypes.GZIP)
                | f"KeyByBlock{part.title()}" >> beam.Map(_keyed_record, part, self._n_blocks)
            )
        return (
            parts
            | "FlattenParts" >> beam.Flatten()
            | "GroupByBlock" >> beam.GroupByKey()
            | "FoldInAndScore"
            >> beam.ParDo(
                _BlockSums(self._config, self._ks, self._item_chunk),
                beam.pvalue.AsSingleton(self._item_factors),
                beam.pvalue.AsSingleton(self._item_counts),
            )
            | "MergeSums" >> beam.CombineGlobally(_MergeSums(self._ks, self._n_items))
        )


def evaluate_distributed(
    model_dir: str,
    dataset_dir: str,
    pipeline_options: PipelineOptions | list[str] | None = None,
    ks: Sequence[int] = metrics.DEFAULT_KS,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    item_chunk: int = 0,
) -> dict:
    """`evaluate_model` as one Beam run: workers read the item factors from `model_dir` and leave
    their result under --temp_location, else under `model_dir` (`common.locations.scratch_dir`;
    deleted once read). An element is a block of about `block_rows` visitors, scored
    `item_chunk` items at a time.

    Returns:
        metrics.json's "new_visitors" ("fold_in_seconds" is the pipeline's wall time).
    """
    config = model_lib.config_of(model_lib.read_config(model_dir))  # metadata only
    n_items = model_lib.array_shape(model_dir, "item_factors")[0]
    summary_path = f"{dataset_dir.rstrip('/')}/{features.SUMMARY_FILE}"
    with FileSystems.open(summary_path) as handle:
        n_visitors = json.loads(handle.read().decode("utf-8")).get("heldout_visitors", 0)
    n_blocks = max(-(-int(n_visitors) // block_rows), 1)
    if pipeline_options is None or isinstance(pipeline_options, list):
        pipeline_options = PipelineOptions(pipeline_options or [])
    scratch = locations.scratch_dir(pipeline_options, "new-visitors", model_dir)
    start = time.perf_counter()
    factors_path = model_lib.array_file(model_dir, "item_factors")
    counts_path = model_lib.array_file(model_dir, "item_counts")
    with (
        worker_threads.local_budget(pipeline_options),
        beam.Pipeline(options=pipeline_options) as pipeline,
    ):
        item_factors = (
            pipeline
            | "ItemFactorsPath" >> beam.Create([factors_path])
            | "LoadItemFactors" >> beam.Map(lambda p: read_npy_rows(p).astype(np.float32))
        )
        counts = (
            pipeline
            | "ItemCountsPath" >> beam.Create([counts_path])
            | "LoadItemCounts" >> beam.Map(lambda p: read_npy_rows(p).astype(np.int64))
        )
        _ = (
            pipeline
            | "EvaluateNewVisitors"
            >> EvaluateNewVisitors(
                dataset_dir,
                item_factors,
                counts,
                config,
                n_items,
                ks,
                n_blocks,
                item_chunk,
            )
            | "Write" >> WriteJson(f"{scratch}/new_visitors")
        )
    seconds = time.perf_counter() - start
    try:
        evaluated = read_json(f"{scratch}/new_visitors")
    finally:
        staging.delete_tree(scratch)
    return {
        **evaluated,
        "visitors": evaluated["wals"]["users_evaluated"],
        "fold_in_seconds": round(seconds, 3),
    }
