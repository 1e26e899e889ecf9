"""Writing the sparse rating matrix as whole rows and whole columns of TFRecords.

Each record is a `tf.train.Example` with `key` int64[1], `indices` int64[n] (sorted), and
`values` float[n] (see `transforms.features`): `items_for_user-*` holds one Example per row
(user), `users_for_item-*` one per column (item).
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import tensorflow as tf
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.metrics import Metrics

from pipeline.events import METRICS_NAMESPACE
from transforms import features


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


class DropOutOfVocabulary(beam.PTransform):
    """Transformed rows -> (userId, itemId, rating) cells inside both vocabularies.

    Input: PCollection[dict] with userId, itemId (-1 when out of vocabulary) and rating.
    Output: PCollection[tuple[int, int, float]]. Counters `<split>_interactions` and
    `<split>_dropped_out_of_vocabulary`.
    """

    def __init__(self, split: str):
        super().__init__()
        self._split = split

    def expand(self, rows):
        kept = Metrics.counter(METRICS_NAMESPACE, f"{self._split}_interactions")
        dropped = Metrics.counter(METRICS_NAMESPACE, f"{self._split}_dropped_out_of_vocabulary")

        def cell(row):
            user, item = int(row[features.USER_ID]), int(row[features.ITEM_ID])
            if user < 0 or item < 0:
                dropped.inc()
                return
            kept.inc()
            yield user, item, float(row[features.RATING])

        return rows | "KeepInVocabulary" >> beam.FlatMap(cell)


class WriteSparseMatrix(beam.PTransform):
    """Cells -> `items_for_user-*` and `users_for_item-*` gzip TFRecords under `directory`.

    Input: PCollection[tuple[int, int, float]] (userId, itemId, rating), each cell once.
    Output: the PCollections of written file names (rows, columns).
    """

    def __init__(self, directory: str, num_shards: int = 0):
        super().__init__()
        self._directory = directory.rstrip("/")
        self._num_shards = num_shards

    def _write(self, cells, name: str, label: str, key_index: int):
        other_index = 1 - key_index
        return (
            cells
            | f"KeyBy{label}"
            >> beam.Map(lambda cell: (cell[key_index], (cell[other_index], cell[2])))
            | f"GroupBy{label}" >> beam.GroupByKey()
            | f"Encode{label}" >> beam.MapTuple(sparse_example)
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
