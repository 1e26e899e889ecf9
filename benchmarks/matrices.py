"""Synthetic implicit-feedback matrices with planted structure, and a per-cell train/eval split.

`synthetic_matrix` draws page views from a generative model with the two properties that make
recommendation data hard and interesting:

  * power-law item popularity: item i has weight pop_i ∝ rank_i^-a (Zipf-like, ranks shuffled
    over item ids), and user activity is log-normal, so row and column lengths span a few to
    thousands of entries;
  * planted low-rank taste: every user u has a topic mix θ_u and every item i a topic mix φ_i,
    both sparse Dirichlet vectors over `rank` topics, and a view of user u lands on item i with

        P(i | u) = (1 − noise) · pop_i (θ_u·φ_i) / Σ_j pop_j (θ_u·φ_j) + noise · pop_i / Σ_j pop_j.

Because θ_u·φ_i = Σ_t θ_ut φ_it, the first term is a mixture over topics: pick topic t with
probability ∝ θ_ut Z_t (Z_t = Σ_j pop_j φ_jt), then item i with probability ∝ pop_i φ_it. Both
draws are inverse-CDF look-ups (`np.searchsorted`) on offset, concatenated cumulative tables,
so a view costs O(log(n_users · rank) + log(rank · n_items)) and everything stays vectorised.

Repeated views of one (user, item) pair are aggregated like the preprocessing pipeline does
with session dwell time: each view has a log-normal dwell, a cell's dwell is the sum, and its
value is the scaled rating min(0.3 · dwell / median(dwell), 1) in (0, 1].

`split_cells` holds out a fraction of cells chosen by a hash of (seed, user, item), so a cell's
side depends on nothing else: not on the other cells, the matrix layout or the platform.
"""

from __future__ import annotations

import logging

import numpy as np

from trainer.core.sparse import CsrMatrix

logger = logging.getLogger(__name__)

# Benchmark sizes: (n_users, n_items, nnz).
SIZES: dict[str, tuple[int, int, int]] = {
    "small": (5_000, 1_000, 100_000),
    "large": (100_000, 20_000, 5_000_000),
}

# Dirichlet concentration of the topic mixes; < 1 puts most of a mix on one to three topics.
TOPIC_CONCENTRATION = 0.1
# σ of the log-normal user activity (views per user) and of the dwell time of one view.
ACTIVITY_SIGMA = 1.0
DWELL_SIGMA = 1.0
# Scaled rating of a cell with the median dwell, as in the pipeline's `min(0.3 · d / median, 1)`.
MEDIAN_RATING = 0.3
# Rounds of drawing more views when duplicates left fewer than `nnz` distinct cells.
_MAX_ROUNDS = 12


def _offset_cdf(weights: np.ndarray) -> np.ndarray:
    """Row-wise cumulative distributions, each shifted by its row number and flattened.

    For weights float [m, n] (rows with positive sums), returns float64 [m · n] whose row j
    occupies entries j·n .. j·n + n − 1 and rises from j to j + 1. A draw from row j with uniform
    v ∈ [0, 1) is then `searchsorted(cdf, j + v, side="right") − j·n`.
    """
    m, n = weights.shape
    cdf = np.cumsum(weights, axis=1, dtype=np.float64)
    cdf /= cdf[:, -1:]
    cdf[:, -1] = 1.0
    cdf += np.arange(m, dtype=np.float64)[:, None]
    return cdf.ravel()


