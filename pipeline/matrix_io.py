"""Writing the sparse rating matrix as whole rows and whole columns of TFRecords.

Each record is a `tf.train.Example` with `key` int64[1], `indices` int64[n] (sorted), and
`values` float[n] (see `transforms.features`): `items_for_user-*` holds one Example per row
(user), `users_for_item-*` one per column (item).
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pyarrow as pa
import tensorflow as tf
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.metrics import Metrics
from tfx_bsl.coders import example_coder

from pipeline.events import METRICS_NAMESPACE
from transforms import features

# (userId int64 [n], itemId int64 [n], rating float32 [n]): a batch of cells of the matrix.
CellBatch = tuple[np.ndarray, np.ndarray, np.ndarray]
GROUP_SHARDS = 32  # Keys of WriteSparseMatrix's shuffles.


def sparse_example(key: int, entries) -> bytes:
    """Serialises one row or column: entries is an iterable of (index, value)."""
    entries = sorted(entries)
    example = tf.train.Example(
        features=tf.train.Features(
            feature={
                features.KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[key])),
                features.INDICES: tf.train.Feature(
                    int64_list=tf.train.Int64List(value=[index for index, _ in entries])
                ),
                features.VALUES: tf.train.Feature(
                    float_list=tf.train.FloatList(value=[value for _, value in entries])
                ),
            }
        )
    )
    return example.SerializeToString()


def parse_sparse_example(serialized: bytes) -> tuple[int, np.ndarray, np.ndarray]:
    """Inverse of `sparse_example`: (key, indices int64 [n], values float32 [n])."""
    example = tf.train.Example.FromString(serialized)
    feature = example.features.feature
    return (
        feature[features.KEY].int64_list.value[0],
        np.asarray(feature[features.INDICES].int64_list.value, dtype=np.int64),
        np.asarray(feature[features.VALUES].float_list.value, dtype=np.float32),
    )


def sparse_examples(keys: np.ndarray, others: np.ndarray, values: np.ndarray) -> list[bytes]:
    """Serialises the rows (or columns) of a batch of cells, one `sparse_example` per key.

    Args:
        keys: int64 [n], the row (or column) index of each cell.
        others: int64 [n], the column (or row) index of each cell; no (key, other) twice.
        values: float32 [n], the cells' ratings.

    Returns:
        One serialized tf.train.Example per distinct key, indices sorted, in key order; the same
        features as `sparse_example(key, zip(indices, values))`, encoded by tfx_bsl in C++.
    """
    order = np.lexsort((others, keys))
    keys, others, values = keys[order], others[order], values[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    offsets = np.r_[starts, len(keys)].astype(np.int64)
    one_each = np.arange(len(starts) + 1, dtype=np.int64)
    batch = pa.RecordBatch.from_arrays(
        [
            pa.LargeListArray.from_arrays(one_each, pa.array(keys[starts], pa.int64())),
            pa.LargeListArray.from_arrays(offsets, pa.array(others, pa.int64())),
            pa.LargeListArray.from_arrays(offsets, pa.array(values, pa.float32())),
        ],
        [features.KEY, features.INDICES, features.VALUES],
    )
    return example_coder.RecordBatchToExamples(batch)


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


class DropOutOfVocabulary(beam.PTransform):
    """Transformed batches -> batches of (userId, itemId, rating) cells inside both vocabularies.

    Input: PCollection[tuple[pa.RecordBatch, dict]] from TF Transform with
    `output_record_batches=True`: columns userId, itemId (-1 when out of vocabulary), rating.
    Output: PCollection[CellBatch], (userId int64 [n], itemId int64 [n], rating float32 [n]).
    Counters `<split>_interactions` and `<split>_dropped_out_of_vocabulary`.
    """

    def __init__(self, split: str):
        super().__init__()
        self._split = split

    def expand(self, batches):
        kept = Metrics.counter(METRICS_NAMESPACE, f"{self._split}_interactions")
        dropped = Metrics.counter(METRICS_NAMESPACE, f"{self._split}_dropped_out_of_vocabulary")

        def cells(batch_and_passthrough):
            users, items, ratings = transformed_cells(batch_and_passthrough[0])
            keep = (users >= 0) & (items >= 0)
            count = int(keep.sum())
            if count:
                kept.inc(count)
            if count < len(keep):
                dropped.inc(len(keep) - count)
            if count:
                yield users[keep], items[keep], ratings[keep]

        return batches | "KeepInVocabulary" >> beam.FlatMap(cells)


def _by_shard(cells: CellBatch, key_index: int, shards: int):
    """A cell batch -> (shard, (keys, others, values)) with shard = key mod `shards`."""
    keys, others, values = cells[key_index], cells[1 - key_index], cells[2]
    shard_of = keys % shards
    for shard in np.unique(shard_of):
        mask = shard_of == shard
        yield int(shard), (keys[mask], others[mask], values[mask])


def _encode_shard(shard: int, parts) -> list[bytes]:
    parts = list(parts)
    return sparse_examples(*(np.concatenate([part[i] for part in parts]) for i in range(3)))


class WriteSparseMatrix(beam.PTransform):
    """Cells -> `items_for_user-*` and `users_for_item-*` gzip TFRecords under `directory`.

    Input: PCollection[CellBatch] (userId int64 [n], itemId int64 [n], rating float32 [n]), each
    cell in one batch once.
    Output: the PCollections of written file names (rows, columns).

    Cells are grouped by GROUP_SHARDS keys (row or column index mod GROUP_SHARDS), so that the
    shuffle moves a few arrays per batch rather than one element per cell; each group then sorts
    its cells and encodes its rows (columns) in one `sparse_examples` call.
    """

    def __init__(self, directory: str, num_shards: int = 0):
        super().__init__()
        self._directory = directory.rstrip("/")
        self._num_shards = num_shards

    def _write(self, cells, name: str, label: str, key_index: int):
        return (
            cells
            | f"ShardBy{label}" >> beam.FlatMap(_by_shard, key_index, GROUP_SHARDS)
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
