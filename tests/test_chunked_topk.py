"""Chunked top-k (`trainer.core.chunked_topk`): byte-identical to the full-matrix ranking, against
an independent NumPy oracle (a sort of every whole row), for any chunk size; memory bounded by
the chunk, not the catalogue; the metrics it feeds equal the unchunked ones."""

from __future__ import annotations

import numpy as np
import pytest
from memory import peak_bytes

from trainer.core import chunked_topk, metrics, topk
from trainer.core.chunked_topk import BlockScores, ConstantScores, FactorScores, chunked_top_k
from trainer.core.sparse import CsrMatrix

N_ITEMS = 96
CHUNKS = (1, 7, 8, 32, 95, 96, 97, 1000, 0)  # 8 and 32 divide 96; 7 and 95 do not; 0: automatic


def oracle(scores: np.ndarray, excluded: np.ndarray, k: int):
    """Each row's eligible items sorted by (score descending, id ascending), the first k, padded
    with (-1, -inf): a full sort of the whole [b, n_items] matrix."""
    b, n_items = scores.shape
    ids = np.full((b, k), -1, np.int64)
    top = np.full((b, k), -np.inf, np.float32)
    for row in range(b):
        eligible = np.flatnonzero(~excluded[row])
        order = eligible[np.lexsort((eligible, -scores[row, eligible].astype(np.float64)))][:k]
        ids[row, : order.size] = order
        top[row, : order.size] = scores[row, order]
    return ids, top


