"""trainer.model (recommend, similar_items, save/load) and trainer.batch_predict, on a
hand-built model checked against plain NumPy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trainer import batch_predict
from trainer import model as model_lib

N_USERS, N_ITEMS, K = 7, 12, 4
SEEN = [[0, 1], [2], [0, 3, 5, 7, 9, 11], [], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [6], [0, 11]]
USERS = [f"visitor-{u}" for u in range(N_USERS)]
ITEMS = [f"/article/{i}" for i in range(N_ITEMS)]


@pytest.fixture()
def model() -> model_lib.WALSModel:
    rng = np.random.default_rng(3)
    indptr = np.concatenate([[0], np.cumsum([len(s) for s in SEEN])]).astype(np.int64)
    indices = np.concatenate([np.asarray(s, np.int32) for s in SEEN])
    return model_lib.WALSModel(
        user_factors=rng.standard_normal((N_USERS, K)).astype(np.float32),
        item_factors=rng.standard_normal((N_ITEMS, K)).astype(np.float32),
        seen_indptr=indptr,
        seen_indices=indices,
        item_counts=np.bincount(indices, minlength=N_ITEMS).astype(np.int64),
        users=USERS,
        items=ITEMS,
        config={"latent_factors": K},
    )


def oracle_top_k(model, user: int, k: int) -> list[str]:
    scores = model.user_factors[user].astype(np.float64) @ model.item_factors.T.astype(np.float64)
    ranked = sorted((i for i in range(N_ITEMS) if i not in SEEN[user]), key=lambda i: -scores[i])
    return [ITEMS[i] for i in ranked[:k]]


def test_recommend_matches_numpy_and_excludes_seen(model):
    for k in (1, 3, 12):
        for user, recs in enumerate(model.recommend(USERS, k)):
            assert recs.known and recs.visitor_id == USERS[user]
            assert recs.content_ids == oracle_top_k(model, user, k)
            assert not set(recs.content_ids) & {ITEMS[i] for i in SEEN[user]}
            assert recs.scores == sorted(recs.scores, reverse=True)


def test_recommend_unknown_visitor_gets_popular_items(model):
    unknown, known = model.recommend(["nobody", USERS[1]], k=3)
    counts = np.bincount(np.concatenate([s for s in SEEN if s]), minlength=N_ITEMS)
    popular = sorted(range(N_ITEMS), key=lambda i: (-counts[i], i))[:3]
    assert not unknown.known and unknown.content_ids == [ITEMS[i] for i in popular]
    assert known.known and known.content_ids == oracle_top_k(model, 1, 3)


def test_recommend_fewer_unseen_items_than_k(model):
    (recs,) = model.recommend([USERS[4]], k=10)
    assert sorted(recs.content_ids) == sorted([ITEMS[0], ITEMS[11]])


def test_similar_items_by_cosine(model):
    (similar,) = model.similar_items([ITEMS[5]], k=3)
    y = model.item_factors / np.linalg.norm(model.item_factors, axis=1, keepdims=True)
    cosine = y @ y[5]
    cosine[5] = -np.inf
    assert [c for c, _ in similar] == [ITEMS[i] for i in np.argsort(-cosine)[:3]]
    with pytest.raises(KeyError, match="unknown contentId"):
        model.similar_items(["nope"])


def test_bad_k(model):
    with pytest.raises(ValueError, match="k must be > 0"):
        model.recommend(USERS, 0)


def test_save_load_round_trip(model, tmp_path):
    model_lib.save(model, str(tmp_path))
    loaded = model_lib.load(str(tmp_path))
    assert loaded.users == USERS and loaded.items == ITEMS
    np.testing.assert_array_equal(loaded.user_factors, model.user_factors)
    assert loaded.recommend(USERS, 4) == model.recommend(USERS, 4)
    with pytest.raises(FileNotFoundError, match="no trained model"):
        model_lib.load(str(tmp_path / "missing"))


def test_batch_predict_tsv_reverse_maps_ids(model, tmp_path):
    model_lib.save(model, str(tmp_path))
    out = tmp_path / "recs.tsv"
    assert (
        batch_predict.run(
            ["--model_dir", str(tmp_path), "--output", str(out), "--k", "3", "--no_progress"]
        )
        == N_USERS
    )
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [line.split("\t")[0] for line in lines] == USERS
    for user, line in enumerate(lines):
        ranked = line.split("\t")[1].split(",")
        assert ranked == oracle_top_k(model, user, 3)
    assert not (tmp_path / "recs.tsv.incomplete").exists()


def test_batch_predict_targeting_jsonl(model, tmp_path):
    model_lib.save(model, str(tmp_path))
    out = tmp_path / "targets.jsonl"
    batch_predict.run(
        [
            "--model_dir",
            str(tmp_path),
            "--output",
            str(out),
            "--k",
            "2",
            "--targeting",
            "--format",
            "jsonl",
            "--no_progress",
        ]
    )
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["contentId"] for r in records] == ITEMS
    for item, record in enumerate(records):
        scores = model.item_factors[item] @ model.user_factors.T
        eligible = [u for u in range(N_USERS) if item not in SEEN[u]]
        expected = sorted(eligible, key=lambda u: -scores[u])[:2]
        assert record["visitorIds"] == [USERS[u] for u in expected]
        np.testing.assert_allclose(record["scores"], scores[expected], rtol=1e-5)


def test_batch_predict_bad_flags(tmp_path):
    from pipeline.cli import UsageError

    with pytest.raises(UsageError, match="--k must be > 0"):
        batch_predict.run(["--model_dir", str(tmp_path), "--output", "x", "--k", "0"])
    with pytest.raises(UsageError, match="no trained model"):
        batch_predict.run(["--model_dir", str(tmp_path), "--output", str(tmp_path / "x")])
