"""trainer.core.topk: the one scoring (float32, batch-invariant), the one top-k (exact values
against a sort, ties to the lower index) and its merge (against a brute-force top-k of the
whole row, ties included, chunks that do and do not divide the row)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_metrics import csr_from_sets, oracle_top_k, random_split, row_sets
from trainer.core import topk
from trainer.core.sparse import CsrMatrix

# top_k_excluding


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_top_k_matches_a_full_sort_and_never_returns_excluded_items(dtype):
    rng = np.random.default_rng(3)
    n_rows, n_items = 40, 25
    # Few distinct values: many ties, which must go to the lower item id.
    scores = rng.integers(0, 5, size=(n_rows, n_items)).astype(dtype)
    scores[rng.random(scores.shape) < 0.05] = np.inf
    exclude_dense = rng.random((n_rows, n_items)) < rng.random((n_rows, 1))
    exclude_dense[0] = True  # Nothing eligible.
    exclude_dense[1] = False  # Everything eligible.
    exclude = csr_from_sets([set(np.flatnonzero(row).tolist()) for row in exclude_dense], n_items)
    excluded_sets = row_sets(exclude)
    for k in (1, 4, 10, 25, 30):
        ids, top = topk.top_k_excluding(scores, exclude, k)
        assert ids.dtype == np.int64 and top.dtype == np.float32
        assert ids.shape == top.shape == (n_rows, k)
        # A full stable argsort of the masked scores puts ties in ascending id order.
        masked = np.where(exclude_dense, -np.inf, scores)
        full = np.argsort(-masked, axis=1, kind="stable")
        for u in range(n_rows):
            assert not set(ids[u].tolist()) & excluded_sets[u]
            expected_ids, expected_scores = oracle_top_k(scores[u].tolist(), excluded_sets[u], k)
            assert ids[u].tolist() == expected_ids
            np.testing.assert_array_equal(top[u], np.array(expected_scores, np.float32))
            n_eligible = n_items - len(excluded_sets[u])
            assert ids[u, : min(k, n_eligible)].tolist() == full[u, : min(k, n_eligible)].tolist()


def test_top_k_breaks_ties_by_lower_item_id():
    scores = np.array([[1.0, 3.0, 3.0, 3.0, 0.0, 3.0]], dtype=np.float32)
    ids, top = topk.top_k_excluding(scores, None, 3)
    assert ids.tolist() == [[1, 2, 3]]
    ids, _ = topk.top_k_excluding(scores, ([0, 1], [2]), 3)
    assert ids.tolist() == [[1, 3, 5]]


def test_top_k_pads_when_fewer_than_k_items_are_eligible():
    scores = np.array([[0.5, 0.1, 0.9, 0.3], [0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    exclude = csr_from_sets([{0, 2}, {0, 1, 2, 3}], 4)
    ids, top = topk.top_k_excluding(scores, exclude, 5)
    assert ids.tolist() == [[3, 1, -1, -1, -1], [-1, -1, -1, -1, -1]]
    np.testing.assert_array_equal(
        top, np.array([[0.3, 0.1] + [-np.inf] * 3, [-np.inf] * 5], dtype=np.float32)
    )


def test_top_k_returns_eligible_minus_infinity_items_before_padding():
    scores = np.array([[-np.inf, 2.0, -np.inf, 1.0]])
    ids, top = topk.top_k_excluding(scores, ([0, 1], [1]), 4)
    assert ids.tolist() == [[3, 0, 2, -1]]
    assert top.tolist() == [[1.0, -np.inf, -np.inf, -np.inf]]


def test_top_k_accepts_indptr_slices_of_a_larger_matrix():
    rng = np.random.default_rng(5)
    train, _ = random_split(rng, 10, 15, 0.5, 0.0)
    scores = rng.random((4, 15))
    from_slices = topk.top_k_excluding(scores, (train.indptr[3:8], train.indices), 6)
    from_rows = topk.top_k_excluding(scores, train.row_slice(3, 7), 6)
    np.testing.assert_array_equal(from_slices[0], from_rows[0])
    np.testing.assert_array_equal(from_slices[1], from_rows[1])


def test_top_k_validation():
    scores = np.zeros((2, 3))
    with pytest.raises(ValueError, match="positive"):
        topk.top_k_excluding(scores, None, 0)
    with pytest.raises(ValueError, match="2-D"):
        topk.top_k_excluding(np.zeros(3), None, 1)
    with pytest.raises(ValueError, match="shape"):
        topk.top_k_excluding(scores, csr_from_sets([{0}], 3), 1)
    with pytest.raises(ValueError, match="lie in"):
        topk.top_k_excluding(scores, ([0, 1, 1], [3]), 1)
    with pytest.raises(ValueError, match="NaN"):
        topk.top_k_excluding(np.array([[0.0, np.nan, 1.0]]), None, 1)
    # NaN at an excluded item is never looked at.
    ids, _ = topk.top_k_excluding(np.array([[0.0, np.nan, 1.0]]), ([0, 1], [1]), 1)
    assert ids.tolist() == [[2]]


def dense_top_k(scores: np.ndarray, excluded: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """Dense NumPy oracle: each row's eligible items by a stable sort on (-score), i.e. score
    descending, ties to the lower id; padded with (-1, -inf)."""
    masked = np.where(excluded, -np.inf, np.asarray(scores, dtype=np.float64))
    ids = np.full((scores.shape[0], k), -1, dtype=np.int64)
    top = np.full((scores.shape[0], k), -np.inf, dtype=np.float32)
    for u in range(scores.shape[0]):
        eligible = np.flatnonzero(~excluded[u])
        ranked = eligible[np.argsort(-masked[u, eligible], kind="stable")][:k]
        ids[u, : ranked.size] = ranked
        top[u, : ranked.size] = scores[u, ranked]
    return ids, top


def wide_scores(rng: np.random.Generator, kind: str, n_rows: int, n_items: int) -> np.ndarray:
    """Rows much wider than k, as real catalogues are: the chunk bound narrows the choice."""
    if kind in ("continuous", "NaN where excluded"):
        return rng.standard_normal((n_rows, n_items)).astype(np.float32)
    if kind == "few values":  # ties everywhere, rows with more than 8k candidates
        return rng.integers(0, 3, size=(n_rows, n_items)).astype(np.float32)
    if kind == "popularity":  # one shared row of counts, as the baseline scores, many ties
        counts = np.sort(rng.zipf(1.5, n_items))[::-1].astype(np.float32)
        return np.broadcast_to(counts, (n_rows, n_items))
    scores = rng.standard_normal((n_rows, n_items))  # infinities of both signs, float64
    scores[rng.random(scores.shape) < 0.4] = -np.inf
    scores[rng.random(scores.shape) < 0.002] = np.inf
    return scores


@pytest.mark.parametrize(
    "kind", ["continuous", "few values", "popularity", "infinities", "NaN where excluded"]
)
def test_top_k_on_wide_rows_matches_a_dense_sort(kind):
    rng = np.random.default_rng(17)
    n_rows, n_items = 30, 2_003  # not a multiple of the chunk count: a tail outside the chunks
    scores = wide_scores(rng, kind, n_rows, n_items)
    # From nothing to almost everything excluded, more often the popular (low) ids.
    excluded = rng.random((n_rows, n_items)) < rng.random((n_rows, 1)) ** 3
    excluded[0] = True
    excluded[1, :-5] = True  # fewer eligible items than k
    excluded[2] = False
    if kind == "NaN where excluded":  # never looked at
        scores[excluded & (rng.random(excluded.shape) < 0.5)] = np.nan
    exclude = CsrMatrix.from_triples(
        *np.nonzero(excluded), np.ones(np.count_nonzero(excluded)), excluded.shape
    )
    for k in (1, 7, 50, 600):
        ids, top = topk.top_k_excluding(scores, exclude, k)
        expected_ids, expected_top = dense_top_k(scores, excluded, k)
        np.testing.assert_array_equal(ids, expected_ids, err_msg=f"k={k}")
        np.testing.assert_array_equal(top, expected_top, err_msg=f"k={k}")


def test_top_k_finds_nan_anywhere_in_a_wide_row():
    for column in (0, 1_000, 2_002):  # in a chunk, and in the tail after the last full chunk
        scores = np.zeros((3, 2_003), dtype=np.float32)
        scores[1, column] = np.nan
        with pytest.raises(ValueError, match="NaN"):
            topk.top_k_excluding(scores, None, 10)
        ids, _ = topk.top_k_excluding(scores, ([0, 0, 1, 1], [column]), 10)
        assert column not in ids[1]


# score


def test_score_is_the_float64_product_of_float32_factors_rounded_once():
    rng = np.random.default_rng(1)
    query, candidates = rng.standard_normal((9, 16)), rng.standard_normal((30, 16))
    scores = topk.score(query, candidates)
    assert scores.dtype == np.float32 and scores.shape == (9, 30)
    exact = query.astype(np.float32).astype(np.float64) @ (
        candidates.astype(np.float32).astype(np.float64).T
    )
    np.testing.assert_array_equal(scores, exact.astype(np.float32))
    # Summed in float32, 1 + 2⁻²⁴ + 2⁻²⁴ would round to 1 twice; in float64 it is 1 + 2⁻²³,
    # which float32 holds exactly.
    halves = topk.score([[1.0, 2.0**-24, 2.0**-24]], [[1.0, 1.0, 1.0]])
    assert halves.tolist() == [[np.float32(1.0 + 2.0**-23)]]
    assert topk.score(np.zeros((0, 16)), candidates).shape == (0, 30)
    assert topk.score(query, np.zeros((0, 16))).shape == (9, 0)
    with pytest.raises(ValueError, match="must be"):
        topk.score(query, rng.standard_normal((30, 15)))


def test_a_rows_scores_do_not_depend_on_the_batch_or_block_it_is_scored_in():
    """Bitwise: evaluation batches, prediction batches and Beam blocks rank the same numbers."""
    rng = np.random.default_rng(2)
    query = rng.standard_normal((300, 48)).astype(np.float32)
    candidates = rng.standard_normal((2_000, 48)).astype(np.float32)
    whole = topk.score(query, candidates)
    for size in (1, 2, 3, 7, 64, 256):
        for start in (0, 5, 150, 299):
            np.testing.assert_array_equal(
                topk.score(query[start : start + size], candidates),
                whole[start : start + size],
                err_msg=f"rows [{start}, {start + size})",
            )
            np.testing.assert_array_equal(
                topk.score(query, candidates[start : start + size]),
                whole[:, start : start + size],
                err_msg=f"columns [{start}, {start + size})",
            )


# merge_top_k


def chunked_top_k(
    scores: np.ndarray, excluded: np.ndarray, k: int, chunk: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each chunk of `chunk` columns ranked on its own (`top_k_excluding`), its ids shifted to
    the whole row's numbering, the partial lists side by side: ([b, k · n_chunks], same)."""
    ids, tops = [], []
    for start in range(0, scores.shape[1], chunk):
        part = excluded[:, start : start + chunk]
        exclude = CsrMatrix.from_triples(*np.nonzero(part), np.ones(part.sum()), part.shape)
        local, top = topk.top_k_excluding(scores[:, start : start + chunk], exclude, k)
        ids.append(np.where(local >= 0, local + start, -1))
        tops.append(top)
    return np.concatenate(ids, axis=1), np.concatenate(tops, axis=1)