def full_scores(query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """float32 x·y: float64 products of the float32 factors, rounded once (written out anew)."""
    q = np.asarray(query, np.float32).astype(np.float64)
    c = np.asarray(candidates, np.float32).astype(np.float64)
    return np.einsum("uf,if->ui", q, c).astype(np.float32)


def exclusions(rng: np.random.Generator, b: int, n_items: int) -> np.ndarray:
    """bool [b, n_items]: random cells, runs across every 8th and 7th item boundary, a row with
    fewer eligible items than any k here, and a row with none."""
    excluded = rng.random((b, n_items)) < 0.15
    for boundary in range(8, n_items, 8):
        excluded[boundary % b, boundary - 2 : boundary + 3] = True
    for boundary in range(7, n_items, 7):
        excluded[(boundary + 1) % b, boundary - 1 : boundary + 2] = True
    excluded[3] = True
    excluded[3, [0, 40, 95]] = False
    excluded[4] = True
    return excluded


class BroadcastRow(BlockScores):
    """Every row scores item i as row[i], ranked by the general chunked path (a
    `ConstantScores` walks its ranking instead: tests/test_popularity_ranking.py)."""

    def __init__(self, row: np.ndarray, n_rows: int):
        self.row, self.n_rows, self.n_items = np.asarray(row, np.float32), n_rows, len(row)

    def scores(self, start: int, stop: int) -> np.ndarray:
        return np.broadcast_to(self.row[start:stop], (self.n_rows, stop - start))


def as_csr(excluded: np.ndarray) -> CsrMatrix:
    rows, items = np.nonzero(excluded)
    return CsrMatrix.from_triples(rows, items, np.ones(rows.size), excluded.shape)


@pytest.fixture(scope="module")
def tied_factors():
    """Small integer factors: the scores are integers, with many exact ties in every row."""
    rng = np.random.default_rng(7)
    x = rng.integers(-2, 3, size=(40, 3)).astype(np.float32)
    y = rng.integers(-2, 3, size=(N_ITEMS, 3)).astype(np.float32)
    return x, y, exclusions(rng, 40, N_ITEMS)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("k", [1, 5, 30])
def test_chunked_top_k_equals_the_full_sort_with_ties_to_lower_ids(tied_factors, chunk, k):
    x, y, excluded = tied_factors
    expected_ids, expected_top = oracle(full_scores(x, y), excluded, k)
    ids, top = chunked_top_k(FactorScores(x, y), as_csr(excluded), k, chunk)
    np.testing.assert_array_equal(ids, expected_ids)
    assert top.dtype == np.float32 and top.tobytes() == expected_top.tobytes()
    assert (ids[3] >= 0).sum() == min(3, k) and (ids[4] == -1).all()  # padded rows
    previous = topk.top_k_excluding(topk.score(x, y), as_csr(excluded), k)
    assert ids.tobytes() == previous[0].tobytes() and top.tobytes() == previous[1].tobytes()


@pytest.mark.parametrize("chunk", [1, 13, 64, 1500, 4096])
def test_chunked_top_k_of_real_valued_scores_equals_the_previous_full_matrix_result(chunk):
    rng = np.random.default_rng(3)
    b, n_items, k = 64, 3001, 50
    x = rng.normal(size=(b, 16)).astype(np.float32)
    y = rng.normal(size=(n_items, 16)).astype(np.float32)
    y[2000:2010] = y[5]  # ties across chunks
    excluded = rng.random((b, n_items)) < 0.1
    scores = topk.score(x, y)
    expected = topk.top_k_excluding(scores, as_csr(excluded), k)
    got = chunked_top_k(FactorScores(x, y), as_csr(excluded), k, chunk)
    assert got[0].tobytes() == expected[0].tobytes() and got[1].tobytes() == expected[1].tobytes()
    np.testing.assert_array_equal(got[0], oracle(scores, excluded, k)[0])


@pytest.mark.parametrize("chunk", [1, 3, 10, 11, 0])
def test_constant_scores_rank_ties_and_minus_infinity_like_the_full_sort(chunk):
    row = np.array([3, 1, 3, -np.inf, 2, 3, 1, -np.inf, 0, 2, 3], np.float32)
    excluded = np.zeros((5, row.size), bool)
    excluded[1, [0, 2]] = True
    excluded[2, :9] = True  # eligible: 9 and 10, then padding
    excluded[3, [5, 10]] = True
    excluded[4] = True
    k = 10
    expected = oracle(np.tile(row, (5, 1)), excluded, k)
    got = chunked_top_k(ConstantScores(row, 5), as_csr(excluded), k, chunk)
    np.testing.assert_array_equal(got[0], expected[0])
    assert got[1].tobytes() == expected[1].tobytes()
    general = chunked_top_k(BroadcastRow(row, 5), as_csr(excluded), k, chunk)
    assert got[0].tobytes() == general[0].tobytes() and got[1].tobytes() == general[1].tobytes()
    assert list(got[0][0]) == [0, 2, 5, 10, 4, 9, 1, 6, 8, 3]  # -inf items last, before padding


def test_exclusions_as_an_indptr_slice_or_none(tied_factors):
    x, y, excluded = tied_factors
    csr = as_csr(excluded)
    rows = slice(10, 30)
    pair = (csr.indptr[rows.start : rows.stop + 1], csr.indices)
    got = chunked_top_k(FactorScores(x[rows], y), pair, 6, 5)
    np.testing.assert_array_equal(got[0], oracle(full_scores(x, y), excluded, 6)[0][rows])
    nothing = np.zeros_like(excluded)
    got = chunked_top_k(FactorScores(x, y), None, 6, 9)
    np.testing.assert_array_equal(got[0], oracle(full_scores(x, y), nothing, 6)[0])


def test_empty_blocks_and_bad_arguments():
    y = np.ones((5, 2), np.float32)
    ids, top = chunked_top_k(FactorScores(np.zeros((0, 2), np.float32), y), None, 3, 2)
    assert ids.shape == top.shape == (0, 3)
    ids, top = chunked_top_k(FactorScores(np.ones((2, 2), np.float32), y[:0]), None, 3, 2)
    assert (ids == -1).all() and np.isneginf(top).all()
    with pytest.raises(ValueError, match="item_chunk"):
        chunked_top_k(FactorScores(np.ones((2, 2), np.float32), y), None, 3, -1)
    with pytest.raises(ValueError, match="k must be"):
        chunked_top_k(FactorScores(np.ones((2, 2), np.float32), y), None, 0, 2)
    with pytest.raises(ValueError, match="shape"):
        chunked_top_k(FactorScores(np.ones((2, 2), np.float32), y), as_csr(np.ones((3, 5))), 1)
    for block in (ConstantScores, BroadcastRow):
        with pytest.raises(ValueError, match="NaN"):
            chunked_top_k(block(np.array([1, np.nan], np.float32), 2), None, 1, 1)
    assert chunked_topk.item_chunk_for(4096) == chunked_topk.DEFAULT_SCORE_BYTES // (4 * 4096)
    assert chunked_topk.item_chunk_for(10**9) == 1 and chunked_topk.item_chunk_for(7, 3) == 3


def test_scores_formed_in_slabs_of_rows_are_the_same_bits():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(37, 16)).astype(np.float32)
    y = rng.normal(size=(101, 16)).astype(np.float32)
    whole = topk.score(x, y)
    assert whole.tobytes() == full_scores(x, y).tobytes()
    for product_bytes in (1, 8 * 101 * 5, 10**9):
        assert topk.score(x, y, product_bytes).tobytes() == whole.tobytes(), product_bytes


