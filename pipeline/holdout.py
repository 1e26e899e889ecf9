r"""Held-out visitors ("strong generalization"): whole visitors kept out of training.

    pairs | SplitHeldOutVisitors(F) -> known pairs, held-out pairs
    held-out pairs | TransformHeldOut(transform_fn) -> cells (visitor, part, itemId, r, value)
    cells | WriteHeldOut(dir) -> heldout/foldin-*, heldout/target-*

A visitor is held out iff sha256("holdout-visitor" \x1f visitorId)[:8] / 2^64 < F, so none of
its pairs reach the vocabularies, the train matrix or eval/. Each of its cells then goes to the
fold-in part iff sha256("holdout-foldin" \x1f visitorId \x1f contentId)[:8] / 2^64 <
foldin_fraction, else to the target part. Both hashes are salted, so they are independent of
each other and of the per-pair train/eval split (`pipeline.events.is_eval`, unsalted).

Held-out cells are transformed by the train split's TF Transform graph (the same vocabulary
lookup and rating scaling as every train cell); cells whose content is not in the train
vocabulary are dropped. They are counted twice: by the Beam counter
`heldout_dropped_unknown_content` (monitoring), and exactly, as data, by `dropped_unknown`:
held-out pairs (`count_pairs`) minus the cells `WriteHeldOut` writes.
"""

from __future__ import annotations

import collections
import hashlib

import apache_beam as beam
import numpy as np
import tensorflow as tf
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from common import counts
from pipeline.events import METRICS_NAMESPACE
from transforms import examples, features

VISITOR_SALT = "holdout-visitor"
FOLDIN_SALT = "holdout-foldin"
PARTS = (features.FOLDIN, features.TARGET)


def _unit_hash(text: str) -> float:
    """sha256(text)[:8] as a big-endian integer / 2^64, in [0, 1)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0**64


def is_heldout_visitor(visitor_id: str, fraction: float) -> bool:
    """True iff the visitor is held out whole (module docstring)."""
    return _unit_hash(f"{VISITOR_SALT}\x1f{visitor_id}") < fraction


def is_foldin(visitor_id: str, content_id: str, foldin_fraction: float) -> bool:
    """True iff a held-out visitor's cell goes to the fold-in part, else to the target part."""
    return _unit_hash(f"{FOLDIN_SALT}\x1f{visitor_id}\x1f{content_id}") < foldin_fraction


HELDOUT_TAG = "heldout"
HELDOUT_PAIRS = "heldout_pairs"  # An exact count only `dropped_unknown` reads.
DROPPED_UNKNOWN = "heldout_dropped_unknown_content"


def count_pairs(batch: list) -> dict[str, int]:
    """A batch of held-out pairs -> {HELDOUT_PAIRS: its length}."""
    return {HELDOUT_PAIRS: len(batch)}


def dropped_unknown(totals: dict[str, int]) -> dict[str, int]:
    """Summed counts with HELDOUT_PAIRS replaced by DROPPED_UNKNOWN (left out when 0):

        heldout_dropped_unknown_content = heldout_pairs - heldout_foldin_interactions
                                          - heldout_target_interactions

    `TransformHeldOut` turns each held-out pair into one cell unless its content is unknown,
    and `WriteHeldOut` counts every cell in one part.
    """
    totals = dict(totals)
    dropped = totals.pop(HELDOUT_PAIRS, 0) - sum(
        totals.get(f"heldout_{part}_interactions", 0) for part in PARTS
    )
    if dropped:
        totals[DROPPED_UNKNOWN] = dropped
    return dict(sorted(totals.items()))


def _split_batch(pairs: list, fraction: float):
    known, heldout = [], []
    for pair in pairs:
        (heldout if is_heldout_visitor(pair[0], fraction) else known).append(pair)
    if known:
        yield known
    if heldout:
        yield beam.pvalue.TaggedOutput(HELDOUT_TAG, heldout)


class SplitHeldOutVisitors(beam.PTransform):
    """Pair batches -> (pairs of known visitors, pairs of held-out visitors), by a hash of the
    visitor.

    Input: PCollection[list[tuple[str, str, float]]] (visitorId, contentId, value) batches.
    Output: a pair of PCollections of the same type, each input pair in exactly one of them.
    """

    def __init__(self, fraction: float):
        super().__init__()
        self._fraction = fraction

    def expand(self, pairs):
        split = pairs | "Split" >> beam.FlatMap(_split_batch, self._fraction).with_outputs(
            HELDOUT_TAG, main="known"
        )
        return split["known"], split[HELDOUT_TAG]


# One transform model per worker process, shared by every _TransformBatch instance (each of
# the process's threads has its own) and tagged with its SavedModel directory: Beam's Shared, as
# tft_beam shares its graph (tensorflow_transform.beam.impl._RunMetaGraphDoFn). The handle is
# created at import, so each process has its own; `Shared` builds the model under a lock, once.
_TRANSFORM_MODEL = shared.Shared()
# Transform models this process has loaded, by SavedModel directory.
TRANSFORM_MODEL_LOADS: collections.Counter = collections.Counter()