@pytest.mark.parametrize("chunk", [1, 4, 10, 13, 40, 97])
@pytest.mark.parametrize("k", [1, 3, 10, 45])
def test_merge_of_chunk_top_ks_is_the_top_k_of_the_whole_row(chunk, k):
    rng = np.random.default_rng(chunk * 100 + k)
    n_rows, n_items = 12, 40  # chunks of 4, 10 and 40 divide the row; 13 and 97 do not
    scores = rng.integers(0, 4, size=(n_rows, n_items)).astype(np.float32)  # many ties
    scores[rng.random(scores.shape) < 0.05] = -np.inf  # eligible, ranked after finite scores
    excluded = rng.random((n_rows, n_items)) < rng.random((n_rows, 1))
    excluded[0] = True  # nothing eligible: all padding
    excluded[1, 3:] = True  # fewer eligible than k
    ids, top = topk.merge_top_k(*chunked_top_k(scores, excluded, k, chunk), k)
    excluded_sets = [set(np.flatnonzero(row).tolist()) for row in excluded]
    for u in range(n_rows):
        expected_ids, expected_scores = oracle_top_k(scores[u].tolist(), excluded_sets[u], k)
        assert ids[u].tolist() == expected_ids, u
        np.testing.assert_array_equal(top[u], np.array(expected_scores, np.float32))


