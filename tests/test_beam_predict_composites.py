"""The Beam composites of distributed batch prediction (`trainer.beam.predict`) on a tiny input,
with TestPipeline + assert_that, against lists ranked by hand.

Four contents a, b, c, d with one latent factor y = (4, 3, 2, 1); three visitors in two blocks of
two rows: u0 (x = 1, saw a, d), u1 (x = -1, saw d) and u2 (x = 1, saw a, b, d). Scores are
x·y; seen pairs are never recommended; ties go to the lower row.
"""

from __future__ import annotations

import json

import apache_beam as beam
import numpy as np
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from common import counts
from trainer.beam.predict import (
    LINES_TAG,
    PredictForContent,
    PredictForUsers,
    PredictSpec,
    UserBlock,
)
from trainer.core.sparse import CsrMatrix

ITEMS = ["a", "b", "c", "d"]
Y = np.array([[4.0], [3.0], [2.0], [1.0]], dtype=np.float32)
VISITORS = ["u0", "u1", "u2"]
X = np.array([[1.0], [-1.0], [1.0]], dtype=np.float32)
SEEN = {0: [0, 3], 1: [3], 2: [0, 1, 3]}
BLOCK_ROWS = 2


def user_blocks() -> list[UserBlock]:
    blocks = []
    for block_id, users in enumerate(([0, 1], [2])):
        rows = np.concatenate([[position] * len(SEEN[u]) for position, u in enumerate(users)])
        cols = np.concatenate([SEEN[u] for u in users])
        seen = CsrMatrix.from_triples(
            rows.astype(np.int64),
            cols.astype(np.int64),
            np.ones(cols.size, np.float32),
            (len(users), len(ITEMS)),
        )
        blocks.append(UserBlock(block_id, users[0], [VISITORS[u] for u in users], X[users], seen))
    return blocks


def parsed(line: str):
    key, ranked, scores = json.loads(line).values()
    return key, tuple(ranked), tuple(scores)


def test_predict_for_users_lists_each_visitors_best_unseen_content():
    spec = PredictSpec("unused", k=2, output_format="jsonl", block_rows=BLOCK_ROWS)
    expected = [
        ("u0", ("b", "c"), (3.0, 2.0)),
        ("u1", ("c", "b"), (-2.0, -3.0)),
        ("u2", ("c",), (2.0,)),  # only c is unseen
    ]
    with TestPipeline() as p:
        item_factors = p | "ItemFactors" >> beam.Create([Y])
        items = p | "Items" >> beam.Create([ITEMS])
        predicted = p | beam.Create(user_blocks()) | PredictForUsers(spec, item_factors, items)
        assert_that(predicted[LINES_TAG] | beam.Map(parsed), equal_to(expected))
        totals = predicted[counts.COUNTS_TAG] | beam.CombineGlobally(counts.SumCounts())
        want = {"lines": 3, "lines_shorter_than_k": 1}  # u2's line holds only c
        assert_that(totals, equal_to([want]), label="Counts")


def test_predict_for_content_merges_each_contents_best_visitors_over_blocks():
    spec = PredictSpec("unused", k=2, targeting=True, output_format="jsonl", block_rows=BLOCK_ROWS)
    expected = [
        ("a", ("u1",), (-4.0,)),  # u0 and u2 saw a
        ("b", ("u0", "u1"), (3.0, -3.0)),
        ("c", ("u0", "u2"), (2.0, 2.0)),  # a tie, to the lower row
        ("d", (), ()),  # everyone saw d
    ]
    with TestPipeline() as p:
        item_factors = p | "ItemFactors" >> beam.Create([Y])
        items = p | "Items" >> beam.Create([ITEMS])
        predicted = p | beam.Create(user_blocks()) | PredictForContent(spec, item_factors, items)
        assert_that(predicted[LINES_TAG] | beam.Map(parsed), equal_to(expected))
        totals = predicted[counts.COUNTS_TAG] | beam.CombineGlobally(counts.SumCounts())
        want = {"lines": 4, "lines_shorter_than_k": 2}  # a's and d's lines
        assert_that(totals, equal_to([want]), label="Counts")
