"""Writing the sparse rating matrix as whole rows and whole columns of TFRecords.

Each record is a `tf.train.Example` with `key` int64[1], `indices` int64[n] (sorted), and
`values` float[n] (see `transforms.features`): `items_for_user-*` holds one Example per row
(user), `users_for_item-*` one per column (item).
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.transforms.window import GlobalWindows

from common import counts
from pipeline.events import METRICS_NAMESPACE
from pipeline.options import GROUP_SHARDS
from transforms import examples, features

# (userId int64 [n], itemId int64 [n], rating float32 [n]): a batch of cells of the matrix.
CellBatch = tuple[np.ndarray, np.ndarray, np.ndarray]
MAX_BUFFERED_CELLS = 1 << 21  # Cells (40 MB) buffered in one bundle before they are shuffled.
CELLS_TAG = "cells"


def _column(batch: pa.RecordBatch, name: str) -> np.ndarray:
    """A column of one value per row as a NumPy array (list columns flattened)."""
    column = batch.column(batch.schema.get_field_index(name))
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        column = column.flatten()
    return column.to_numpy(zero_copy_only=False)


def transformed_cells(batch: pa.RecordBatch) -> CellBatch:
    """TF Transform's output RecordBatch -> (userId int64 [n], itemId int64 [n], rating
    float32 [n]), every row, out-of-vocabulary ones (-1) included."""
    return (
        _column(batch, features.USER_ID).astype(np.int64),
        _column(batch, features.ITEM_ID).astype(np.int64),
        _column(batch, features.RATING).astype(np.float32),
    )


class _KeepInVocabularyFn(beam.DoFn):
    """A transformed batch -> its CellBatch of cells inside both vocabularies (none if empty);
    the bundle's counts `<split>_interactions` and `<split>_dropped_out_of_vocabulary` to
    COUNTS_TAG."""

    def __init__(self, split: str):
        self._kept = f"{split}_interactions"
        self._dropped = f"{split}_dropped_out_of_vocabulary"
        self._counts = counts.BundleCounts(METRICS_NAMESPACE)

    def start_bundle(self):
        self._counts.reset()

    def process(self, batch_and_passthrough):
        users, items, ratings = transformed_cells(batch_and_passthrough[0])
        keep = (users >= 0) & (items >= 0)
        kept = int(keep.sum())
        self._counts.inc(self._kept, kept)
        self._counts.inc(self._dropped, len(keep) - kept)
        if kept:
            yield users[keep], items[keep], ratings[keep]

    def finish_bundle(self):
        yield from self._counts.outputs()


class DropOutOfVocabulary(beam.PTransform):
    """Transformed batches -> batches of (userId, itemId, rating) cells inside both vocabularies.

    Input: PCollection[tuple[pa.RecordBatch, dict]] from TF Transform with
    `output_record_batches=True`: columns userId, itemId (-1 when out of vocabulary), rating.
    Output: a DoOutputsTuple with
        cells: PCollection[CellBatch], (userId int64 [n], itemId int64 [n], rating float32 [n]);
        counts: PCollection[dict[str, int]], exact counts `<split>_interactions` (cells kept)
            and `<split>_dropped_out_of_vocabulary` (rows dropped), also Beam counters.
    """

    def __init__(self, split: str):
        super().__init__()
        self._split = split

    def expand(self, batches):
        return batches | "KeepInVocabulary" >> beam.ParDo(
            _KeepInVocabularyFn(self._split)
        ).with_outputs(counts.COUNTS_TAG, main=CELLS_TAG)


def _by_shard(cells: CellBatch, key_index: int, shards: int):
    """A cell batch -> (shard, (keys, others, values)) for each shard present, with
    shard = key mod `shards` (one stable sort, however many shards)."""
    keys, others, values = cells[key_index], cells[1 - key_index], cells[2]
    if shards == 1:
        yield 0, (keys, others, values)
        return
    shard_of = keys % shards
    order = np.argsort(shard_of, kind="stable")
    shard_of = shard_of[order]
    starts = np.flatnonzero(np.r_[True, shard_of[1:] != shard_of[:-1]])
    ends = np.r_[starts[1:], len(order)]
    for start, end in zip(starts.tolist(), ends.tolist()):
        part = order[start:end]
        yield int(shard_of[start]), (keys[part], others[part], values[part])


class _ShardInBundleFn(beam.DoFn):
    """Cell batches -> (shard, (keys, others, values)) with shard = key mod `shards`.

    Buffers a bundle's batches and splits them by shard when the bundle ends, or earlier once it
    holds MAX_BUFFERED_CELLS cells: the shuffle then moves a few coarse arrays per bundle and
    shard, however many shards there are (split batch by batch, thousands of shards would cut
    each batch into elements of a few cells).
    """

    def __init__(self, key_index: int, shards: int):
        self._key_index = key_index
        self._shards = shards
        self._batches: list[CellBatch] = []
        self._cells = 0

    def start_bundle(self):
        self._batches, self._cells = [], 0

    def process(self, cells: CellBatch):
        self._batches.append(cells)
        self._cells += len(cells[0])
        if self._cells >= MAX_BUFFERED_CELLS:
            yield from self._flush()

    def finish_bundle(self):
        for part in self._flush():
            yield GlobalWindows.windowed_value(part)

    def _flush(self):
        batches, self._batches, self._cells = self._batches, [], 0
        if not batches:
            return
        cells = tuple(np.concatenate([batch[i] for batch in batches]) for i in range(3))
        yield from _by_shard(cells, self._key_index, self._shards)


def _encode_shard(shard: int, parts) -> list[bytes]:
    parts = list(parts)
    columns = (np.concatenate([part[i] for part in parts]) for i in range(3))
    return examples.sparse_examples(*columns)


class WriteSparseMatrix(beam.PTransform):
    """Cells -> `items_for_user-*` and `users_for_item-*` gzip TFRecords under `directory`.

    Input: PCollection[CellBatch] (userId int64 [n], itemId int64 [n], rating float32 [n]), each
    cell in one batch once.
    Output: the PCollections of written file names (rows, columns).

    Cells are grouped by `groups` keys (row or column index mod `groups`), split per group once
    per bundle (`_ShardInBundleFn`) so that the shuffle moves a few arrays per bundle rather than
    one element per cell; each group then sorts its cells and encodes its rows (columns) in one
    `sparse_examples` call. A group is held in one worker's memory, so it should hold at most a
    few million cells (`pipeline.options.shuffle_keys` picks the count). The records written do
    not depend on `groups`.
    """

    def __init__(self, directory: str, num_shards: int = 0, groups: int = GROUP_SHARDS):
        super().__init__()
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        self._directory = directory.rstrip("/")
        self._num_shards = num_shards
        self._groups = groups

    def _write(self, cells, name: str, label: str, key_index: int):
        return (
            cells
            | f"ShardBy{label}" >> beam.ParDo(_ShardInBundleFn(key_index, self._groups))
            | f"GroupBy{label}" >> beam.GroupByKey()
            | f"Encode{label}" >> beam.FlatMapTuple(_encode_shard)
            | f"Write{label}"
            >> beam.io.WriteToTFRecord(
                f"{self._directory}/{name}",
                file_name_suffix=features.TFRECORD_SUFFIX,
                num_shards=self._num_shards,
                compression_type=CompressionTypes.GZIP,
            )
        )

    def expand(self, cells):
        rows = self._write(cells, features.ITEMS_FOR_USER, "User", 0)
        columns = self._write(cells, features.USERS_FOR_ITEM, "Item", 1)
        return rows, columns