def test_merging_in_any_grouping_gives_the_same_list():
    rng = np.random.default_rng(9)
    scores = rng.integers(0, 3, size=(6, 50)).astype(np.float32)
    excluded = rng.random(scores.shape) < 0.3
    k = 5
    parts_ids, parts_top = chunked_top_k(scores, excluded, k, 10)  # 5 lists of k
    flat = topk.merge_top_k(parts_ids, parts_top, k)
    # ((0 1) 2) (3 4), as a CombineFn may merge its accumulators.
    lists = [
        (parts_ids[:, j * k : (j + 1) * k], parts_top[:, j * k : (j + 1) * k]) for j in range(5)
    ]

    def merge(a, b):
        return topk.merge_top_k(
            np.concatenate([a[0], b[0]], axis=1), np.concatenate([a[1], b[1]], axis=1), k
        )

    grouped = merge(merge(merge(lists[0], lists[1]), lists[2]), merge(lists[3], lists[4]))
    np.testing.assert_array_equal(grouped[0], flat[0])
    np.testing.assert_array_equal(grouped[1], flat[1])


def test_merge_positions_carry_other_values_and_pad_short_inputs():
    ids = np.array([[4, -1, 2, 7]])
    scores = np.array([[1.0, -np.inf, 3.0, 1.0]], np.float32)
    positions = topk.merge_positions(ids, scores, 3)
    assert positions.tolist() == [[2, 0, 3]]  # 3.0, then the tie 1.0 by the lower id 4 < 7
    names = np.array([["d", None, "b", "g"]], dtype=object)
    assert np.take_along_axis(names, positions, axis=1).tolist() == [["b", "d", "g"]]
    merged_ids, merged_scores = topk.merge_top_k(ids[:, :2], scores[:, :2], 3)
    assert merged_ids.tolist() == [[4, -1, -1]]
    assert merged_scores.tolist() == [[1.0, -np.inf, -np.inf]]
    with pytest.raises(ValueError, match="positive"):
        topk.merge_top_k(ids, scores, 0)
    with pytest.raises(ValueError, match="must both be"):
        topk.merge_top_k(ids, scores[:, :2], 1)