def test_memory_is_bounded_by_the_chunk_not_the_catalogue():
    """NumPy reports its buffers to tracemalloc: the chunked peak stays near the chunk's
    b · chunk · (4 + 8) bytes of scores, while the whole matrix's is b · n_items · 12 bytes."""
    rng = np.random.default_rng(5)
    b, n_items, chunk, k = 128, 40_000, 256, 20
    x = rng.normal(size=(b, 8)).astype(np.float32)
    y = rng.normal(size=(n_items, 8)).astype(np.float32)
    seen = as_csr(rng.random((b, n_items)) < 0.001)
    result = {}

    def chunked():
        result["chunked"] = chunked_top_k(FactorScores(x, y), seen, k, chunk)

    def whole():
        result["whole"] = topk.top_k_excluding(topk.score(x, y), seen, k)

    chunked_peak, whole_peak = peak_bytes(chunked), peak_bytes(whole)
    assert result["chunked"][0].tobytes() == result["whole"][0].tobytes()
    assert whole_peak > b * n_items * 12
    assert chunked_peak < 4 * b * chunk * 12 + 16 * seen.nnz + 64 * b * k, chunked_peak


@pytest.mark.parametrize("chunk", [1, 7, 0])
def test_metrics_from_chunked_top_k_equal_the_unchunked_ones(chunk):
    rng = np.random.default_rng(9)
    n_users, n_items = 70, 53
    observed = rng.random((n_users, n_items)) < 0.3
    heldout_cells = observed & (rng.random((n_users, n_items)) < 0.3)
    train, heldout = as_csr(observed & ~heldout_cells), as_csr(heldout_cells)
    x = rng.integers(-2, 3, size=(n_users, 4)).astype(np.float32)  # ties
    y = rng.integers(-2, 3, size=(n_items, 4)).astype(np.float32)
    ks = (1, 5, 10)
    chunked = metrics.evaluate(
        metrics.factor_scorer(x, y), train, heldout, ks, batch_size=16, item_chunk=chunk
    )
    whole = metrics.evaluate(lambda users: full_scores(x[users], y), train, heldout, ks, 16)
    assert chunked == whole and chunked["users_evaluated"] > 40
    counts = train.col_counts().astype(np.float32)
    popular = metrics.evaluate(
        lambda users: np.tile(counts, (users.size, 1)), train, heldout, ks, batch_size=16
    )
    assert metrics.evaluate_popularity(train, heldout, ks, 16, item_chunk=chunk) == popular


@pytest.mark.parametrize("chunk", [1, 3, 11])
def test_tie_heavy_rows_selected_a_few_rows_at_a_time_rank_as_the_full_sort(monkeypatch, chunk):
    """Popularity-like scores (counts: ties everywhere) on the general path send every row to
    the partition path, which then works two rows at a time; the lists stay the full sort's."""
    rng = np.random.default_rng(11)
    b, n_items, k = 9, 23, 6
    row = rng.integers(0, 3, n_items).astype(np.float32)
    excluded = rng.random((b, n_items)) < 0.3
    monkeypatch.setattr(topk, "_PARTITION_BYTES", 2 * 4 * n_items)
    expected = oracle(np.tile(row, (b, 1)), excluded, k)
    got = chunked_top_k(BroadcastRow(row, b), as_csr(excluded), k, chunk)
    np.testing.assert_array_equal(got[0], expected[0])
    assert got[1].tobytes() == expected[1].tobytes()


def test_tie_heavy_rows_do_not_multiply_the_chunks_memory(monkeypatch):
    """A block of popularity-like scores (counts 0 or 1: every row has more tied candidates
    than the candidate path takes) peaked at about 7 times its chunk of float32 scores when all
    its rows were partitioned at once (110 MiB here); a slab of rows at a time keeps the
    partition's work arrays near `_PARTITION_BYTES` each."""
    rng = np.random.default_rng(3)
    b, n_items, chunk, k = 1024, 16384, 4096, 20
    row = (rng.random(n_items) < 0.1).astype(np.float32)
    seen = as_csr(rng.random((b, n_items)) < 0.001)
    monkeypatch.setattr(topk, "_PARTITION_BYTES", 1 << 20)
    peak = peak_bytes(lambda: chunked_top_k(BroadcastRow(row, b), seen, k, chunk))
    scores_bytes = b * chunk * 4  # 16 MiB
    assert peak < 3.5 * scores_bytes, peak / 2**20
