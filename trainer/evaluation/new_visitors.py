"""What new visitors are served: held-out visitors folded in and scored ("strong generalization").

Preprocessing with `--holdout_visitors F` keeps a hash-chosen share of visitors out of training
and writes each one's cells as a fold-in part and a target part under `heldout/` (see
`pipeline.holdout`). Here, as in Liang et al. 2018 and Rendle et al. 2022, every held-out
visitor v with both parts non-empty is

    folded in:  x_v = argmin_x Σ_i w_vi (t_vi − x·y_i)² + λ_v‖x‖²   over v's fold-in cells,
                the exact row solve of the trained item factors Y, i.e. one row sweep of the
                problem `trainer.core.problem.define_rows(foldin, USERS, c, config)` (c the train
                item counts), batched over all held-out visitors:
                    x_v = (w0·YᵀY + Σ_i f_vi y_i y_iᵀ + λ_v I)⁻¹ Σ_i (w0 + f_vi) t_vi y_i
    ranked:     every item by y_i·x_v, except v's fold-in items
    scored:     against v's target items, with `trainer.core.metrics.batch_sums` (the metrics and
                cut-offs of the known-visitor evaluation)

and the popularity baseline (items by train count c_i) is ranked and scored the same way. The
local trainer calls `evaluate`; `--distributed` runs `EvaluateNewVisitors`, the same per-block
sums over blocks of held-out visitors merged by a Beam CombineFn, so both give one result.

    metrics.json["new_visitors"] = {"wals": {...}, "popularity": {...}, "visitors": N,
                                    "fold_in_seconds": s}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
import time
import uuid
from collections.abc import Sequence

import apache_beam as beam
import numpy as np
import tensorflow as tf
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions

from common import staging, worker_threads
from trainer.beam.predict import read_npy_rows
from trainer.core import metrics, problem
from trainer.core import solver as wals_solver
from trainer.core.config import WALSConfig
from trainer.core.sparse import CsrMatrix
from trainer.serving import model as model_lib
from transforms import features
from transforms.examples import parse_heldout_example

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_ROWS = 4096
# The fold-in solve's dtype: float64, like the SavedModel's `fold_in` signature.
FOLD_IN_DTYPE = tf.float64


@dataclasses.dataclass(frozen=True)
class HeldOutVisitors:
    """Held-out visitors with both parts non-empty, sorted by visitor ID.

    Attributes:
        visitors: list[str], the visitors' original IDs (row j of the matrices).
        foldin: CsrMatrix [n, n_items], the fold-in cells' ratings.
        target: CsrMatrix [n, n_items], the target cells' ratings.
        foldin_raw: float32 [foldin.nnz], the fold-in cells' raw values (durations in ms).
    """

    visitors: list[str]
    foldin: CsrMatrix
    target: CsrMatrix
    foldin_raw: np.ndarray


def has_heldout(dataset_dir: str) -> bool:
    """True when the preprocessed dataset has held-out visitors (`heldout/foldin-*`)."""
    return bool(_files(dataset_dir, features.FOLDIN))


def _files(dataset_dir: str, part: str) -> list[str]:
    pattern = f"{dataset_dir.rstrip('/')}/{features.HELDOUT_DIR}/{part}-*{features.TFRECORD_SUFFIX}"
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def _read_part(files: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    out = {}
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        visitor, indices, values, raw = parse_heldout_example(record.numpy())
        if visitor in out:
            raise ValueError(f"held-out visitor {visitor!r} has two records in one part")
        out[visitor] = (indices, values, raw)
    return out


def assemble(
    rows: list[tuple[str, tuple, tuple]], n_items: int
) -> tuple[list[str], CsrMatrix, CsrMatrix, np.ndarray]:
    """Visitors' parts -> (visitors sorted, foldin CsrMatrix, target CsrMatrix, foldin raw).

    Args:
        rows: (visitorId, (indices, ratings, raw) of fold-in, (indices, ratings, raw) of target),
            each part with distinct sorted indices in [0, n_items).
    """
    rows = sorted(rows, key=lambda row: row[0])
    visitors = [row[0] for row in rows]
    matrices = []
    for part in (1, 2):
        counts = np.array([row[part][0].size for row in rows], dtype=np.int64)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

        def cat(j: int, dtype, part=part):
            return np.concatenate([np.asarray(row[part][j], dtype) for row in rows] or [[]]).astype(
                dtype
            )

        indices, values = cat(0, np.int64), cat(1, np.float32)
        if indices.size and (indices.min() < 0 or indices.max() >= n_items):
            raise ValueError(f"held-out item index outside the {n_items} trained items")
        matrices.append(CsrMatrix(indptr, indices, values, (len(rows), n_items)))
        if part == 1:
            raw = cat(2, np.float32)
    return visitors, matrices[0], matrices[1], raw


def load_heldout(dataset_dir: str, n_items: int) -> HeldOutVisitors:
    """Reads `heldout/foldin-*` and `heldout/target-*`; keeps visitors with both parts.

    Args:
        dataset_dir: a `pipeline.preprocess --holdout_visitors` output.
        n_items: the train vocabulary's size.
    """
    foldin = _read_part(_files(dataset_dir, features.FOLDIN))
    target = _read_part(_files(dataset_dir, features.TARGET))
    both = sorted(set(foldin) & set(target))
    skipped = len(set(foldin) | set(target)) - len(both)
    if skipped:
        logger.info("%d held-out visitors have an empty fold-in or target part: skipped", skipped)
    visitors, foldin_rows, target_rows, raw = assemble(
        [(v, foldin[v], target[v]) for v in both], n_items
    )
    return HeldOutVisitors(visitors, foldin_rows, target_rows, raw)


def fold_in_rows(
    foldin: CsrMatrix,
    item_factors: np.ndarray,
    item_counts: np.ndarray,
    config: WALSConfig,
    gramian: np.ndarray | tf.Tensor | None = None,
) -> np.ndarray:
    """Factors of many new visitors at once: one exact row sweep against fixed Y.

    Args:
        foldin: CsrMatrix [n, n_items], the visitors' fold-in ratings r_vi.
        item_factors: [n_items, k] the trained Y.
        item_counts: int [n_items] c_i of the training matrix (for f and λ).
        config: the trained model's hyperparameters.
        gramian: [k, k] YᵀY in float64 (computed when None).

    Returns:
        float32 [n, k], the rows of `trainer.local.train.fold_in`, each from the shared problem.
    """
    if foldin.nnz == 0 and foldin.shape[0]:
        return np.zeros((foldin.shape[0], item_factors.shape[1]), np.float32)
    fixed = tf.constant(np.asarray(item_factors), FOLD_IN_DTYPE)
    if gramian is None:
        gramian = wals_solver.gramian(fixed, FOLD_IN_DTYPE)
    rows = problem.define_rows(foldin, problem.USERS, item_counts, config)
    plan = rows.plan(wals_solver.CHOLESKY, dtype=FOLD_IN_DTYPE)
    x = wals_solver.solve_planned(plan, fixed, gramian, wals_solver.CHOLESKY, jit_compile=False)
    return x.numpy().astype(np.float32)


def block_sums(
    foldin: CsrMatrix,
    target: CsrMatrix,
    item_factors: np.ndarray,
    item_counts: np.ndarray,
    config: WALSConfig,
    ks: Sequence[int],
) -> tuple[metrics.RankingSums, metrics.RankingSums]:
    """(WALS, popularity) ranking sums of a block of held-out visitors (module docstring).

    Scores are y_i·x_v in float64 rounded to float32 (`metrics.dot_scores`), so a visitor's
    ranking does not depend on the block it is in.
    """
    x = fold_in_rows(foldin, item_factors, item_counts, config)
    scores = metrics.dot_scores(x, item_factors)
    wals = metrics.batch_sums(scores, foldin, target, ks)
    popular = np.asarray(item_counts, dtype=np.float32)  # metrics.popularity_scores
    popularity = metrics.batch_sums(
        np.broadcast_to(popular, (foldin.shape[0], popular.size)), foldin, target, ks
    )
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
) -> dict:
    """metrics.json's "new_visitors": {"wals", "popularity", "visitors", "fold_in_seconds"}.

    Visitors are folded in and scored `batch_size` at a time (memory O(batch_size · n_items)).
    """
    n_items = item_factors.shape[0]
    wals = metrics.RankingSums.zero(ks, n_items)
    popularity = metrics.RankingSums.zero(ks, n_items)
    start = time.perf_counter()
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
        )
        wals.merge(sums[0])
        popularity.merge(sums[1])
    return _result(wals, popularity, time.perf_counter() - start)


def evaluate_model(model: model_lib.WALSModel, dataset_dir: str, ks: Sequence[int]) -> dict:
    """`evaluate` of a trained model on a dataset's held-out visitors."""
    heldout = load_heldout(dataset_dir, len(model.items))
    return evaluate(heldout, model.item_factors, model.item_counts, model.wals_config(), ks)


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


