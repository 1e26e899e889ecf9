"""The TF Transform `preprocessing_fn`: vocabularies for visitors and content, scaled ratings.

Input (one row per (visitor, content) pair of the train split):
    {visitorId: tf.string [batch], contentId: tf.string [batch], value: tf.float32 [batch]}
Output:
    {userId: int64 [batch], itemId: int64 [batch], rating: float32 [batch], plus the scaling's
     statistics (scale_median, or scale_min and scale_max) broadcast to [batch]}

Visitors and content outside the vocabularies (cut by `top_k` / `frequency_threshold`, or unseen
when the transform is applied to the eval split) map to -1; the pipeline drops and counts them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import tensorflow as tf
import tensorflow_transform as tft
from tensorflow_transform.tf_metadata import dataset_metadata, schema_utils
from tfx_bsl.tfxio import tensor_adapter

from transforms import features, scaling

RAW_FEATURE_SPEC = {
    features.VISITOR_ID: tf.io.FixedLenFeature([], tf.string),
    features.CONTENT_ID: tf.io.FixedLenFeature([], tf.string),
    features.VALUE: tf.io.FixedLenFeature([], tf.float32),
}
OUT_OF_VOCABULARY = -1


def raw_metadata() -> dataset_metadata.DatasetMetadata:
    """The raw rows' schema, for `AnalyzeAndTransformDataset`."""
    return dataset_metadata.DatasetMetadata(schema_utils.schema_from_feature_spec(RAW_FEATURE_SPEC))


# The raw rows as TF Transform's TFXIO input (Apache Arrow): one row per pair, each column a
# large_list holding exactly one value per row, as tfx_bsl decodes tf.Examples of RAW_FEATURE_SPEC.
_RAW_ARROW_TYPES = {
    features.VISITOR_ID: pa.large_binary(),
    features.CONTENT_ID: pa.large_binary(),
    features.VALUE: pa.float32(),
}


def raw_tensor_adapter_config() -> tensor_adapter.TensorAdapterConfig:
    """The raw rows' Arrow schema and tensor representations, for `AnalyzeAndTransformDataset`
    and `TransformDataset` fed with `raw_record_batch`es."""
    from tfx_bsl.tfxio import tensor_representation_util

    schema = raw_metadata().schema
    arrow_schema = pa.schema(
        [pa.field(name, pa.large_list(kind)) for name, kind in sorted(_RAW_ARROW_TYPES.items())]
    )
    representations = tensor_representation_util.InferTensorRepresentationsFromSchema(schema)
    return tensor_adapter.TensorAdapterConfig(arrow_schema, representations)


def _one_per_row(values: pa.Array) -> pa.LargeListArray:
    return pa.LargeListArray.from_arrays(np.arange(len(values) + 1, dtype=np.int64), values)


def raw_record_batch(pairs: list) -> pa.RecordBatch:
    """A batch of (visitorId, contentId, value) pairs -> a RecordBatch of raw rows.

    Columns as `raw_tensor_adapter_config()` describes: visitorId and contentId as UTF-8 bytes,
    value as float32.
    """
    visitors = pa.array([pair[0] for pair in pairs], pa.large_string()).cast(pa.large_binary())
    contents = pa.array([pair[1] for pair in pairs], pa.large_string()).cast(pa.large_binary())
    values = pa.array(np.array([pair[2] for pair in pairs], dtype=np.float32))
    columns = {features.VISITOR_ID: visitors, features.CONTENT_ID: contents, features.VALUE: values}
    names = sorted(columns)
    return pa.RecordBatch.from_arrays([_one_per_row(columns[name]) for name in names], names)


@dataclass(frozen=True)
class TransformConfig:
    """What the analyze phase computes.

    Attributes:
        scaling: one of `features.SCALINGS` (see `transforms.scaling.scale`).
        user_top_k / item_top_k: keep only the most frequent visitors / content (None: all).
        user_min_count / item_min_count: keep only visitors / content seen in at least this many
            train pairs (tft's `frequency_threshold`).
        quantile_epsilon: rank error bound of the approximate median (`tft.quantiles`).
    """

    scaling: str = features.SCALING_MEDIAN
    user_top_k: int | None = None
    item_top_k: int | None = None
    user_min_count: int = 0
    item_min_count: int = 0
    quantile_epsilon: float = 1e-3


def _statistics(values: tf.Tensor, scaling_name: str, epsilon: float) -> dict[str, tf.Tensor]:
    """Analyzers over the whole train split: the scalars `scaling.scale` needs."""
    needed = scaling.STATS_BY_SCALING[scaling_name]
    stats = {}
    if "median" in needed:
        # Two buckets: the single boundary is the (approximate) median.
        stats["median"] = tf.reshape(tft.quantiles(values, num_buckets=2, epsilon=epsilon), [-1])[0]
    if "min" in needed:
        stats["min"] = tft.min(values)
    if "max" in needed:
        stats["max"] = tft.max(values)
    return stats


_STAT_FEATURES = {
    "median": features.SCALE_MEDIAN,
    "min": features.SCALE_MIN,
    "max": features.SCALE_MAX,
}


def make_preprocessing_fn(config: TransformConfig) -> Callable[[dict], dict]:
    """Builds the `preprocessing_fn` for `config` (a pure function of its inputs)."""
    if config.scaling not in features.SCALINGS:
        raise ValueError(f"unknown scaling {config.scaling!r}; expected one of {features.SCALINGS}")

    def preprocessing_fn(inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        user_id = tft.compute_and_apply_vocabulary(
            inputs[features.VISITOR_ID],
            default_value=OUT_OF_VOCABULARY,
            top_k=config.user_top_k,
            frequency_threshold=config.user_min_count or None,
            vocab_filename=features.USER_VOCAB,
        )
        item_id = tft.compute_and_apply_vocabulary(
            inputs[features.CONTENT_ID],
            default_value=OUT_OF_VOCABULARY,
            top_k=config.item_top_k,
            frequency_threshold=config.item_min_count or None,
            vocab_filename=features.ITEM_VOCAB,
        )
        values = tf.cast(inputs[features.VALUE], tf.float32)
        stats = _statistics(values, config.scaling, config.quantile_epsilon)
        outputs = {
            features.USER_ID: user_id,
            features.ITEM_ID: item_id,
            features.RATING: scaling.scale(values, config.scaling, stats),
        }
        for name, stat in stats.items():
            outputs[_STAT_FEATURES[name]] = tf.fill(tf.shape(values), tf.cast(stat, tf.float32))
        return outputs

    return preprocessing_fn
