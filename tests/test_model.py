"""trainer.serving.model (recommend, similar_items, save/load) and trainer.batch_predict, on a
hand-built model checked against plain NumPy."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from common import atomic
from trainer import batch_predict
from trainer.serving import model as model_lib
from trainer.serving import predictions

N_USERS, N_ITEMS, K = 7, 12, 4
SEEN = [[0, 1], [2], [0, 3, 5, 7, 9, 11], [], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [6], [0, 11]]
USERS = [f"visitor-{u}" for u in range(N_USERS)]
ITEMS = [f"/article/{i}" for i in range(N_ITEMS)]
# Small integer factors: every score x_u . y_i is an integer, exact in float32 whatever the
# summation order, so scores compare with ==, and tied scores are real ties that the documented
# rule (lower itemId first) must break. Items 2 and 8 have the same factors on purpose.
RNG = np.random.default_rng(5)
USER_FACTORS = RNG.integers(-2, 3, (N_USERS, K)).astype(np.float32)
ITEM_FACTORS = RNG.integers(-2, 3, (N_ITEMS, K)).astype(np.float32)


@pytest.fixture()
def model() -> model_lib.WALSModel:
    indptr = np.concatenate([[0], np.cumsum([len(s) for s in SEEN])]).astype(np.int64)
    indices = np.concatenate([np.asarray(s, np.int32) for s in SEEN])
    return model_lib.WALSModel(
        user_factors=USER_FACTORS.copy(),
        item_factors=ITEM_FACTORS.copy(),
        seen_indptr=indptr,
        seen_indices=indices,
        item_counts=np.bincount(indices, minlength=N_ITEMS).astype(np.int64),
        users=USERS,
        items=ITEMS,
        config={"latent_factors": K},
    )


def dense_top_k(user: int, k: int) -> tuple[list[int], list[float]]:
    """The oracle: (itemIds, scores) best first, scores = x_u . Y in float64 over the dense
    factors, the user's seen items left out, ties broken by the lower itemId."""
    scores = ITEM_FACTORS.astype(np.float64) @ USER_FACTORS[user].astype(np.float64)
    eligible = [i for i in range(N_ITEMS) if i not in SEEN[user]]
    ranked = sorted(eligible, key=lambda i: (-scores[i], i))[:k]
    return ranked, [float(scores[i]) for i in ranked]


def oracle_top_k(model, user: int, k: int) -> list[str]:
    return [ITEMS[i] for i in dense_top_k(user, k)[0]]


def test_fixture_has_ties_at_a_cut_off():
    # Otherwise the tie rule would go untested.
    cuts = [
        (user, k)
        for user in range(N_USERS)
        for k in range(1, N_ITEMS - len(SEEN[user]))
        if dense_top_k(user, k + 1)[1][k - 1] == dense_top_k(user, k + 1)[1][k]
    ]
    assert len(cuts) >= 3


def test_recommend_matches_dense_oracle_in_order_and_score(model):
    for k in range(1, N_ITEMS + 1):
        for user, recs in enumerate(model.recommend(USERS, k)):
            ids, scores = dense_top_k(user, k)
            assert recs.known and recs.visitor_id == USERS[user]
            assert recs.content_ids == [ITEMS[i] for i in ids], (user, k)
            assert recs.scores == scores, (user, k)


def test_recommend_unknown_visitor_gets_popular_items(model):
    unknown, known = model.recommend(["nobody", USERS[1]], k=4)
    # Train counts per item, from SEEN: 0:3, 1:2, 2:2, 3:2, 4:1, 5:2, 6:2, 7:2, 8:1, 9:2, 10:1,
    # 11:2; ties go to the lower itemId.
    assert not unknown.known
    assert unknown.content_ids == [ITEMS[0], ITEMS[1], ITEMS[2], ITEMS[3]]
    assert unknown.scores == [3.0, 2.0, 2.0, 2.0]
    ids, scores = dense_top_k(1, 4)
    assert known.known and known.content_ids == [ITEMS[i] for i in ids]
    assert known.scores == scores


def test_recommend_fewer_unseen_items_than_k(model):
    # Visitor 4 has seen all but items 0 and 11: x_4 . y_0 = 2 and x_4 . y_11 = 0.
    (recs,) = model.recommend([USERS[4]], k=10)
    assert dense_top_k(4, 10) == ([0, 11], [2.0, 0.0])
    assert recs.content_ids == [ITEMS[0], ITEMS[11]]
    assert recs.scores == [2.0, 0.0]


def test_similar_items_by_cosine_in_order(model):
    y = ITEM_FACTORS.astype(np.float64)
    unit = y / np.linalg.norm(y, axis=1, keepdims=True)
    # Items whose 4 nearest neighbours are separated, or tied only through the identical items
    # 2 and 8 (bit-identical scores, so the lower itemId must come first).
    for item in (0, 1, 3, 5, 6, 7, 11):
        cosine = unit @ unit[item]
        ranked = sorted((i for i in range(N_ITEMS) if i != item), key=lambda i: (-cosine[i], i))
        (similar,) = model.similar_items([ITEMS[item]], k=4)
        assert [c for c, _ in similar] == [ITEMS[i] for i in ranked[:4]], item
        np.testing.assert_allclose([s for _, s in similar], cosine[ranked[:4]], rtol=1e-6)
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
    rows = list(predictions.read_predictions(str(out)))
    assert [row.key for row in rows] == USERS
    for user, row in enumerate(rows):
        assert row.ranked == oracle_top_k(model, user, 3)
    assert not [name for name in os.listdir(tmp_path) if atomic.is_temporary(name)]


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
    from common.cli import UsageError

    with pytest.raises(UsageError, match="--k must be > 0"):
        batch_predict.run(["--model_dir", str(tmp_path), "--output", "x", "--k", "0"])
    with pytest.raises(UsageError, match="no trained model"):
        batch_predict.run(["--model_dir", str(tmp_path), "--output", str(tmp_path / "x")])


def test_most_read_ranks_a_visitors_items_by_rating_ties_to_the_lower_item(model):
    assert model.most_read(2).tolist() == [0, 3, 5, 7, 9, 11]  # no ratings: itemId order
    # Visitor 2's items 0, 3, 5, 7, 9, 11 rated 0.5, 2, 0.5, 3, 2, 0.1.
    values = np.ones(len(model.seen_indices), np.float32)
    start = model.seen_indptr[2]
    values[start : start + 6] = [0.5, 2.0, 0.5, 3.0, 2.0, 0.1]
    rated = dataclasses.replace(model, seen_values=values)
    assert rated.most_read(2).tolist() == [7, 3, 9, 0, 5, 11]
    assert rated.most_read(3).tolist() == []


def test_save_load_keeps_seen_values_and_reads_models_without_them(model, tmp_path):
    model_lib.save(model, str(tmp_path / "plain"))
    assert model_lib.load(str(tmp_path / "plain")).seen_values is None
    values = np.arange(len(model.seen_indices), dtype=np.float32)
    rated = dataclasses.replace(model, seen_values=values)
    model_lib.save(rated, str(tmp_path / "rated"))
    np.testing.assert_array_equal(model_lib.load(str(tmp_path / "rated")).seen_values, values)