def _keyed_part(record: bytes, part: str):
    visitor, indices, values, raw = parse_heldout_example(record)
    return visitor, (part, (indices, values, raw))


def _visitor_row(element, n_blocks: int):
    """(visitor, [(part, cells)...]) -> (block, (visitor, foldin, target)) when both exist."""
    visitor, parts = element
    by_part = dict(parts)
    if features.FOLDIN in by_part and features.TARGET in by_part:
        row = (visitor, by_part[features.FOLDIN], by_part[features.TARGET])
        yield visitor_block(visitor, n_blocks), row


class _BlockSums(beam.DoFn):
    """(block, rows) -> (wals RankingSums, popularity RankingSums) of the block."""

    def __init__(self, config: WALSConfig, ks: tuple[int, ...]):
        self._config, self._ks = config, ks

    def process(self, element, item_factors: np.ndarray, item_counts: np.ndarray):
        _, rows = element
        _, foldin, target, _ = assemble(list(rows), item_factors.shape[0])
        yield block_sums(foldin, target, item_factors, item_counts, self._config, self._ks)


class _MergeSums(beam.CombineFn):
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

    def merge_accumulators(self, accumulators):
        accumulators = iter(accumulators)
        total = next(accumulators)
        for other in accumulators:
            self.add_input(total, other)
        return total

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
    """

    def __init__(self, dataset_dir, item_factors, item_counts, config, n_items, ks, n_blocks):
        super().__init__()
        self._dir = dataset_dir.rstrip("/")
        self._item_factors, self._item_counts = item_factors, item_counts
        self._config, self._n_items = config, n_items
        self._ks, self._n_blocks = tuple(sorted(set(ks))), max(int(n_blocks), 1)

    def expand(self, root):
        parts = []
        for part in (features.FOLDIN, features.TARGET):
            pattern = f"{self._dir}/{features.HELDOUT_DIR}/{part}-*{features.TFRECORD_SUFFIX}"
            parts.append(
                root
                | f"Read{part.title()}"
                >> beam.io.ReadFromTFRecord(pattern, compression_type=CompressionTypes.GZIP)
                | f"Parse{part.title()}" >> beam.Map(_keyed_part, part)
            )
        return (
            parts
            | "FlattenParts" >> beam.Flatten()
            | "GroupByVisitor" >> beam.GroupByKey()
            | "KeyByBlock" >> beam.FlatMap(_visitor_row, self._n_blocks)
            | "GroupByBlock" >> beam.GroupByKey()
            | "FoldInAndScore"
            >> beam.ParDo(
                _BlockSums(self._config, self._ks),
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
) -> dict:
    """`evaluate_model` as one Beam run: workers read the item factors from `model_dir`.

    Returns:
        metrics.json's "new_visitors" ("fold_in_seconds" is the pipeline's wall time).
    """
    model = model_lib.load(model_dir)
    summary_path = f"{dataset_dir.rstrip('/')}/{features.SUMMARY_FILE}"
    with FileSystems.open(summary_path) as handle:
        n_visitors = json.loads(handle.read().decode("utf-8")).get("heldout_visitors", 0)
    n_blocks = max(-(-int(n_visitors) // block_rows), 1)
    if pipeline_options is None or isinstance(pipeline_options, list):
        pipeline_options = PipelineOptions(pipeline_options or [])
    scratch = _scratch_dir(pipeline_options)
    start = time.perf_counter()
    factors_path = f"{model_dir.rstrip('/')}/{model_lib.MODEL_SUBDIR}/item_factors.npy"
    with (
        worker_threads.local_budget(pipeline_options),
        beam.Pipeline(options=pipeline_options) as pipeline,
    ):
        item_factors = (
            pipeline
            | "ItemFactorsPath" >> beam.Create([factors_path])
            | "LoadItemFactors" >> beam.Map(lambda p: read_npy_rows(p).astype(np.float32))
        )
        counts = pipeline | "ItemCounts" >> beam.Create([np.asarray(model.item_counts, np.int64)])
        _ = (
            pipeline
            | "EvaluateNewVisitors"
            >> EvaluateNewVisitors(
                dataset_dir,
                item_factors,
                counts,
                model.wals_config(),
                len(model.items),
                ks,
                n_blocks,
            )
            | "ToJson" >> beam.Map(json.dumps)
            | "Write" >> beam.io.WriteToText(f"{scratch}/new_visitors", shard_name_template="")
        )
    seconds = time.perf_counter() - start
    try:
        with FileSystems.open(
            f"{scratch}/new_visitors", compression_type=CompressionTypes.UNCOMPRESSED
        ) as handle:
            evaluated = json.loads(handle.read().decode("utf-8"))
    finally:
        staging.delete_tree(scratch)
    return {
        **evaluated,
        "visitors": evaluated["wals"]["users_evaluated"],
        "fold_in_seconds": round(seconds, 3),
    }


def _scratch_dir(options: PipelineOptions) -> str:
    temp_location = options.view_as(GoogleCloudOptions).temp_location
    if temp_location:
        return f"{temp_location.rstrip('/')}/new-visitors-{uuid.uuid4().hex[:8]}"
    return tempfile.mkdtemp(prefix="new-visitors-")
