"""Offline ranking metrics: exact values against a plain-Python oracle, top-k invariants and the
popularity baseline."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from trainer.core import metrics
from trainer.core.sparse import CsrMatrix

KS = (1, 3, 5, 12)


def csr_from_sets(item_sets: list[set[int]], n_items: int) -> CsrMatrix:
    rows = [u for u, items in enumerate(item_sets) for _ in items]
    cols = [i for items in item_sets for i in sorted(items)]
    return CsrMatrix.from_triples(rows, cols, np.ones(len(rows)), (len(item_sets), n_items))


def row_sets(matrix: CsrMatrix) -> list[set[int]]:
    return [
        {int(i) for i in matrix.indices[matrix.indptr[u] : matrix.indptr[u + 1]]}
        for u in range(matrix.shape[0])
    ]


def oracle_top_k(scores: list[float], excluded: set[int], k: int) -> tuple[list[int], list[float]]:
    """Sort every eligible item by (score descending, id ascending); pad with (-1, -inf)."""
    eligible = sorted(
        (i for i in range(len(scores)) if i not in excluded), key=lambda i: (-scores[i], i)
    )
    ids = eligible[:k] + [-1] * max(0, k - len(eligible))
    return ids, [scores[i] if i >= 0 else -math.inf for i in ids]


def oracle_metrics(
    recommended: list[list[int]], relevant: list[set[int]], n_items: int, ks: tuple[int, ...]
) -> dict[str, float]:
    """The module's formulas, one user and one rank at a time."""
    out: dict[str, float] = {}
    evaluated = [u for u in range(len(relevant)) if relevant[u]]
    for k in sorted(ks):
        totals = {"recall": 0.0, "ndcg": 0.0, "map": 0.0, "precision": 0.0}
        covered = set()
        for u in evaluated:
            hits = 0
            dcg = 0.0
            ap = 0.0
            for rank in range(1, k + 1):
                item = recommended[u][rank - 1]
                if item >= 0:
                    covered.add(item)
                if item in relevant[u]:
                    hits += 1
                    dcg += 1.0 / math.log2(rank + 1)
                    ap += hits / rank
            denominator = min(k, len(relevant[u]))
            idcg = sum(1.0 / math.log2(rank + 1) for rank in range(1, denominator + 1))
            totals["recall"] += hits / denominator
            totals["ndcg"] += dcg / idcg
            totals["map"] += ap / denominator
            totals["precision"] += hits / k
        for name, total in totals.items():
            out[f"{name}@{k}"] = total / len(evaluated)
        out[f"coverage@{k}"] = len(covered) / n_items
    out["users_evaluated"] = len(evaluated)
    return out


def random_split(
    rng: np.random.Generator, n_users: int, n_items: int, density: float, heldout_fraction: float
) -> tuple[CsrMatrix, CsrMatrix]:
    """Disjoint train and held-out matrices; some users have no held-out items."""
    observed = rng.random((n_users, n_items)) < density
    is_heldout = rng.random((n_users, n_items)) < heldout_fraction
    train = [set(np.flatnonzero(observed[u] & ~is_heldout[u]).tolist()) for u in range(n_users)]
    heldout = [set(np.flatnonzero(observed[u] & is_heldout[u]).tolist()) for u in range(n_users)]
    return csr_from_sets(train, n_items), csr_from_sets(heldout, n_items)


