"""The popularity fast path of `chunked_topk.chunked_top_k` (`ConstantScores`: one ranking of the
catalogue, walked per row) against the general chunked path on the same scores, and against the
whole-row `topk.top_k_excluding`: byte-identical lists for tie-heavy and non-finite rows, rows
with every item excluded, k > n_items, empty blocks, exclusions as a CsrMatrix or an (indptr,
indices) pair with duplicates; one ranking shared by blocks and kept per worker; no
[b, n_items] array."""

from __future__ import annotations

import numpy as np
import pytest
from memory import peak_bytes

from trainer.beam.evaluate import EvalBlock, _PopularityBlock
from trainer.core import chunked_topk, metrics, topk
from trainer.core.chunked_topk import (
    BlockScores,
    ConstantScores,
    RankingCache,
    chunked_top_k,
    popularity_order,
)
from trainer.core.sparse import CsrMatrix


class GeneralPath(BlockScores):
    """The same scores as a `ConstantScores`, taken chunk by chunk (its `scores`): not a
    `ConstantScores`, so `chunked_top_k` ranks them by the general chunked path."""

    def __init__(self, constant: ConstantScores):
        self.constant, self.n_rows, self.n_items = constant, constant.n_rows, constant.n_items

    def scores(self, start: int, stop: int) -> np.ndarray:
        return self.constant.scores(start, stop)


def tied_row(rng: np.random.Generator, n_items: int) -> np.ndarray:
    """float32 counts 0..3 (ties everywhere), some -inf, +inf and -0.0 among them."""
    row = rng.integers(0, 4, n_items).astype(np.float32)
    row[rng.random(n_items) < 0.1] = -np.inf
    row[rng.random(n_items) < 0.05] = np.inf
    row[(row == 0) & (rng.random(n_items) < 0.5)] = -0.0
    return row


def random_exclusions(rng: np.random.Generator, b: int, n_items: int) -> np.ndarray:
    """bool [b, n_items] of a random density, one row all excluded and one with one item left."""
    excluded = rng.random((b, n_items)) < rng.random()
    if b >= 2:
        excluded[0] = True
        excluded[1] = True
        excluded[1, rng.integers(n_items)] = False
    return excluded


