"""The quality gate scored here and on the runner (`gate.evaluate` with Beam flags): the same
decision and figures, against a published model whose vocabularies differ from the candidate's."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.core import foldin, metrics
from trainer.evaluation import gate, published_foldin
from trainer.local import dataset as data
from trainer.serving import model as model_lib

MULTI = ["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"]
K = 5


@pytest.fixture(scope="module")
def published_dir(tiny_model, tmp_path_factory) -> str:
    """A model like yesterday's: a third of today's content unknown to it, the rest in another
    order, among content of its own; a third of today's visitors unknown, and perturbed factors
    (so that its lists differ from the candidate's)."""
    today = model_lib.load(tiny_model)
    rng = np.random.default_rng(3)
    kept_items = rng.permutation(np.flatnonzero(np.arange(len(today.items)) % 3 != 0))
    items = [today.items[i] for i in kept_items] + [f"retired-{n}" for n in range(7)]
    k = today.item_factors.shape[1]
    item_factors = np.concatenate(
        [today.item_factors[kept_items], rng.normal(0, 0.1, (7, k)).astype(np.float32)]
    )
    item_factors += rng.normal(0, 0.05, item_factors.shape).astype(np.float32)
    kept_users = np.flatnonzero(np.arange(len(today.users)) % 3 != 1)
    counts = np.concatenate([today.item_counts[kept_items], np.arange(1, 8)])
    empty = np.zeros(kept_users.size + 1, dtype=np.int64)
    published = model_lib.WALSModel(
        user_factors=today.user_factors[kept_users],
        item_factors=item_factors.astype(np.float32),
        seen_indptr=empty,
        seen_indices=np.zeros(0, np.int32),
        item_counts=counts.astype(np.int64),
        users=[today.users[u] for u in kept_users],
        items=items,
        config={**today.config, "regularization": 0.5},
    )
    out = str(tmp_path_factory.mktemp("published") / "model")
    model_lib.save(published, out)
    return out


def test_published_scores_are_the_dense_oracle_with_unknown_content_last(
    tiny_preprocessed, published_dir
):
    """PublishedScores chunk by chunk equals x · Yᵀ of the published factors mapped into the
    candidate's items, with unknown content at -1e30, computed densely here."""
    dataset = data.load_dataset(tiny_preprocessed)
    published = model_lib.load(published_dir)
    score_fn, facts = gate.published_scorer(published, dataset)
    users = np.flatnonzero(dataset.heldout.row_counts() > 0)[:20]
    block = score_fn(users)
    index = {c: i for i, c in enumerate(published.items)}
    mapped = np.array([index.get(c, -1) for c in dataset.items])
    rows = published_foldin.map_rows(dataset.train, users, mapped, len(published.items))
    x = foldin.fold_in_rows(
        rows, published.item_factors, published.item_counts, published.wals_config()
    )
    dense = (
        x.astype(np.float64) @ published.item_factors[np.maximum(mapped, 0)].T.astype(np.float64)
    ).astype(np.float32)
    dense[:, mapped < 0] = published_foldin.UNKNOWN_SCORE
    for start, stop in ((0, 7), (7, 8), (8, len(dataset.items))):
        np.testing.assert_allclose(block.scores(start, stop), dense[:, start:stop], rtol=1e-5)
    assert facts["known_content"] == int((mapped >= 0).sum()) < facts["content"]
    assert 0 < facts["known_visitors"] < facts["eval_visitors"]


def test_the_gate_on_the_runner_equals_the_gate_here(
    tiny_model, tiny_preprocessed, published_dir, tmp_path
):
    config = gate.GateConfig(k=K, min_lift=0.5, tolerance=0.05)
    here = gate.evaluate(tiny_model, tiny_preprocessed, published_dir, config)
    runner = gate.evaluate(
        tiny_model,
        tiny_preprocessed,
        published_dir,
        config,
        [*MULTI, "--temp_location", str(tmp_path / "tmp")],
        item_chunk=7,
    )
    assert here["published"] != here["candidate"]  # the published model ranks otherwise
    assert runner["decision"] == here["decision"] and runner["reasons"] == here["reasons"]
    assert runner["published_coverage"] == here["published_coverage"]
    for side in ("candidate", "popularity", "published"):
        assert runner[side]["users_evaluated"] == here[side]["users_evaluated"] > 0
        for name in (f"recall@{K}", f"ndcg@{K}"):
            assert runner[side][name] == pytest.approx(here[side][name], rel=1e-9), (side, name)
    # The candidate's figures are those of the trainer's own evaluation code.
    dataset = data.load_dataset(tiny_preprocessed)
    candidate = model_lib.load(tiny_model)
    direct = metrics.evaluate(
        metrics.factor_scorer(candidate.user_factors, candidate.item_factors),
        dataset.train,
        dataset.heldout,
        ks=(K,),
    )
    assert here["candidate"][f"recall@{K}"] == pytest.approx(direct[f"recall@{K}"], rel=1e-12)
    assert list((tmp_path / "tmp").iterdir()) == []  # the workers' scratch is gone


def test_the_gate_on_the_runner_refuses_a_candidate_of_other_data(tiny_preprocessed, published_dir):
    with pytest.raises(ValueError, match="was not trained on"):
        gate.evaluate(published_dir, tiny_preprocessed, None, gate.GateConfig(k=K), [])
