"""Warm start: initial factors from a previously trained model, matched by original ID.

Vocabulary indices change from day to day, so rows are matched by their original visitorId and
contentId. A row the earlier model knew starts from its trained factors; a new visitor or new
content starts from the seeded initialisation (`trainer.core.seeding`), exactly as in a cold run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging

import numpy as np

from trainer.core import problem, seeding
from trainer.core.factors import WALSFactors
from trainer.core.objective import WALSConfig
from trainer.serving import model as model_lib

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class WarmStart:
    """Initial factors for this run's vocabularies.

    Attributes:
        factors: X0 float32 [n_users, k] and Y0 float32 [n_items, k].
        matched_users: rows of X0 taken from the earlier model.
        matched_items: rows of Y0 taken from the earlier model.
        source: the earlier model's directory.
        digest: SHA-256 of X0 and Y0, so that a checkpoint can tell one warm start from another.
    """

    factors: WALSFactors
    matched_users: int
    matched_items: int
    source: str
    digest: str


def _match(ids: list[str], known: dict[str, int], trained: np.ndarray, seeded: np.ndarray):
    rows = np.array([known.get(value, -1) for value in ids], dtype=np.int64)
    hit = rows >= 0
    out = seeded.copy()
    out[hit] = trained[rows[hit]]
    return out, int(hit.sum())


def from_model(model_dir: str, users: list[str], items: list[str], config: WALSConfig) -> WarmStart:
    """Initial factors for `users` x `items` from the model in `model_dir`.

    Raises:
        FileNotFoundError: model_dir holds no trained model.
        ValueError: the model has another number of latent factors.
    """
    earlier = model_lib.load(model_dir)
    k = config.latent_factors
    if earlier.item_factors.shape[1] != k:
        raise ValueError(
            f"cannot warm start from {model_dir}: it has k={earlier.item_factors.shape[1]} "
            f"latent factors, this run {k}"
        )
    sides = []
    for side, ids, trained, vocabulary in (
        (problem.USERS, users, earlier.user_factors, earlier.users),
        (problem.ITEMS, items, earlier.item_factors, earlier.items),
    ):
        seeded = seeding.initial_factors(
            seeding.id_keys(ids), k, config.init_stddev, config.seed, side
        )
        known = {value: index for index, value in enumerate(vocabulary)}
        sides.append(_match(ids, known, np.asarray(trained, np.float32), seeded))
    (x0, matched_users), (y0, matched_items) = sides
    digest = hashlib.sha256(x0.tobytes() + y0.tobytes()).hexdigest()
    logger.info(
        "warm start from %s: %d of %d visitors and %d of %d content matched by ID",
        model_dir,
        matched_users,
        len(users),
        matched_items,
        len(items),
    )
    return WarmStart(WALSFactors(x0, y0), matched_users, matched_items, model_dir, digest)
