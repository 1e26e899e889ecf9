"""Initial factors from a counter-based generator keyed by each row's original ID.

    keys = id_keys(["visitor-1", "visitor-2"])              # uint64 [2]
    x0 = initial_factors(keys, k=32, stddev=0.1, seed=0, side=USERS)   # float32 [2, 32]

Row u starts from a vector that is a pure function of (seed, side, hash(original ID of u)):

    z_uj = Box–Muller(U(seed, side, key_u, 2⌊j/2⌋), U(seed, side, key_u, 2⌊j/2⌋ + 1))
    x_uj = z_uj · stddev / √k,      z_uj ~ N(0, 1) i.i.d.

where U(...) is SplitMix64 (Steele, Lea & Flood 2014) applied to a counter, mapped to (0, 1).
Nothing depends on the row's index, its block, the worker that generates it or the number of
workers, and the same visitor starts from the same vector in every dated run; that is what
lets the local and the Beam trainer agree, and lets a warm start match rows by ID.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, elementwise on uint64 (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    return z ^ (z >> np.uint64(31))


def id_keys(ids: Iterable[str]) -> np.ndarray:
    """A stable 64-bit hash of each original ID: uint64 [n].

    The first 8 bytes (little-endian) of BLAKE2b of the ID's UTF-8 bytes: the same on every
    machine, Python version and run (unlike `hash()`).
    """
    digests = b"".join(
        hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest() for value in ids
    )
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def index_keys(n: int) -> np.ndarray:
    """Keys for rows that have no original IDs: those of the IDs "0", "1", ..., str(n - 1)."""
    return id_keys(str(i) for i in range(n))


def initial_factors(keys: np.ndarray, k: int, stddev: float, seed: int, side: int) -> np.ndarray:
    """Initial factors of the rows with the given keys: float32 [n, k], i.i.d. N(0, (σ/√k)²).

    Args:
        keys: uint64 [n], from `id_keys`.
        k: the factor dimension.
        stddev: σ.
        seed: the run's seed, >= 0.
        side: 0 for users, 1 for items (`trainer.core.problem.USERS` / `ITEMS`).

    Returns:
        float32 [n, k]; row u depends only on (keys[u], k, σ, seed, side).
    """
    keys = np.asarray(keys, dtype=np.uint64).reshape(-1)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    pairs = (k + 1) // 2
    stream = np.uint64(seed) * np.uint64(2) + np.uint64(side)
    with np.errstate(over="ignore"):
        base = _mix(keys ^ _mix(np.array([stream * _GOLDEN + _GOLDEN], dtype=np.uint64)))
        counters = np.arange(1, 2 * pairs + 1, dtype=np.uint64) * _GOLDEN  # [2·pairs]
        bits = _mix(base[:, None] + counters[None, :])  # [n, 2·pairs]
    # 53 random bits -> a double in (0, 1).
    uniform = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))
    radius = np.sqrt(-2.0 * np.log(uniform[:, 0::2]))
    angle = 2.0 * np.pi * uniform[:, 1::2]
    normal = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=2)
    normal = normal.reshape(keys.size, 2 * pairs)[:, :k]
    return (normal * (stddev / np.sqrt(k))).astype(np.float32)
