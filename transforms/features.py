"""The contract between preprocessing and training: feature keys, vocabulary names, file layout.

Both `pipeline/` and `trainer/` import these names; nothing else spells them out.

Raw features (one row per (visitor, content) pair, after event aggregation):
    visitorId: str     the visitor's own ID (GA360 `fullVisitorId`, or the CSV/MovieLens user)
    contentId: str     the content's own ID (a hit custom dimension, `page.pagePath`, or an item)
    value: float       interaction strength: summed time on page in ms, or an explicit rating

Transformed features:
    userId: int64      row index in the rating matrix, from the `vocab_users` vocabulary
    itemId: int64      column index, from the `vocab_items` vocabulary
    rating: float32    the scaled rating r_ui
"""

# Raw feature keys.
VISITOR_ID = "visitorId"
CONTENT_ID = "contentId"
VALUE = "value"

# Transformed feature keys.
USER_ID = "userId"
ITEM_ID = "itemId"
RATING = "rating"
# The analyzer statistics the rating was scaled by, one copy per row (read back into summary.json
# and into the exported model, which scales a new visitor's durations the same way).
SCALE_MEDIAN = "scale_median"
SCALE_MIN = "scale_min"
SCALE_MAX = "scale_max"

# Vocabulary names (files under transform_fn/assets/).
USER_VOCAB = "vocab_users"
ITEM_VOCAB = "vocab_items"

# Sparse row / column TFRecords: tf.train.Example with
#   key: int64[1]        the row (userId) or column (itemId) index
#   indices: int64[n]    the column (itemId) or row (userId) indices of the observed cells
#   values: float[n]     the ratings of those cells, aligned with `indices`
KEY = "key"
INDICES = "indices"
VALUES = "values"
ITEMS_FOR_USER = "items_for_user"
USERS_FOR_ITEM = "users_for_item"

# Layout under the preprocessing --output_dir.
TRAIN_DIR = "train"
EVAL_DIR = "eval"
REJECTED_DIR = "rejected"
SUMMARY_FILE = "summary.json"
TFRECORD_SUFFIX = ".tfrecord.gz"

# Held-out visitors (preprocess --holdout_visitors): heldout/foldin-* and heldout/target-*, gzip
# TFRecords of tf.train.Example, one per held-out visitor and part:
#   visitorId: bytes[1]     the visitor's original ID (in no vocabulary)
#   indices: int64[n]       itemIds in the train vocabulary (sorted)
#   values: float[n]        the scaled ratings, as in train/
#   raw_values: float[n]    the interaction values before scaling (durations in ms)
HELDOUT_DIR = "heldout"
FOLDIN = "foldin"
TARGET = "target"
RAW_VALUES = "raw_values"

# Rating scalings (the --scaling flag).
SCALING_MEDIAN = "median"  # r = min(0.3 * value / median(value), 1.0)
SCALING_LOG1P = "log1p"  # r = log1p(value / median(value))
SCALING_UNIT = "unit"  # r = (value - min) / (max - min), for explicit ratings
SCALING_RAW = "raw"  # r = value
SCALINGS = (SCALING_MEDIAN, SCALING_LOG1P, SCALING_UNIT, SCALING_RAW)
MEDIAN_RATING = 0.3  # the rating of a median-length view under SCALING_MEDIAN