def as_pair_with_duplicates(rng: np.random.Generator, excluded: np.ndarray):
    """(indptr, indices) of the excluded cells, each row's items shuffled and some repeated,
    indptr offset into a longer indices array (a slice of a larger matrix's)."""
    rows = []
    for items in (np.flatnonzero(r) for r in excluded):
        repeated = (
            np.concatenate([items, rng.choice(items, items.size // 2)]) if items.size else items
        )
        rows.append(rng.permutation(repeated))
    counts = np.array([r.size for r in rows], np.int64)
    indices = np.concatenate([[0, 0, 0], *rows, [0]]).astype(np.int64)  # 3 cells of another row
    indptr = np.concatenate([[0], np.cumsum(counts)]) + 3
    return indptr, indices


def as_csr(excluded: np.ndarray) -> CsrMatrix:
    rows, items = np.nonzero(excluded)
    return CsrMatrix.from_triples(rows, items, np.ones(rows.size), excluded.shape)


def assert_same_lists(got, expected):
    assert got[0].dtype == np.int64 and got[1].dtype == topk.SCORE_DTYPE
    assert got[0].tobytes() == expected[0].tobytes()
    assert got[1].tobytes() == expected[1].tobytes()


@pytest.mark.parametrize("seed", range(40))
def test_walking_the_ranking_equals_the_general_chunked_path(seed):
    rng = np.random.default_rng([seed, 14])
    n_items = int(rng.integers(1, 60))
    b = int(rng.integers(0, 12))
    k = int(rng.integers(1, n_items + 8))  # k > n_items too
    row = tied_row(rng, n_items)
    excluded = random_exclusions(rng, b, n_items)
    chunk = int(rng.integers(0, n_items + 2))
    fast = ConstantScores(row, b)
    for exclude in (as_csr(excluded), as_pair_with_duplicates(rng, excluded)):
        got = chunked_top_k(fast, exclude, k, chunk)
        assert_same_lists(got, chunked_top_k(GeneralPath(fast), exclude, k, chunk))
        assert_same_lists(got, topk.top_k_excluding(np.tile(row, (b, 1)), exclude, k))
    if b >= 2:
        assert (got[0][0] == -1).all() and np.isneginf(got[1][0]).all()  # all excluded
        assert (got[0][1] >= 0).sum() == 1


def test_lists_are_the_ranking_minus_each_rows_items_with_their_scores():
    """Worked by hand: counts (2, 5, 5, 0, 5, 2), ranking 1, 2, 4, 0, 5, 3."""
    row = np.array([2, 5, 5, 0, 5, 2], np.int64)  # integer counts are taken as float32
    popular = ConstantScores(row, 0)
    np.testing.assert_array_equal(popular.order, [1, 2, 4, 0, 5, 3])
    excluded = (  # (indptr, indices): {2}, {1}, everything, {4, 4, 1} (a repeated item)
        np.array([0, 1, 2, 8, 11]),
        np.array([2, 1, 1, 2, 4, 0, 5, 3, 4, 4, 1]),
    )
    ids, top = chunked_top_k(ConstantScores(row, 4, popular.order), excluded, 4)
    np.testing.assert_array_equal(ids, [[1, 4, 0, 5], [2, 4, 0, 5], [-1, -1, -1, -1], [2, 0, 5, 3]])
    expected = np.float32([[5, 5, 2, 2], [5, 5, 2, 2], [-np.inf] * 4, [5, 2, 2, 0]])
    assert top.tobytes() == expected.tobytes()


def test_empty_blocks_and_catalogues():
    for b, n_items in ((0, 5), (3, 0), (0, 0)):
        row = np.arange(n_items, dtype=np.float32)
        ids, top = chunked_top_k(ConstantScores(row, b), None, 4)
        assert ids.shape == top.shape == (b, 4)
        assert (ids == -1).all() and np.isneginf(top).all()


def test_nan_is_refused_unless_every_row_excludes_it():
    row = np.array([1, np.nan, 3, np.nan, 0], np.float32)
    both = np.zeros((3, 5), bool)
    both[:, [1, 3]] = True
    both[2, 0] = True
    got = chunked_top_k(ConstantScores(row, 3), as_csr(both), 5)
    assert_same_lists(got, chunked_top_k(GeneralPath(ConstantScores(row, 3)), as_csr(both), 5))
    assert list(got[0][2]) == [2, 4, -1, -1, -1]
    one_row_sees_one = both.copy()
    one_row_sees_one[1, 3] = False
    for block in (ConstantScores(row, 3), GeneralPath(ConstantScores(row, 3))):
        with pytest.raises(ValueError, match="NaN"):
            chunked_top_k(block, as_csr(one_row_sees_one), 2)


def test_a_shared_ranking_and_bad_arguments():
    rng = np.random.default_rng(3)
    row = tied_row(rng, 30)
    order = popularity_order(row)
    assert order.dtype == np.int64
    np.testing.assert_array_equal(order, np.lexsort((np.arange(30), -row.astype(np.float64))))
    excluded = as_csr(random_exclusions(rng, 7, 30))
    shared = ConstantScores(row, 7, order)
    assert shared.order is order
    assert_same_lists(
        chunked_top_k(shared, excluded, 9), chunked_top_k(ConstantScores(row, 7), excluded, 9)
    )
    with pytest.raises(ValueError, match="order"):
        ConstantScores(row, 7, order[:-1])
    with pytest.raises(ValueError, match="order"):
        ConstantScores(row, 7, order.astype(np.float64))
    with pytest.raises(ValueError, match="1-D"):
        ConstantScores(row[None], 7)
    with pytest.raises(ValueError, match="k must be"):
        chunked_top_k(shared, excluded, 0)
    with pytest.raises(ValueError, match="item_chunk"):
        chunked_top_k(shared, excluded, 3, -1)
    with pytest.raises(ValueError, match="shape"):
        chunked_top_k(shared, as_csr(np.ones((7, 29), bool)), 3)


def test_the_cache_sorts_again_only_for_other_scores(monkeypatch):
    sorts = []
    monkeypatch.setattr(
        chunked_topk, "popularity_order", lambda row: sorts.append(1) or popularity_order(row)
    )
    cache = RankingCache()
    counts = np.array([3, 1, 3, 0], np.int64)
    first = cache.order(counts)
    np.testing.assert_array_equal(first, [0, 2, 1, 3])
    assert cache.order(counts) is first and cache.order(counts.copy()) is first
    assert len(sorts) == 1
    other = cache.order(np.array([3, 1, 4, 0], np.int64))
    np.testing.assert_array_equal(other, [2, 0, 1, 3])
    assert len(sorts) == 2
    assert cache.order(counts.astype(np.float32)) is not other and len(sorts) == 3  # other dtype


def test_the_beam_block_ranks_once_per_worker_and_counts(monkeypatch):
    """`_PopularityBlock` on three blocks of one side input sorts once and sums as
    `metrics.batch_sums` of the users' dense popularity scores."""
    sorts = []
    monkeypatch.setattr(
        chunked_topk, "popularity_order", lambda row: sorts.append(1) or popularity_order(row)
    )
    rng = np.random.default_rng(8)
    n_items, ks = 40, (1, 5)
    counts = rng.integers(0, 4, n_items).astype(np.int64)
    dofn = _PopularityBlock(ks)
    for block_id in range(3):
        train = as_csr(rng.random((6, n_items)) < 0.3)
        heldout = as_csr(rng.random((6, n_items)) < 0.2)
        (sums,) = dofn.process(
            EvalBlock(block_id, np.arange(6), np.zeros((6, 1)), train, heldout), counts
        )
        users = np.flatnonzero(heldout.row_counts() > 0)
        dense = np.tile(counts.astype(np.float32), (users.size, 1))
        expected = metrics.batch_sums(
            dense, metrics.take_rows(train, users), metrics.take_rows(heldout, users), ks
        )
        assert sums.ranking.sums == expected.sums and sums.ranking.users == expected.users
        for k in ks:
            np.testing.assert_array_equal(sums.ranking.covered[k], expected.covered[k])
    assert len(sorts) == 1


def test_memory_is_the_ranking_and_the_lists_not_the_block():
    """b = 4,096 rows, 200,000 items: a [b, n_items] float32 array would be 3.3 GB; the call
    (ranking included) holds the ranking (n_items · 8 bytes) and some int64 arrays of the
    b · k + e walked places."""
    rng = np.random.default_rng(12)
    b, n_items, k = 4096, 200_000, 50
    row = rng.integers(0, 20, n_items).astype(np.float32)  # ties everywhere
    indptr = np.arange(0, 10 * b + 1, 10, dtype=np.int64)  # 10 items a row, drawn from the top
    indices = rng.integers(0, 2_000, 10 * b).astype(np.int64)
    result = {}

    def run():
        result["lists"] = chunked_top_k(ConstantScores(row, b), (indptr, indices), k)

    peak = peak_bytes(run)
    walked = b * k + indices.size
    assert peak < 16 * n_items + 12 * 8 * walked, peak / 2**20
    assert peak < b * n_items * 4 / 100
    ids = result["lists"][0]
    assert (ids >= 0).all() and not np.isin(ids[0], indices[:10]).any()
