"""The TF Transform preprocessing_fn on a few rows with known vocabularies and ratings."""

import pytest
from tensorflow_transform.beam import tft_unit

from transforms import features, preprocessing

# Frequencies differ so that vocabulary order is known: users u2 (3) > u1 (2) > u3 (1);
# items b (3) > a (2) > c (1). Values sorted: 10 20 30 40 60 100 -> median ~ 30..40.
ROWS = [
    {"visitorId": "u1", "contentId": "a", "value": 10.0},
    {"visitorId": "u1", "contentId": "b", "value": 20.0},
    {"visitorId": "u2", "contentId": "a", "value": 30.0},
    {"visitorId": "u2", "contentId": "b", "value": 40.0},
    {"visitorId": "u2", "contentId": "c", "value": 100.0},
    {"visitorId": "u3", "contentId": "b", "value": 60.0},
]
USER = {"u2": 0, "u1": 1, "u3": 2}
ITEM = {"b": 0, "a": 1, "c": 2}


class PreprocessingFnTest(tft_unit.TransformTestCase):
    def _expected(self, median, rate):
        return [
            {
                features.USER_ID: USER[row["visitorId"]],
                features.ITEM_ID: ITEM[row["contentId"]],
                features.RATING: rate(row["value"]),
                features.SCALE_MEDIAN: median,
            }
            for row in ROWS
        ]

    def test_vocabularies_and_median_scaling(self):
        fn = preprocessing.make_preprocessing_fn(preprocessing.TransformConfig())
        # Of the two middle values (30, 40) tft.quantiles returns the upper one.
        median = 40.0
        self.assertAnalyzeAndTransformResults(
            ROWS,
            preprocessing.raw_metadata(),
            fn,
            self._expected(median, lambda v: min(0.3 * v / median, 1.0)),
            expected_vocab_file_contents={
                features.USER_VOCAB: [b"u2", b"u1", b"u3"],
                features.ITEM_VOCAB: [b"b", b"a", b"c"],
            },
        )

    def test_top_k_maps_the_rest_out_of_vocabulary(self):
        config = preprocessing.TransformConfig(scaling="raw", user_top_k=1, item_min_count=2)
        expected = [
            {
                features.USER_ID: 0 if row["visitorId"] == "u2" else -1,
                features.ITEM_ID: ITEM[row["contentId"]] if row["contentId"] != "c" else -1,
                features.RATING: row["value"],
            }
            for row in ROWS
        ]
        self.assertAnalyzeAndTransformResults(
            ROWS,
            preprocessing.raw_metadata(),
            preprocessing.make_preprocessing_fn(config),
            expected,
        )

    def test_unit_scaling_uses_min_and_max(self):
        config = preprocessing.TransformConfig(scaling="unit")
        expected = [
            {
                features.USER_ID: USER[row["visitorId"]],
                features.ITEM_ID: ITEM[row["contentId"]],
                features.RATING: (row["value"] - 10.0) / 90.0,
                features.SCALE_MIN: 10.0,
                features.SCALE_MAX: 100.0,
            }
            for row in ROWS
        ]
        self.assertAnalyzeAndTransformResults(
            ROWS,
            preprocessing.raw_metadata(),
            preprocessing.make_preprocessing_fn(config),
            expected,
        )


def test_unknown_scaling_is_refused():
    with pytest.raises(ValueError, match="unknown scaling"):
        preprocessing.make_preprocessing_fn(preprocessing.TransformConfig(scaling="zscore"))
