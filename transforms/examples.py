"""The Example codecs of the contract: how a matrix row or column and a held-out visitor's part
are laid out in a `tf.train.Example` (feature keys in `transforms.features`).

Preprocessing writes them (`pipeline.matrix_io`, `pipeline.holdout`); the trainer reads them
(`trainer.local.dataset`, `trainer.beam`). Both import this one module, so the layout cannot
drift apart.

    sparse_example(key, [(index, value), ...])        one row (column): key int64[1],
                                                       indices int64[n] sorted, values float[n]
    heldout_example(visitorId, [(item, rating, raw)])  one held-out visitor's part: visitorId
                                                       bytes[1], indices, values, raw_values
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import tensorflow as tf
from tfx_bsl.coders import example_coder

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


def heldout_example(visitor_id: str, entries) -> bytes:
    """One visitor's part: entries is an iterable of (itemId, rating, value)."""
    entries = sorted(entries)
    feature = {
        features.VISITOR_ID: tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[visitor_id.encode("utf-8")])
        ),
        features.INDICES: tf.train.Feature(
            int64_list=tf.train.Int64List(value=[entry[0] for entry in entries])
        ),
        features.VALUES: tf.train.Feature(
            float_list=tf.train.FloatList(value=[entry[1] for entry in entries])
        ),
        features.RAW_VALUES: tf.train.Feature(
            float_list=tf.train.FloatList(value=[entry[2] for entry in entries])
        ),
    }
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString()


def parse_heldout_example(serialized: bytes) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of `heldout_example`: (visitorId, itemIds int64 [n], ratings float32 [n],
    raw values float32 [n])."""
    feature = tf.train.Example.FromString(serialized).features.feature
    return (
        feature[features.VISITOR_ID].bytes_list.value[0].decode("utf-8"),
        np.asarray(feature[features.INDICES].int64_list.value, dtype=np.int64),
        np.asarray(feature[features.VALUES].float_list.value, dtype=np.float32),
        np.asarray(feature[features.RAW_VALUES].float_list.value, dtype=np.float32),
    )
