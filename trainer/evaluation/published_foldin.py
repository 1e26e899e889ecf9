"""The published model scored by fold-in on a candidate's eval split, as a Beam pipeline: the
gate's comparison under `--distributed`, where no process may hold the data.

    vocab_items of the candidate ─┐
    vocab_items of the published ─┴ MapItems ─> item_map int64 [n_items]: the published row of
                                               each candidate item, -1 for unknown content
    vocab_users of both ─ KnownVisitors ─> known bool [n_users]: the published model knows them
    ReadEvalBlocks (train and eval rows, no factors) ─ ScorePublished(item_map, Y, c, known)
        ─> {"recall@K", "ndcg@K", ..., "users_evaluated"}, plus the coverage facts

Per block of users, exactly as the local gate (`trainer.evaluation.gate`) scores them: each eval
visitor's training row, its items mapped into the published vocabulary (`map_rows`), is folded
in against the published Y (`trainer.core.foldin.fold_in_rows`, float64, one batched solve per
block); the candidate's items are ranked by y_i · x in chunks (`PublishedScores`: a known item
scores with its published factors, an unknown one -1e30, so it is recommended only when nothing
known is left), the visitor's training items excluded, and `metrics.batch_sums` adds the block.
A CombineFn merges the sums, so the result equals the local gate's whatever the blocks.

Joining the vocabularies: each vocabulary file is streamed by one worker into coarse elements
(up to `_BATCH` IDs) keyed by a hash bucket of the ID; a CoGroupByKey per bucket matches them.
What the workers hold: the published Y (n_pub · k · 4 bytes) and c (n_pub · 8 bytes), the
item map (n_items · 8 bytes) and the known-visitor mask (n_users bytes) as side inputs, and per
block its rows and O(b · item_chunk + b · K) of scores. The launcher reads config.json, the
arrays' headers and the small result.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from common import staging, worker_threads
from common.locations import scratch_dir
from common.worker_json import WriteJson, read_json
from trainer.beam import eval_pipeline
from trainer.beam.combiners import PartialSumsCombineFn
from trainer.beam.model_blocks import read_npy_rows
from trainer.core import foldin, metrics, topk
from trainer.core.chunked_topk import BlockScores
from trainer.core.objective import WALSConfig
from trainer.core.sparse import CsrMatrix
from trainer.serving import model as model_lib

logger = logging.getLogger(__name__)

UNKNOWN_SCORE = np.float32(-1e30)  # content the published model cannot recommend
_BATCH = 4096  # IDs per element of a streamed vocabulary
_IDS_PER_BUCKET = 100_000


@dataclasses.dataclass(frozen=True)
class PublishedScores(BlockScores):
    """s[v, i] = y_{m(i)} · x_v for a candidate item i the published model knows (m(i) >= 0,
    its published row), UNKNOWN_SCORE for one it does not: the published model's scores of the
    candidate's items, a chunk at a time (`topk.score`, float32).

    Attributes:
        query: float32 [b, k], the folded-in visitors' factors.
        published_items: float32 [n_pub, k], the published Y.
        item_map: int64 [n_items], m: the published row of each candidate item, or -1.
    """

    query: np.ndarray
    published_items: np.ndarray
    item_map: np.ndarray

    @property
    def n_rows(self) -> int:
        return int(np.shape(self.query)[0])

    @property
    def n_items(self) -> int:
        return int(np.shape(self.item_map)[0])

    def scores(self, start: int, stop: int) -> np.ndarray:
        rows = self.item_map[start:stop]
        known = rows >= 0
        scores = topk.score(self.query, self.published_items[np.where(known, rows, 0)])
        scores[:, ~known] = UNKNOWN_SCORE
        return scores


def map_rows(train: CsrMatrix, users: np.ndarray, item_map: np.ndarray, n_items: int) -> CsrMatrix:
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


# --- joining two vocabularies by ID, in coarse elements ------------------------------------------


def _bucket(value: str, buckets: int) -> int:
    return zlib.crc32(value.encode("utf-8")) % buckets


class _StreamVocabulary(beam.DoFn):
    """A vocabulary file's path -> (bucket, list[(ID, index)]), up to _BATCH IDs an element.

    The file is split on b"\\n" only, as `model.vocabulary_from_bytes` splits it; a worker holds
    at most `buckets` partial batches."""

    def __init__(self, buckets: int):
        self._buckets = buckets

    def process(self, path: str):
        pending: dict[int, list] = {}
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            for index, line in enumerate(handle):
                value = line.decode("utf-8").removesuffix("\n")
                bucket = _bucket(value, self._buckets)
                batch = pending.setdefault(bucket, [])
                batch.append((value, index))
                if len(batch) == _BATCH:
                    yield bucket, pending.pop(bucket)
        yield from pending.items()


def _match(element):
    """(bucket, {"ours": [batches], "theirs": [batches]}) -> (our indices int64 [n], their
    indices int64 [n]) of the IDs both vocabularies hold."""
    _, grouped = element
    theirs = {value: index for batch in grouped["theirs"] for value, index in batch}
    ours, matched = [], []
    for batch in grouped["ours"]:
        for value, index in batch:
            other = theirs.get(value)
            if other is not None:
                ours.append(index)
                matched.append(other)
    if ours:
        yield np.asarray(ours, np.int64), np.asarray(matched, np.int64)


class _ScatterMatches(beam.CombineFn):
    """(our indices, their indices) pairs -> int64 [n]: their index of each of ours, or -1."""

    def __init__(self, n: int):
        self._n = n

    def create_accumulator(self):
        return np.full(self._n, -1, dtype=np.int64)

    def add_input(self, mapping, pair):
        ours, theirs = pair
        mapping[ours] = theirs
        return mapping

    def merge_accumulators(self, accumulators):
        accumulators = iter(accumulators)
        merged = next(accumulators)
        for other in accumulators:
            known = other >= 0
            merged[known] = other[known]
        return merged

    def extract_output(self, mapping):
        return mapping


class JoinVocabularies(beam.PTransform):
    """The pipeline root -> PCollection of one element, int64 [n_ours]: for each line of the
    vocabulary file `ours`, the line of `theirs` holding the same ID, or -1."""

    def __init__(self, ours: str, theirs: str, n_ours: int, n_theirs: int):
        super().__init__()
        self._ours, self._theirs, self._n = ours, theirs, n_ours
        self._buckets = int(np.clip(-(-max(n_ours, n_theirs) // _IDS_PER_BUCKET), 1, 512))

    def expand(self, root):
        streamed = {
            name: root
            | f"{name.title()}Path" >> beam.Create([path])
            | f"Stream{name.title()}" >> beam.ParDo(_StreamVocabulary(self._buckets))
            for name, path in (("ours", self._ours), ("theirs", self._theirs))
        }
        return (
            streamed
            | "GroupByBucket" >> beam.CoGroupByKey()
            | "Match" >> beam.FlatMap(_match)
            | "Scatter" >> beam.CombineGlobally(_ScatterMatches(self._n))
        )


# --- the per-block sums --------------------------------------------------------------------------


@dataclasses.dataclass
class _Sums:
    ranking: metrics.RankingSums
    known_visitors: int = 0


class _PublishedBlockSums(beam.DoFn):
    """EvalBlock -> _Sums of the published model on its users with held-out items."""

    def __init__(self, config: WALSConfig, ks: tuple[int, ...], item_chunk: int):
        self._config, self._ks, self._item_chunk = config, ks, item_chunk
        self._gramian = None

    def setup(self):
        worker_threads.apply_in_worker()

    def process(self, block, item_map, published_items, published_counts, known_users):
        if self._gramian is None or self._gramian[0] is not published_items:
            product = published_items.astype(np.float64)
            self._gramian = (published_items, product.T @ product)
        users = np.flatnonzero(block.heldout.row_counts() > 0)
        rows = map_rows(block.train, users, item_map, published_items.shape[0])
        x = foldin.fold_in_rows(
            rows, published_items, published_counts, self._config, self._gramian[1]
        )
        scores = PublishedScores(x, published_items, item_map)
        sums = metrics.batch_sums(
            scores,
            metrics.take_rows(block.train, users),
            metrics.take_rows(block.heldout, users),
            self._ks,
            self._item_chunk,
        )
        yield _Sums(sums, int(known_users[block.user_ids[users]].sum()))


class _CombineSums(PartialSumsCombineFn):
    def __init__(self, ks: tuple[int, ...], n_items: int):
        self._ks, self._n_items = ks, n_items

    def create_accumulator(self):
        return _Sums(metrics.RankingSums.zero(self._ks, self._n_items))

    def add_input(self, total, sums):
        total.ranking.merge(sums.ranking)
        total.known_visitors += sums.known_visitors
        return total

    def extract_output(self, total):
        return {"metrics": total.ranking.result(), "known_visitors": total.known_visitors}


def _known(mapping: np.ndarray) -> np.ndarray:
    """bool [n]: which rows the other vocabulary holds (a named function: Beam infers a bool
    coder for a lambda's comparison)."""
    return mapping >= 0


def _read_array(path: str, dtype) -> np.ndarray:
    return read_npy_rows(path).astype(dtype)


def score_published(
    published_dir: str,
    candidate_dir: str,
    dataset_dir: str,
    pipeline_options,
    ks: tuple[int, ...],
    item_chunk: int = 0,
    block_rows: int = 4096,
) -> tuple[dict, dict]:
    """`metrics.evaluate` of the published model by fold-in on the candidate's eval split, as
    one Beam run (the module doc says what each stage holds).

    Returns:
        (metrics {"recall@k", "ndcg@k", ..., "users_evaluated"}, coverage {"known_content",
        "content", "known_visitors", "eval_visitors"}), as `gate.published_scorer` gives them.
    """
    n_users, _ = model_lib.array_shape(candidate_dir, "user_factors")
    n_items, _ = model_lib.array_shape(candidate_dir, "item_factors")
    n_pub_users, _ = model_lib.array_shape(published_dir, "user_factors")
    n_pub_items, _ = model_lib.array_shape(published_dir, "item_factors")
    config = model_lib.config_of(model_lib.read_config(published_dir))
    vocab = {
        (name, side): f"{directory.rstrip('/')}/{model_lib.MODEL_SUBDIR}/vocab_{side}.txt"
        for name, directory in (("ours", candidate_dir), ("theirs", published_dir))
        for side in ("users", "items")
    }
    scratch = scratch_dir(pipeline_options, "gate", candidate_dir)
    with (
        worker_threads.local_budget(pipeline_options),
        beam.Pipeline(options=pipeline_options) as pipeline,
    ):
        item_map = pipeline | "MapItems" >> JoinVocabularies(
            vocab["ours", "items"], vocab["theirs", "items"], n_items, n_pub_items
        )
        user_map = pipeline | "MapVisitors" >> JoinVocabularies(
            vocab["ours", "users"], vocab["theirs", "users"], n_users, n_pub_users
        )
        known_users = user_map | "KnownVisitors" >> beam.Map(_known)
        published_items, published_counts = (
            pipeline
            | f"{name}Path" >> beam.Create([model_lib.array_file(published_dir, name)])
            | f"Load{name}" >> beam.Map(_read_array, dtype)
            for name, dtype in (("item_factors", np.float32), ("item_counts", np.int64))
        )
        blocks = pipeline | "ReadEvalBlocks" >> eval_pipeline.ReadEvalBlocks(
            None, dataset_dir, (n_users, n_items), block_rows
        )
        side = beam.pvalue.AsSingleton
        _ = (
            blocks
            | "ScorePublished"
            >> beam.ParDo(
                _PublishedBlockSums(config, ks, item_chunk),
                side(item_map),
                side(published_items),
                side(published_counts),
                side(known_users),
            )
            | "CombineSums" >> beam.CombineGlobally(_CombineSums(ks, n_items))
            | "Write" >> WriteJson(f"{scratch}/published")
        )
        _ = (
            item_map
            | "CountKnownContent" >> beam.Map(lambda mapping: int((mapping >= 0).sum()))
            | "WriteKnownContent" >> WriteJson(f"{scratch}/known_content")
        )
    try:
        result = read_json(f"{scratch}/published")
        known_content = read_json(f"{scratch}/known_content")
    finally:
        staging.delete_tree(scratch)
    scored = result["metrics"]
    coverage = {
        "known_content": known_content,
        "content": n_items,
        "known_visitors": result["known_visitors"],
        "eval_visitors": int(scored["users_evaluated"]),
    }
    return scored, coverage