def assert_metrics_equal(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    assert actual["users_evaluated"] == expected["users_evaluated"]
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


# The formulas, through evaluate: each score_fn below ranks items so that the list is known.


def ranked_scores(n_items: int, *lists: list[int]) -> np.ndarray:
    """float [len(lists), n_items]: each list's items scored so they rank in the list's order,
    above every other item (which scores 0)."""
    scores = np.zeros((len(lists), n_items))
    for u, items in enumerate(lists):
        for rank, item in enumerate(items):
            scores[u, item] = len(items) - rank
    return scores


def evaluate_scores(scores, train, heldout, ks):
    return metrics.evaluate(lambda users: scores[users], train, heldout, ks)


def test_metrics_hand_computed_case():
    # Relevant {2, 5}; list [5, 1, 2]: hits at ranks 1 and 3.
    result = evaluate_scores(
        ranked_scores(10, [5, 1, 2]),
        csr_from_sets([set()], 10),
        csr_from_sets([{2, 5}], 10),
        (3, 1),
    )
    assert list(result) == [
        "recall@1", "ndcg@1", "map@1", "precision@1", "coverage@1",
        "recall@3", "ndcg@3", "map@3", "precision@3", "coverage@3",
        "users_evaluated",
    ]  # fmt: skip
    assert result["recall@3"] == pytest.approx(1.0)
    assert result["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)))
    assert result["map@3"] == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert result["precision@3"] == pytest.approx(2 / 3)
    assert result["coverage@3"] == pytest.approx(3 / 10)
    # At k = 1 the single hit is all min(1, 2) = 1 relevant items there is room for.
    assert result["recall@1"] == result["ndcg@1"] == result["map@1"] == result["precision@1"] == 1
    assert result["coverage@1"] == pytest.approx(1 / 10)
    assert result["users_evaluated"] == 1


def test_metrics_miss_first_then_hit():
    # Relevant {4}; list [0, 4, 1]: one hit at rank 2.
    result = evaluate_scores(
        ranked_scores(5, [0, 4, 1]), csr_from_sets([set()], 5), csr_from_sets([{4}], 5), (1, 3)
    )
    assert result["recall@1"] == result["ndcg@1"] == result["map@1"] == 0
    assert result["recall@3"] == pytest.approx(1.0)
    assert result["ndcg@3"] == pytest.approx(1 / math.log2(3))
    assert result["map@3"] == pytest.approx(1 / 2)
    assert result["precision@3"] == pytest.approx(1 / 3)


def test_users_without_heldout_items_are_skipped():
    # User 1 holds nothing out: its list [3, 4] must count neither in the means nor in coverage.
    scores = ranked_scores(6, [1, 0], [3, 4], [0, 2])
    train = csr_from_sets([set(), set(), set()], 6)
    result = evaluate_scores(scores, train, csr_from_sets([{1}, set(), {2}], 6), (2,))
    assert result["users_evaluated"] == 2
    assert result["recall@2"] == pytest.approx(1.0)
    assert result["coverage@2"] == pytest.approx(3 / 6)  # Items 0, 1 and 2; not user 1's.


def test_coverage_counts_distinct_items_and_ignores_padding():
    # User 2 has seen every item but 2 and 5, so its list is [2, 5] and then padding (-1). Were
    # padding counted as an item, coverage would include the last item, 9.
    scores = ranked_scores(10, [0, 1, 2], [2, 3, 4], [2, 5])
    train = csr_from_sets([set(), set(), {0, 1, 3, 4, 6, 7, 8, 9}], 10)
    heldout = csr_from_sets([{0}, {8}, {5}], 10)
    result = evaluate_scores(scores, train, heldout, (1, 2, 3))
    assert result["coverage@1"] == pytest.approx(2 / 10)  # {0, 2}
    assert result["coverage@2"] == pytest.approx(5 / 10)  # {0, 1, 2, 3, 5}
    assert result["coverage@3"] == pytest.approx(6 / 10)  # {0, 1, 2, 3, 4, 5}
    # Padding is a miss that still counts in precision's k: user 2 hits 1 of 3.
    assert result["precision@3"] == pytest.approx((1 / 3 + 0 + 1 / 3) / 3)


def test_metrics_without_evaluated_users_are_nan():
    result = evaluate_scores(
        ranked_scores(3, [0, 1]), csr_from_sets([set()], 3), csr_from_sets([set()], 3), (2,)
    )
    assert result["users_evaluated"] == 0
    assert math.isnan(result["recall@2"])
    assert result["coverage@2"] == 0.0


# evaluate, the popularity baseline and rmse


def test_evaluate_matches_the_oracle_end_to_end_for_any_batch_size():
    rng = np.random.default_rng(11)
    n_users, n_items = 45, 20
    train, heldout = random_split(rng, n_users, n_items, 0.4, 0.3)
    user_scores = rng.integers(0, 6, size=(n_users, n_items)).astype(np.float32)
    train_sets, heldout_sets = row_sets(train), row_sets(heldout)
    recommended = [
        oracle_top_k(user_scores[u].tolist(), train_sets[u], max(KS))[0] for u in range(n_users)
    ]
    expected = oracle_metrics(recommended, heldout_sets, n_items, KS)
    for batch_size in (1, 7, 1024):
        actual = metrics.evaluate(lambda users: user_scores[users], train, heldout, KS, batch_size)
        assert_metrics_equal(actual, expected)


def test_perfect_score_fn_gives_recall_ndcg_and_map_of_one():
    rng = np.random.default_rng(2)
    train, heldout = random_split(rng, 30, 40, 0.5, 0.3)
    dense = heldout.to_dense()
    result = metrics.evaluate(lambda users: dense[users], train, heldout, ks=(1, 5, 50))
    n_relevant = heldout.row_counts()[heldout.row_counts() > 0]
    assert result["users_evaluated"] == n_relevant.size
    for k in (1, 5, 50):
        assert result[f"recall@{k}"] == pytest.approx(1.0)
        assert result[f"ndcg@{k}"] == pytest.approx(1.0)
        assert result[f"map@{k}"] == pytest.approx(1.0)
        assert result[f"precision@{k}"] == pytest.approx(np.mean(np.minimum(k, n_relevant) / k))


def test_evaluate_reports_progress_and_checks_its_inputs():
    train = csr_from_sets([{0}, {1}, {2}, {0}, {1}], 4)
    heldout = csr_from_sets([{3}, set(), {3}, {2}, {2}], 4)
    calls = []
    metrics.evaluate(
        lambda u: np.zeros((u.size, 4)), train, heldout, (1,), 3, lambda *c: calls.append(c)
    )
    assert calls == [(3, 4), (4, 4)]
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.evaluate(lambda u: np.zeros((u.size, 4)), train, csr_from_sets([{3}], 4), (1,))
    with pytest.raises(ValueError, match="at least one"):
        metrics.evaluate(lambda u: np.zeros((u.size, 4)), train, heldout, ())
    with pytest.raises(ValueError, match="score_fn returned"):
        metrics.evaluate(lambda u: np.zeros((u.size, 3)), train, heldout, (1,))


def test_evaluate_warns_about_heldout_items_also_in_train(caplog):
    train = csr_from_sets([{0, 1}, {1}], 3)
    heldout = csr_from_sets([{1}, {2}], 3)
    with caplog.at_level(logging.WARNING, logger="trainer.core.metrics"):
        result = metrics.evaluate(
            lambda u: np.tile([0.0, 0.0, 1.0], (u.size, 1)), train, heldout, (1,)
        )
    assert "1 held-out (user, item) pairs are also in train" in caplog.text
    assert result["recall@1"] == pytest.approx(0.5)  # User 0's item 1 can never be hit.


def test_popularity_baseline_recommends_the_most_popular_unseen_items():
    # Item 0 is in 6 of 8 training rows, item 1 in 4, item 2 in 2, item 3 in 1, item 4 in none.
    train = csr_from_sets([{0, 1}, {0, 1}, {0, 1, 2}, {0}, {0, 2}, {0, 3}, {1}, set()], n_items=5)
    np.testing.assert_array_equal(metrics.popularity_scores(train), [6, 4, 2, 1, 0])
    assert metrics.popularity_scores(train).dtype == np.float32
    # Users 6 and 7 have not seen item 0 and hold it out: the baseline's first pick.
    # Users 0 and 1 have seen items 0 and 1, so their first pick is item 2: a hit for user 0.
    heldout = csr_from_sets([{2}, {4}, set(), set(), set(), set(), {0}, {0}], n_items=5)
    result = metrics.evaluate_popularity(train, heldout, ks=(1, 3))
    assert result["users_evaluated"] == 4
    assert result["recall@1"] == pytest.approx(3 / 4)
    assert result["coverage@1"] == pytest.approx(2 / 5)  # Items 2 (users 0, 1) and 0 (6, 7).
    # User 1's top 3 is [2, 3, 4]: its held-out item 4 is at rank 3.
    assert result["recall@3"] == pytest.approx(1.0)
    assert result["ndcg@3"] == pytest.approx((3 + 1 / math.log2(4)) / 4)
    assert result["map@3"] == pytest.approx((3 + 1 / 3) / 4)


def test_rmse():
    assert metrics.rmse(np.array([1.0, 2.0, 4.0]), np.array([1.0, 0.0, 1.0])) == pytest.approx(
        math.sqrt((0 + 4 + 9) / 3)
    )
    assert metrics.rmse(np.ones(4, np.float32), np.ones(4, np.float32)) == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.rmse(np.ones(3), np.ones(2))
    with pytest.raises(ValueError, match="zero cells"):
        metrics.rmse(np.ones(0), np.ones(0))


def test_evaluate_on_a_sample_of_users_matches_the_oracle_on_them():
    rng = np.random.default_rng(23)
    n_users, n_items = 60, 30
    train, heldout = random_split(rng, n_users, n_items, 0.4, 0.3)
    user_scores = rng.integers(0, 6, size=(n_users, n_items)).astype(np.float32)
    train_sets, heldout_sets = row_sets(train), row_sets(heldout)
    sample = metrics.sample_users(heldout, 20, seed=4)
    assert sample.size == 20 and np.all(np.diff(sample) > 0)
    assert all(heldout_sets[u] for u in sample)
    np.testing.assert_array_equal(sample, metrics.sample_users(heldout, 20, seed=4))
    assert not np.array_equal(sample, metrics.sample_users(heldout, 20, seed=5))
    recommended = [oracle_top_k(user_scores[u].tolist(), train_sets[u], max(KS))[0] for u in sample]
    expected = oracle_metrics(recommended, [heldout_sets[u] for u in sample], n_items, KS)
    for batch_size in (3, 1024):
        actual = metrics.evaluate(
            lambda users: user_scores[users], train, heldout, KS, batch_size, users=sample
        )
        assert_metrics_equal(actual, expected)
    # Users without held-out items are skipped; a sample larger than the population is all.
    everyone = metrics.evaluate(lambda users: user_scores[users], train, heldout, KS)
    assert_metrics_equal(
        metrics.evaluate(lambda u: user_scores[u], train, heldout, KS, users=np.arange(n_users)),
        everyone,
    )
    np.testing.assert_array_equal(
        metrics.sample_users(heldout, 10_000, seed=4), np.flatnonzero(heldout.row_counts())
    )
    with pytest.raises(ValueError, match="row ids"):
        metrics.evaluate(lambda u: user_scores[u], train, heldout, KS, users=np.array([n_users]))


def test_per_iteration_evaluation_scores_a_fixed_sample_of_users():
    from trainer import task
    from trainer.core.factors import WALSFactors

    rng = np.random.default_rng(29)
    n_users, n_items = 80, 25
    train, heldout = random_split(rng, n_users, n_items, 0.4, 0.3)
    factors = WALSFactors(
        rng.standard_normal((n_users, 4)).astype(np.float32),
        rng.standard_normal((n_items, 4)).astype(np.float32),
    )
    dense = factors.user_factors.astype(np.float64) @ factors.item_factors.T.astype(np.float64)
    train_sets, heldout_sets = row_sets(train), row_sets(heldout)
    evaluate = task.per_iteration_evaluator(train, heldout, KS, eval_users=15, seed=2)
    sample = metrics.sample_users(heldout, 15, seed=2)
    recommended = [oracle_top_k(dense[u].tolist(), train_sets[u], max(KS))[0] for u in sample]
    expected = oracle_metrics(recommended, [heldout_sets[u] for u in sample], n_items, KS)
    result = evaluate(factors)
    assert result["users_evaluated"] == 15
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-9), key
    everyone = task.per_iteration_evaluator(train, heldout, KS, eval_users=0, seed=2)(factors)
    assert everyone["users_evaluated"] == np.count_nonzero(heldout.row_counts())
