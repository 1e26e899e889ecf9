"""The objective's terms (`trainer.core.objective`) and their TF twins
(`trainer.core.objective_tf`): exact values from the formulas, the twins equal in float64, the
one validation of `WALSConfig`, and the old weighting names (config.json keys and flags).
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import tensorflow as tf

from trainer import task
from trainer.core import objective, objective_tf
from trainer.core.objective import WALSConfig
from trainer.serving.model import WALSModel

# Item 3 has no training cell; item 0 is the most frequent.
COUNTS = np.array([7, 1, 3, 0, 2], dtype=np.int64)
# Cells: every item, some twice, ratings of both signs (a new visitor's rating may be < 0).
ITEMS = np.array([0, 1, 2, 3, 4, 0, 2, 4], dtype=np.int64)
RATINGS = np.array([0.5, 1.0, -0.25, 0.75, 0.0, 2.0, 0.125, -3.0], dtype=np.float64)
# Every weighting (and the old name of one), with parameters that are not 1.
CONFIGS = {
    "uniform": WALSConfig(weighting="uniform"),
    "column_frequency": WALSConfig(
        weighting="column_frequency", column_weight_scale=2.5, column_weight_exponent=-0.7
    ),
    "column_frequency_linear": WALSConfig(
        weighting="column_frequency", column_weight_scale=0.5, column_weight_exponent=1.0
    ),
    "inverse_frequency": WALSConfig(weighting="inverse_frequency", inverse_frequency_exponent=0.3),
    "log": WALSConfig(weighting="log", inverse_frequency_exponent=1.5),
    "confidence": WALSConfig(weighting="confidence", confidence_alpha=4.0),
}


def expected_f(config: WALSConfig) -> np.ndarray:
    """f_ui of the cells, written out per weighting (the module docstring's table)."""
    c = COUNTS[ITEMS].astype(np.float64)
    safe = np.where(c > 0, c, 1.0)
    if config.weighting == "uniform":
        per_item = np.ones_like(c)
    elif config.weighting == "column_frequency":
        per_item = config.column_weight_scale * safe**config.column_weight_exponent
    elif config.weighting == "inverse_frequency":
        per_item = (1.0 / safe) ** config.inverse_frequency_exponent
    else:
        return config.confidence_alpha * np.maximum(RATINGS, 0.0)
    return np.where(c > 0, per_item, 0.0)


@pytest.mark.parametrize("case", CONFIGS)
def test_observed_weight_follows_the_formula(case):
    config = CONFIGS[case]
    weights = objective.observed_weights(config, COUNTS)
    f = weights.f(ITEMS, RATINGS)
    assert f.dtype == np.float64 and f.shape == ITEMS.shape
    np.testing.assert_allclose(f, expected_f(config), rtol=1e-13, atol=0)
    assert weights.per_item[3] == 0.0  # no training cell, no weight
    assert weights.per_rating == (4.0 if config.weighting == "confidence" else 0.0)


def test_observed_weights_by_hand():
    counts = np.array([4, 1, 0])
    column = WALSConfig(weighting="column_frequency", column_weight_scale=2.0)
    np.testing.assert_array_equal(
        objective.observed_weights(column, counts).per_item, [0.5, 2.0, 0.0]
    )
    inverse = WALSConfig(weighting="inverse_frequency", inverse_frequency_exponent=0.5)
    np.testing.assert_array_equal(
        objective.observed_weights(inverse, counts).per_item, [0.5, 1.0, 0.0]
    )
    confidence = objective.observed_weights(
        WALSConfig(weighting="confidence", confidence_alpha=3), counts
    )
    np.testing.assert_array_equal(confidence.f([0, 1, 2], [1.0, -2.0, 0.5]), [3.0, 0.0, 1.5])


@pytest.mark.parametrize("case", CONFIGS)
@pytest.mark.parametrize("binary", [True, False])
def test_tf_twins_equal_numpy(case, binary):
    config = dataclasses.replace(CONFIGS[case], binary_target=binary)
    numpy_f = objective.observed_weights(config, COUNTS).f(ITEMS, RATINGS)
    tf_f = objective_tf.observed_weight(config, tf.gather(COUNTS, ITEMS), RATINGS)
    assert tf_f.dtype == tf.float64
    np.testing.assert_allclose(tf_f.numpy(), numpy_f, rtol=1e-12, atol=0)

    numpy_t = objective.target(config, RATINGS)
    tf_t = objective_tf.target(config, RATINGS)
    np.testing.assert_allclose(tf_t.numpy(), numpy_t, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(numpy_t, np.ones_like(RATINGS) if binary else RATINGS)


@pytest.mark.parametrize("exponent", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("w0", [0.0, 0.3])
def test_regularization_twins_equal_numpy(exponent, w0):
    config = WALSConfig(regularization=0.07, unobserved_weight=w0, regularization_exp=exponent)
    counts = np.array([0, 1, 3, 10, 250])
    numpy_reg = objective.row_regularization(config, counts, 40)
    np.testing.assert_allclose(numpy_reg, 0.07 * (counts + w0 * 40) ** exponent, rtol=1e-13)
    tf_reg = objective_tf.row_regularization(config, tf.constant(counts), 40)
    assert tf_reg.dtype == tf.float64
    np.testing.assert_allclose(tf_reg.numpy(), numpy_reg, rtol=1e-12, atol=0)


def test_tf_twins_work_inside_a_tf_function():
    """As the SavedModel uses them: config values are graph constants, the data tensors."""
    config = CONFIGS["confidence"]

    @tf.function(
        input_signature=[tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.float32)]
    )
    def terms(counts, ratings):
        return (
            objective_tf.observed_weight(config, counts, ratings),
            objective_tf.target(config, ratings),
            objective_tf.row_regularization(config, tf.size(counts), 5),
        )

    ratings = RATINGS.astype(np.float32)
    f, t, reg = terms(COUNTS[ITEMS], ratings)
    np.testing.assert_allclose(
        f.numpy(), objective.observed_weights(config, COUNTS).f(ITEMS, ratings), rtol=1e-12
    )
    np.testing.assert_array_equal(t.numpy(), np.ones(ITEMS.size))
    np.testing.assert_allclose(
        reg.numpy(), objective.row_regularization(config, np.array(ITEMS.size), 5), rtol=1e-12
    )


@pytest.mark.parametrize(
    "field, value",
    [
        ("latent_factors", 0),
        ("latent_factors", 2.5),
        ("num_iters", -1),
        ("regularization", -0.1),
        ("regularization_exp", -1.0),
        ("unobserved_weight", float("nan")),
        ("weighting", "popularity"),
        ("column_weight_scale", -1.0),
        ("column_weight_exponent", float("inf")),
        ("inverse_frequency_exponent", float("nan")),
        ("confidence_alpha", -2.0),
        ("solver", "lu"),
        ("cg_steps", 0),
        ("init_stddev", 0.0),
        ("seed", -1),
        ("binary_target", "yes"),
    ],
)
def test_the_one_validation_names_each_bad_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        WALSConfig(**{field: value})
    with pytest.raises(ValueError, match=f"^{field} must be"):
        dataclasses.replace(WALSConfig(), **{field: value})


def test_no_regularization_and_no_unobserved_weight_is_rejected():
    with pytest.raises(ValueError, match="^regularization must be > 0 when unobserved_weight"):
        WALSConfig(regularization=0.0, unobserved_weight=0.0)
    WALSConfig(regularization=0.0, unobserved_weight=0.1)  # w0·G keeps the equations regular


def legacy_model(config: dict) -> WALSModel:
    empty = np.zeros((0, 2), np.float32)
    return WALSModel(
        empty, empty, np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64),
        [], [], config,
    )  # fmt: skip


@pytest.mark.parametrize(
    "saved, expected",
    [
        (
            {"weighting": "column_frequency", "feature_wt_factor": 2.0, "feature_wt_exp": 0.5},
            {"column_weight_scale": 2.0, "column_weight_exponent": 0.5},
        ),
        (
            {"weighting": "log", "feature_wt_factor": 130.0, "feature_wt_exp": 0.08},
            {
                "weighting": "inverse_frequency",
                "column_weight_scale": 130.0,
                "inverse_frequency_exponent": 0.08,
            },
        ),
        (
            {"weighting": "inverse_frequency", "feature_wt_exp": 2.0},
            {"inverse_frequency_exponent": 2.0, "column_weight_exponent": -1.0},
        ),
        # The exponent meant nothing under uniform: it sets neither (both keep their defaults).
        (
            {"weighting": "uniform", "feature_wt_exp": 3.0},
            {"column_weight_exponent": -1.0, "inverse_frequency_exponent": 1.0},
        ),
        # A key under its new name wins.
        (
            {"weighting": "column_frequency", "feature_wt_exp": 3.0, "column_weight_exponent": 1},
            {"column_weight_exponent": 1},
        ),
    ],
)
def test_models_saved_with_the_old_weighting_keys_still_load(saved, expected):
    config = legacy_model({"latent_factors": 2, "scaling": "median", **saved}).wals_config()
    for field, value in expected.items():
        assert getattr(config, field) == value, field
    assert config.binary_target is False  # a config without the key predates binary_target


def test_a_current_config_round_trips_through_the_model():
    config = WALSConfig(weighting="column_frequency", column_weight_exponent=0.25, seed=3)
    saved = {**dataclasses.asdict(config), "scaling": "median", "scale_stats": {}}
    assert legacy_model(saved).wals_config() == config


def parse(*flags: str):
    return task.build_parser().parse_args(["--input_dir", "in", "--output_dir", "out", *flags])


@pytest.mark.parametrize(
    "flags, expected",
    [
        (
            [
                "--weighting",
                "column_frequency",
                "--feature_wt_factor",
                "3",
                "--feature_wt_exp",
                "1",
            ],
            {"column_weight_scale": 3.0, "column_weight_exponent": 1.0},
        ),
        # The exponent goes to the chosen weighting's field, whatever the flag order.
        (
            ["--feature_wt_exp", "0.5", "--weighting", "inverse_frequency"],
            {"inverse_frequency_exponent": 0.5, "column_weight_exponent": -1.0},
        ),
        (
            ["--weighting", "log", "--feature_wt_exp", "0.25"],
            {"weighting": "inverse_frequency", "inverse_frequency_exponent": 0.25},
        ),
    ],
)
def test_the_deprecated_flags_still_work_and_warn(flags, expected):
    with pytest.warns(FutureWarning, match="deprecated") as record:
        args = parse(*flags)
    deprecated = [flag for flag in flags if flag.startswith("--feature_wt")]
    assert len(record) == len(deprecated)
    for flag, warning in zip(deprecated, record, strict=True):
        assert str(warning.message).startswith(f"{flag} is deprecated")
    config = task.config_from_args(args)
    for field, value in expected.items():
        assert getattr(config, field) == value, field


def test_the_new_flags_set_the_fields_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        args = parse(
            "--weighting", "column_frequency",
            "--column_weight_scale", "4",
            "--column_weight_exponent", "0.5",
            "--inverse_frequency_exponent", "2",
        )  # fmt: skip
    config = task.config_from_args(args)
    assert (config.column_weight_scale, config.column_weight_exponent) == (4.0, 0.5)
    assert config.inverse_frequency_exponent == 2.0
    assert task.config_from_args(parse()) == WALSConfig()


def test_inverse_frequency_weighs_an_item_by_its_inverse_frequency_by_default():
    weights = objective.observed_weights(WALSConfig(weighting="inverse_frequency"), [4, 1, 0])
    np.testing.assert_allclose(weights.per_item, [0.25, 1.0, 0.0])
    # A model saved with the old shared exponent (default -1) keeps its f = c_i when loaded.
    old = WALSConfig.from_dict({"weighting": "inverse_frequency", "feature_wt_exp": -1.0})
    np.testing.assert_allclose(objective.observed_weights(old, [4, 1, 0]).per_item, [4, 1, 0])
