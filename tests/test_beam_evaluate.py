"""Distributed evaluation (`trainer.beam.eval_pipeline`) against the local one of the same model, on
DirectRunner: in-process and multi_processing with 2 workers, two block sizes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from trainer import task
from trainer.beam import eval_pipeline
from trainer.core import metrics
from trainer.local import dataset as data
from trainer.serving import model as model_lib

MULTI = ["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"]


def local_metrics(model_dir: str, dataset_dir: str) -> dict:
    """What trainer.task computes at the end: {"wals": {rmse, ...}, "popularity": {...}}."""
    model, dataset = model_lib.load(model_dir), data.load_dataset(dataset_dir)
    train, heldout = dataset.train, dataset.heldout
    rows = heldout.row_ids()
    predicted = np.einsum("ij,ij->i", model.user_factors[rows], model.item_factors[heldout.indices])
    return {
        "wals": {
            "rmse": metrics.rmse(predicted, heldout.values),
            **metrics.evaluate(
                metrics.factor_scorer(model.user_factors, model.item_factors), train, heldout
            ),
        },
        "popularity": metrics.evaluate_popularity(train, heldout),
    }


def assert_same(actual: dict, expected: dict) -> None:
    for side in ("wals", "popularity"):
        assert list(actual[side]) == list(expected[side])
        for name, value in expected[side].items():
            assert actual[side][name] == pytest.approx(value, rel=1e-6, abs=1e-12), (side, name)


def test_local_helper_matches_the_trainers_metrics_json(tiny_model, tiny_preprocessed):
    with open(os.path.join(tiny_model, task.METRICS_FILE)) as handle:
        written = json.load(handle)
    expected = local_metrics(tiny_model, tiny_preprocessed)
    assert expected["wals"]["users_evaluated"] > 50
    assert_same({k: written[k] for k in ("wals", "popularity")}, expected)


@pytest.mark.parametrize(
    "workers, block_rows, item_chunk", [([], 16, 0), (MULTI, 16, 7), (MULTI, 1000, 1)]
)
def test_distributed_metrics_equal_local_metrics(
    tiny_model, tiny_preprocessed, workers, block_rows, item_chunk
):
    """Any block size and any chunk of items (7: not a divisor of the item count; 1)."""
    actual = eval_pipeline.evaluate_model_distributed(
        tiny_model, tiny_preprocessed, workers, block_rows=block_rows, item_chunk=item_chunk
    )
    assert_same(actual, local_metrics(tiny_model, tiny_preprocessed))


def test_a_model_in_memory_and_other_cutoffs(tiny_model, tiny_preprocessed):
    model = model_lib.load(tiny_model)
    dataset = data.load_dataset(tiny_preprocessed)
    actual = eval_pipeline.evaluate_model_distributed(
        model, tiny_preprocessed, MULTI, ks=(1, 5), block_rows=40
    )
    expected = metrics.evaluate(
        lambda u: model.user_factors[u] @ model.item_factors.T,
        dataset.train,
        dataset.heldout,
        ks=(1, 5),
    )
    assert list(actual["wals"]) == ["rmse", *expected]
    for name, value in expected.items():
        assert actual["wals"][name] == pytest.approx(value, rel=1e-6), name