class _TransformBatch(beam.DoFn):
    """A batch of held-out pairs -> (visitorId, (part, itemId, rating, value)) cells in vocabulary.

    The transform graph (a side input: its SavedModel directory) is loaded once per worker
    process and shared by all its DoFn instances (`_TRANSFORM_MODEL`); each instance keeps a
    reference, so the model lives as long as one of them does.
    """

    def __init__(self, foldin_fraction: float):
        self._foldin_fraction = foldin_fraction
        self._loaded: tuple[str, object] | None = None
        self._dropped = Metrics.counter(METRICS_NAMESPACE, "heldout_dropped_unknown_content")
        self._loads = Metrics.counter(METRICS_NAMESPACE, "heldout_transform_model_loads")

    def _transform(self, saved_model_dir: str):
        if self._loaded is None or self._loaded[0] != saved_model_dir:

            def load():
                from tensorflow_transform.saved import saved_transform_io_v2

                TRANSFORM_MODEL_LOADS[saved_model_dir] += 1
                self._loads.inc()
                return saved_transform_io_v2.SavedModelLoader(saved_model_dir)

            model = _TRANSFORM_MODEL.acquire(load, tag=saved_model_dir)
            self._loaded = (saved_model_dir, model)
        return self._loaded[1]

    def process(self, batch, saved_model_dir: str):
        visitors = [pair[0] for pair in batch]
        contents = [pair[1] for pair in batch]
        values = np.array([pair[2] for pair in batch], dtype=np.float32)
        outputs = self._transform(saved_model_dir).apply_transform_model(
            {
                features.VISITOR_ID: tf.constant(visitors, tf.string),
                features.CONTENT_ID: tf.constant(contents, tf.string),
                features.VALUE: tf.constant(values),
            }
        )
        items = outputs[features.ITEM_ID].numpy()
        ratings = outputs[features.RATING].numpy()
        for visitor, content, value, item, rating in zip(
            visitors, contents, values, items, ratings, strict=True
        ):
            if item < 0:
                self._dropped.inc()
                continue
            part = (
                features.FOLDIN
                if is_foldin(visitor, content, self._foldin_fraction)
                else (features.TARGET)
            )
            yield visitor, (part, int(item), float(rating), float(value))


class TransformHeldOut(beam.PTransform):
    """Held-out pairs -> their cells in the train vocabulary, scaled like train, split in parts.

    Input: PCollection[list[tuple[str, str, float]]] (visitorId, contentId, value) batches.
    Output: PCollection[tuple[str, tuple[str, int, float, float]]]
        (visitorId, (part "foldin" | "target", itemId, rating, value)).

    Args:
        transform_fn_dir: PCollection[str] of one element, the train transform graph's SavedModel
            directory (the first element of `tft_beam.AnalyzeAndTransformDataset`'s transform_fn).
        foldin_fraction: the share of each visitor's cells (by hash) folded in.
    """

    def __init__(self, transform_fn_dir, foldin_fraction: float):
        super().__init__()
        self._transform_fn_dir = transform_fn_dir
        self._foldin_fraction = foldin_fraction

    def expand(self, pairs):
        return (
            pairs
            | "Unbatch" >> beam.FlatMap(lambda batch: batch)
            | "Batch" >> beam.BatchElements(min_batch_size=64, max_batch_size=4096)
            | "Transform"
            >> beam.ParDo(
                _TransformBatch(self._foldin_fraction),
                beam.pvalue.AsSingleton(self._transform_fn_dir),
            )
        )


class _EncodeVisitorFn(beam.DoFn):
    """(visitorId, its cells) -> (part index, serialized Example) for each non-empty part; the
    bundle's counts heldout_visitors and heldout_<part>_interactions to COUNTS_TAG."""

    def __init__(self):
        self._counts = counts.BundleCounts(METRICS_NAMESPACE)

    def start_bundle(self):
        self._counts.reset()

    def process(self, element):
        visitor, visitor_cells = element
        self._counts.inc("heldout_visitors")
        by_part: dict[str, list] = {part: [] for part in PARTS}
        for part, item, rating, value in visitor_cells:
            by_part[part].append((item, rating, value))
        for index, part in enumerate(PARTS):
            if by_part[part]:
                self._counts.inc(f"heldout_{part}_interactions", len(by_part[part]))
                yield index, examples.heldout_example(visitor, by_part[part])

    def finish_bundle(self):
        yield from self._counts.outputs()


class WriteHeldOut(beam.PTransform):
    """Cells -> `foldin-*` and `target-*` gzip TFRecords under `directory`, one record per
    visitor and non-empty part.

    Input: PCollection[tuple[str, tuple[str, int, float, float]]] from `TransformHeldOut`.
    Output: PCollection[dict[str, int]], exact counts (also Beam counters): heldout_visitors
    (with at least one cell in vocabulary), heldout_foldin_interactions,
    heldout_target_interactions.
    """

    def __init__(self, directory: str, num_shards: int = 0):
        super().__init__()
        self._directory = directory.rstrip("/")
        self._num_shards = num_shards

    def expand(self, cells):
        encoded = (
            cells
            | "GroupByVisitor" >> beam.GroupByKey()
            | "Encode"
            >> beam.ParDo(_EncodeVisitorFn()).with_outputs(counts.COUNTS_TAG, main="encoded")
        )
        parts = encoded.encoded | "ByPart" >> beam.Partition(
            lambda element, _: element[0], len(PARTS)
        )
        for index, part in enumerate(PARTS):
            _ = (
                parts[index]
                | f"Drop{part.title()}Index" >> beam.Map(lambda element: element[1])
                | f"Write{part.title()}"
                >> beam.io.WriteToTFRecord(
                    f"{self._directory}/{part}",
                    file_name_suffix=features.TFRECORD_SUFFIX,
                    num_shards=self._num_shards,
                    compression_type=CompressionTypes.GZIP,
                )
            )
        return encoded[counts.COUNTS_TAG]
