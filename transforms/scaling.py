"""Rating scalings: the math that turns an interaction value into a rating r_ui.

Written once with TensorFlow ops and used twice: by `preprocessing_fn` (with statistics from the
analyze phase) and by the exported model's fold-in signature (with the same statistics, saved at
training time), so a new visitor's durations are scaled exactly like the training data.
"""

from __future__ import annotations

import tensorflow as tf

from transforms import features

# Statistics each scaling needs, by name.
STATS_BY_SCALING: dict[str, tuple[str, ...]] = {
    features.SCALING_MEDIAN: ("median",),
    features.SCALING_LOG1P: ("median",),
    features.SCALING_UNIT: ("min", "max"),
    features.SCALING_RAW: (),
}


def scale(values: tf.Tensor, scaling: str, stats: dict[str, tf.Tensor | float]) -> tf.Tensor:
    """Scales interaction values into ratings.

    Args:
        values: float32 [n], durations in ms or explicit ratings.
        scaling: one of `features.SCALINGS`:
            median: r = min(0.3 * v / median, 1.0)   (a median-length view rates 0.3)
            log1p:  r = log1p(v / median)
            unit:   r = (v - min) / (max - min), or 1.0 where max == min
            raw:    r = v
        stats: the statistics `STATS_BY_SCALING[scaling]` names, scalars.

    Returns:
        float32 [n] ratings.
    """
    values = tf.cast(values, tf.float32)
    if scaling in (features.SCALING_MEDIAN, features.SCALING_LOG1P):
        # A median of 0 is impossible for positive sums; the floor keeps the division finite.
        median = tf.maximum(tf.cast(stats["median"], tf.float32), 1e-6)
        if scaling == features.SCALING_MEDIAN:
            return tf.minimum(features.MEDIAN_RATING * values / median, 1.0)
        return tf.math.log1p(values / median)
    if scaling == features.SCALING_UNIT:
        lo = tf.cast(stats["min"], tf.float32)
        hi = tf.cast(stats["max"], tf.float32)
        span = hi - lo
        return tf.where(span > 0, (values - lo) / tf.where(span > 0, span, 1.0), 1.0)
    if scaling == features.SCALING_RAW:
        return values
    raise ValueError(f"unknown scaling {scaling!r}; expected one of {features.SCALINGS}")
