"""The Beam composites of the distributed evaluation (`trainer.beam.evaluate`) on a tiny input,
with TestPipeline + assert_that, against metrics worked out by hand from their definitions
(`trainer.core.metrics`' docstring).

Three users, four items, one latent factor, item factors y = (4, 3, 2, 1):

    user  x   train    held out (rating)     list (k = 2)      hits
    0     1   {0, 3}   {1: 2.0}              WALS (1, 2)       r1
                                             popular (1, 2)    r1
    1    -1   {3}      {0: 1.0, 1: 1.0}      WALS (2, 1)       r2
                                             popular (0, 1)    r1, r2
    2     1   {0,1,3}  {}                    not evaluated

Popularity counts items in the training rows: c = (2, 1, 0, 3).
"""

from __future__ import annotations

import math

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that

from trainer.beam.evaluate import EvalBlock, EvaluateBlocks, EvaluatePopularity
from trainer.core.sparse import CsrMatrix

N_ITEMS = 4
KS = (1, 2)
Y = np.array([[4.0], [3.0], [2.0], [1.0]], dtype=np.float32)
X = np.array([[1.0], [-1.0], [1.0]], dtype=np.float32)
TRAIN = {0: [0, 3], 1: [3], 2: [0, 1, 3]}
HELDOUT = {0: {1: 2.0}, 1: {0: 1.0, 1: 1.0}, 2: {}}
D = 1 / math.log2(3)  # the discount of list place 2


def csr(rows: dict, users: list[int]) -> CsrMatrix:
    r, c, v = [], [], []
    for position, user in enumerate(users):
        cells = rows[user] if isinstance(rows[user], dict) else dict.fromkeys(rows[user], 1.0)
        for item, rating in sorted(cells.items()):
            r.append(position)
            c.append(item)
            v.append(rating)
    return CsrMatrix.from_triples(
        np.array(r, np.int64), np.array(c, np.int64), np.array(v, np.float32), (len(users), N_ITEMS)
    )


def eval_blocks() -> list[EvalBlock]:
    blocks = []
    for block_id, users in enumerate(([0, 1], [2])):
        blocks.append(
            EvalBlock(
                block_id,
                np.array(users, np.int64),
                X[users],
                csr(TRAIN, users),
                csr(HELDOUT, users),
            )
        )
    return blocks


def metrics_close(expected: dict):
    def check(actual):
        (result,) = actual
        assert list(result) == list(expected)
        for name, value in expected.items():
            assert result[name] == pytest.approx(value, abs=1e-6), name

    return check


def test_evaluate_blocks_sums_the_ranking_metrics_and_rmse_over_blocks():
    # User 0: hit at place 1 of 1 held-out item; user 1: hit at place 2 of 2 held-out items.
    # Squared errors of the held-out cells: (3 - 2)², (-4 - 1)², (-3 - 1)².
    expected = {
        "rmse": math.sqrt((1 + 25 + 16) / 3),
        "recall@1": (1 + 0) / 2,
        "ndcg@1": (1 + 0) / 2,
        "map@1": (1 + 0) / 2,
        "precision@1": (1 + 0) / 2,
        "coverage@1": 2 / 4,  # {1} ∪ {2}
        "recall@2": (1 + 1 / 2) / 2,
        "ndcg@2": (1 + D / (1 + D)) / 2,
        "map@2": (1 + (1 / 2) / 2) / 2,
        "precision@2": (1 / 2 + 1 / 2) / 2,
        "coverage@2": 2 / 4,  # {1, 2} ∪ {2, 1}
        "users_evaluated": 2,
    }
    with TestPipeline() as p:
        item_factors = p | "ItemFactors" >> beam.Create([Y])
        result = p | beam.Create(eval_blocks()) | EvaluateBlocks(item_factors, N_ITEMS, KS)
        assert_that(result, metrics_close(expected))


def test_evaluate_popularity_ranks_unseen_items_by_training_count():
    expected = {
        "recall@1": 1.0,
        "ndcg@1": 1.0,
        "map@1": 1.0,
        "precision@1": 1.0,
        "coverage@1": 2 / 4,  # {1} ∪ {0}
        "recall@2": 1.0,
        "ndcg@2": 1.0,
        "map@2": 1.0,
        "precision@2": (1 / 2 + 1) / 2,
        "coverage@2": 3 / 4,  # {1, 2} ∪ {0, 1}
        "users_evaluated": 2,
    }
    with TestPipeline() as p:
        counts = p | "Counts" >> beam.Create([np.array([2, 1, 0, 3], np.int64)])
        result = p | beam.Create(eval_blocks()) | EvaluatePopularity(counts, N_ITEMS, KS)
        assert_that(result, metrics_close(expected))
