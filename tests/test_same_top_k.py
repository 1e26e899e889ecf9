"""One model, one list: for the same trained model and data, the top-K lists behind
metrics.json (the trainer's evaluation), the quality gate's scoring of the candidate and batch
prediction are the same items in the same order for every visitor they share.

The evaluation's lists are caught where every ranking of a batch of users is made
(`trainer.core.chunked_topk.chunked_top_k`, or `trainer.core.topk.top_k_excluding` for a scorer
that returns whole score rows); that they are metrics.json's lists is checked by recomputing
metrics.json's figures from them."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from trainer import batch_predict, task
from trainer.core import chunked_topk, metrics, topk
from trainer.core.factors import WALSFactors
from trainer.evaluation import gate
from trainer.local import dataset as data
from trainer.serving import model as model_lib
from trainer.serving import predictions

K = 20


class ListSpy:
    """Records the lists `chunked_topk.chunked_top_k` and `topk.top_k_excluding` return, per
    top-level `metrics.evaluate` call."""

    def __init__(self, monkeypatch):
        self.calls: list[list[np.ndarray]] = []
        self._depth = 0
        top_k, chunked, evaluate = (
            topk.top_k_excluding,
            chunked_topk.chunked_top_k,
            metrics.evaluate,
        )

        def spy(rank):
            def ranked(*args, **kwargs):
                ids, top = rank(*args, **kwargs)
                if self._depth:
                    self.calls[-1].append(ids)
                return ids, top

            return ranked

        def spy_evaluate(*args, **kwargs):
            if self._depth == 0:
                self.calls.append([])
            self._depth += 1
            try:
                return evaluate(*args, **kwargs)
            finally:
                self._depth -= 1

        monkeypatch.setattr(topk, "top_k_excluding", spy(top_k))
        monkeypatch.setattr(chunked_topk, "chunked_top_k", spy(chunked))
        monkeypatch.setattr(metrics, "evaluate", spy_evaluate)

    def lists(self, call: int) -> np.ndarray:
        """int64 [users evaluated, k]: the lists of one evaluate call, in user order."""
        return np.concatenate(self.calls[call])


@pytest.fixture(scope="module")
def model_and_data(tiny_model, tiny_preprocessed):
    with open(os.path.join(tiny_model, task.METRICS_FILE)) as handle:
        written = json.load(handle)
    return model_lib.load(tiny_model), data.load_dataset(tiny_preprocessed), written


def test_metrics_json_gate_and_batch_prediction_rank_alike(
    model_and_data, tiny_model, tiny_preprocessed, monkeypatch, tmp_path
):
    model, dataset, written = model_and_data
    train, heldout = dataset.train, dataset.heldout
    evaluated = np.flatnonzero(heldout.row_counts() > 0)
    spy = ListSpy(monkeypatch)

    # metrics.json: the trainer's final evaluation of its factors, with its cut-offs.
    ks = tuple(int(name.split("@")[1]) for name in written["wals"] if name.startswith("recall@"))
    factors = WALSFactors(model.user_factors, model.item_factors)
    recomputed = metrics.evaluate(
        metrics.factor_scorer(factors.user_factors, factors.item_factors), train, heldout, ks=ks
    )
    for name, value in recomputed.items():
        assert written["wals"][name] == pytest.approx(value, rel=1e-12, abs=0), name
    trainer_lists = spy.lists(0)[:, :K]  # the lists end at max(ks) >= K; rank r is rank r

    # The gate, on the candidate: its first evaluate call (then popularity's).
    decision = gate.evaluate(tiny_model, tiny_preprocessed, None, gate.GateConfig(k=K))
    gate_lists = spy.lists(1)
    assert decision["candidate"]["users_evaluated"] == evaluated.size == gate_lists.shape[0]
    assert decision["candidate"][f"recall@{K}"] == pytest.approx(
        written["wals"][f"recall@{K}"], rel=1e-12
    )

    # Batch prediction, every visitor.
    out = str(tmp_path / "recs.tsv")
    batch_predict.run(["--model_dir", tiny_model, "--output", out, "--k", str(K), "--no_progress"])
    predicted = {row.key: row.ranked for row in predictions.read_predictions(out)}

    assert trainer_lists.shape == (evaluated.size, K) and evaluated.size > 50
    np.testing.assert_array_equal(gate_lists, trainer_lists)
    for row, user in enumerate(evaluated):
        listed = [model.items[i] for i in trainer_lists[row] if i >= 0]
        assert predicted[model.users[user]] == listed, model.users[user]