def _draw_rows(cdf: np.ndarray, n: int, rows: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Inverse-CDF draws: for each j in `rows`, an index in [0, n) from that row of `cdf`."""
    rows = rows.astype(np.int64)
    found = np.searchsorted(cdf, rows + uniforms, side="right") - rows * n
    return np.clip(found, 0, n - 1)


def _sparse_mix(rng: np.random.Generator, n: int, rank: int) -> np.ndarray:
    """float64 [n, rank] topic mixes, Dirichlet(TOPIC_CONCENTRATION) drawn via Gamma variates."""
    mix = rng.gamma(TOPIC_CONCENTRATION, size=(n, rank)) + 1e-12
    return mix / mix.sum(axis=1, keepdims=True)


def synthetic_matrix(
    n_users: int,
    n_items: int,
    nnz: int,
    seed: int,
    rank: int = 16,
    popularity_exponent: float = 0.9,
    noise: float = 0.1,
) -> CsrMatrix:
    """An implicit-feedback matrix with Zipf item popularity and planted rank-`rank` tastes.

    See the module docstring for the generative model.

    Args:
        n_users: rows, > 0.
        n_items: columns, > 0.
        nnz: distinct (user, item) cells to return; at most n_users · n_items / 2.
        seed: seed of the NumPy Generator; the result is a function of all arguments only.
        rank: number of planted topics, > 0.
        popularity_exponent: a in pop_i ∝ rank_i^-a, >= 0 (0 = uniform popularity).
        noise: fraction of views drawn from popularity alone, in [0, 1].

    Returns:
        A CsrMatrix of shape (n_users, n_items) with exactly `nnz` entries, float32 values in
        (0, 1].
    """
    if n_users <= 0 or n_items <= 0 or rank <= 0:
        raise ValueError(f"n_users, n_items and rank must be > 0, got {n_users}, {n_items}, {rank}")
    if not 0 <= nnz <= n_users * n_items // 2:
        raise ValueError(f"nnz must lie in [0, n_users · n_items / 2], got {nnz}")
    if popularity_exponent < 0 or not 0.0 <= noise <= 1.0:
        raise ValueError(
            f"need popularity_exponent >= 0 and noise in [0, 1], got {popularity_exponent}, {noise}"
        )
    rng = np.random.default_rng(seed)
    popularity = np.arange(1, n_items + 1, dtype=np.float64) ** -popularity_exponent
    popularity = rng.permutation(popularity)
    activity = rng.lognormal(0.0, ACTIVITY_SIGMA, size=n_users)
    theta = _sparse_mix(rng, n_users, rank)
    phi = _sparse_mix(rng, n_items, rank)

    # Topic t's item distribution q_t(i) ∝ pop_i φ_it, and its total mass Z_t; user u's topic
    # distribution ∝ θ_ut Z_t. Row `rank` of the item table is the popularity-only noise "topic".
    item_weights = np.vstack([(popularity[:, None] * phi).T, popularity[None, :]])
    topic_mass = item_weights[:rank].sum(axis=1)
    user_topic = theta * topic_mass[None, :]
    user_cdf = _offset_cdf(user_topic)
    item_cdf = _offset_cdf(item_weights)
    activity_cdf = np.cumsum(activity / activity.sum())
    activity_cdf[-1] = 1.0

    keys = np.zeros(0, dtype=np.int64)
    dwell = np.zeros(0, dtype=np.float64)
    n_distinct, to_draw = 0, nnz + nnz // 4
    for _ in range(_MAX_ROUNDS):
        users = np.minimum(np.searchsorted(activity_cdf, rng.random(to_draw)), n_users - 1)
        topics = _draw_rows(user_cdf, rank, users, rng.random(to_draw))
        topics[rng.random(to_draw) < noise] = rank
        items = _draw_rows(item_cdf, n_items, topics, rng.random(to_draw))
        keys = np.concatenate([keys, users * n_items + items])
        dwell = np.concatenate([dwell, rng.lognormal(0.0, DWELL_SIGMA, size=to_draw)])
        n_distinct = np.unique(keys).size
        logger.debug("%d views give %d distinct cells of %d wanted", keys.size, n_distinct, nnz)
        if n_distinct >= nnz:
            break
        # Draw enough for the shortfall at the current yield of new cells per view, plus slack.
        yield_per_view = max(n_distinct / keys.size, 0.05)
        to_draw = int((nnz - n_distinct) / yield_per_view * 1.2) + 1000
    else:
        raise RuntimeError(
            f"only {n_distinct} distinct cells after {_MAX_ROUNDS} rounds; the popularity or "
            f"taste distribution is too concentrated for nnz = {nnz}"
        )
    cells, inverse = np.unique(keys, return_inverse=True)
    cell_dwell = np.bincount(inverse, weights=dwell, minlength=cells.size)
    keep = np.sort(rng.choice(cells.size, size=nnz, replace=False))
    cells, cell_dwell = cells[keep], cell_dwell[keep]
    values = np.minimum(MEDIAN_RATING * cell_dwell / np.median(cell_dwell), 1.0)
    values = np.maximum(values, np.finfo(np.float32).tiny)
    return CsrMatrix.from_triples(cells // n_items, cells % n_items, values, (n_users, n_items))


def _cell_uniforms(rows: np.ndarray, cols: np.ndarray, seed: int) -> np.ndarray:
    """A uniform in [0, 1) per cell: the splitmix64 finaliser of (seed, row, col), top 53 bits."""
    with np.errstate(over="ignore"):
        z = (
            rows.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
            + cols.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
            + np.uint64(seed % 2**64) * np.uint64(0x165667B19E3779F9)
        )
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _select(matrix: CsrMatrix, mask: np.ndarray) -> CsrMatrix:
    """The entries of `matrix` where mask (bool [nnz]) is True, same shape and order."""
    indptr = np.zeros(matrix.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(matrix.row_ids()[mask], minlength=matrix.shape[0]), out=indptr[1:])
    return CsrMatrix(indptr, matrix.indices[mask], matrix.values[mask], matrix.shape)


def split_cells(matrix: CsrMatrix, eval_fraction: float, seed: int) -> tuple[CsrMatrix, CsrMatrix]:
    """Splits the stored cells into a training and a held-out matrix.

    Cell (u, i) is held out iff h(seed, u, i) < eval_fraction, with h a 64-bit hash mapped to a
    uniform in [0, 1); the decision depends on the cell and the seed only.

    Args:
        matrix: the full matrix, shape (n_users, n_items).
        eval_fraction: expected fraction of cells held out, in [0, 1].
        seed: selects the hash.

    Returns:
        (train, heldout), both of the matrix's shape; every stored cell is in exactly one, with
        its value.
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must lie in [0, 1], got {eval_fraction}")
    heldout = _cell_uniforms(matrix.row_ids(), matrix.indices, seed) < eval_fraction
    return _select(matrix, ~heldout), _select(matrix, heldout)
