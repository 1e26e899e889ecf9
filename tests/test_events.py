"""Beam composites: ParseEvents, SumPerPair, SplitTrainEval, DropOutOfVocabulary, matrix I/O."""

import glob
import hashlib
import json
import math

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from common import counts
from pipeline import events, matrix_io, records
from transforms import examples

CONFIG = records.SessionConfig()


def session(visitor, visit, pages):
    hits = [
        {
            "type": "PAGE",
            "time": t,
            "hitNumber": n,
            "customDimensions": [] if c is None else [{"index": 10, "value": c}],
        }
        for n, (t, c) in enumerate(pages, 1)
    ]
    return json.dumps({"fullVisitorId": visitor, "visitId": visit, "hits": hits}).encode()


LINES = [
    session("v1", 1, [(0, "a"), (1000, "b"), (1500, None)]),
    session("v1", 2, [(0, "a"), (250, "c")]),
    session("v2", 1, [(0, "b"), (40, "b"), (100, "a")]),
    b"garbage",
    session("v3", 1, []),
]


def test_parse_events_and_rejected():
    with TestPipeline() as p:
        parsed = p | beam.Create(LINES) | events.ParseEvents("ga360", CONFIG)
        assert_that(
            parsed[events.EVENTS_TAG] | "Unbatch" >> beam.FlatMap(lambda batch: batch),
            equal_to(
                [("v1", "a", 1000.0), ("v1", "b", 500.0), ("v1", "a", 250.0), ("v2", "b", 100.0)]
            ),
            label="Events",
        )
        reasons = parsed[events.REJECTED_TAG] | beam.Map(lambda r: json.loads(r)["reason"])
        assert_that(reasons, equal_to(["malformed_json", "empty_hits"]), label="Reasons")
        totals = parsed[counts.COUNTS_TAG] | beam.CombineGlobally(counts.SumCounts())
        want = {
            "lines_read": 5,
            "records_parsed": 3,
            "lines_rejected": 2,
            "rejected:malformed_json": 1,
            "rejected:empty_hits": 1,
            "hits": 8,
            "page_hits": 8,
            "events": 4,
        }
        assert_that(totals, equal_to([want]), label="Counts")


def test_rejected_record_keeps_the_line_losslessly():
    record = json.loads(events.rejected_record(b"\xffab\n", "bad_encoding"))
    assert record == {"reason": "bad_encoding", "line": "\\xffab\n"}


def _unbatch(batches, label=""):
    return batches | f"Unbatch{label}" >> beam.FlatMap(lambda batch: batch)


def test_sum_per_pair_over_visits_drops_nonpositive():
    evts = [("v1", "a", 1000.0), ("v1", "a", 250.0), ("v1", "b", 0.0), ("v2", "b", 3.0)]
    with TestPipeline() as p:
        summed = p | beam.Create([evts[:2], evts[2:]]) | events.SumPerPair("ga360")
        pairs = summed[events.PAIRS_TAG]
        assert_that(_unbatch(pairs), equal_to([("v1", "a", 1250.0), ("v2", "b", 3.0)]))
        dropped = summed[counts.COUNTS_TAG] | beam.CombineGlobally(counts.SumCounts())
        assert_that(dropped, equal_to([{"pairs_dropped_nonpositive": 1}]), label="Counts")


def test_movielens_keeps_latest_rating():
    evts = [("u", "m", (10.0, 2.0)), ("u", "m", (20.0, 4.5)), ("u", "n", (5.0, 1.0))]
    with TestPipeline() as p:
        summed = p | beam.Create([evts[1:], evts[:1]]) | events.SumPerPair("movielens")
        pairs = summed[events.PAIRS_TAG]
        assert_that(_unbatch(pairs), equal_to([("u", "m", 4.5), ("u", "n", 1.0)]))


def _random_events(seed: int, count: int, latest: bool = False) -> list[list]:
    """Batches of random events over few enough pairs that most pairs repeat."""
    import numpy as np

    rng = np.random.default_rng(seed)
    evts = [
        (
            f"v{rng.integers(300)}",
            f"c{rng.integers(40)}",
            (float(rng.integers(100)), float(rng.integers(1, 6)))
            if latest
            else float(rng.integers(-50, 1000)),
        )
        for _ in range(count)
    ]
    return [evts[start : start + 97] for start in range(0, count, 97)]


@pytest.mark.parametrize("input_format", ["ga360", "movielens"])
def test_sum_per_pair_does_not_depend_on_buckets(monkeypatch, input_format):
    latest = input_format == "movielens"
    batches = _random_events(7, 3000, latest)
    expected: dict = {}
    for batch in batches:
        events._add_events(expected, batch, latest)
    want = [
        (v, c, float(t[1]) if latest else t) for (v, c), t in expected.items() if latest or t > 0
    ]
    # A bundle's partial sums go to the shuffle every 50 pairs, not only at its end.
    monkeypatch.setattr(events, "MAX_BUFFERED_PAIRS", 50)
    with TestPipeline() as p:
        source = p | beam.Create(batches)
        for buckets in (1, 3, 16, 1000):
            summed = source | f"Sum{buckets}" >> events.SumPerPair(input_format, buckets)
            pairs = summed[events.PAIRS_TAG]
            assert_that(_unbatch(pairs, buckets), equal_to(want), label=f"Pairs{buckets}")


# The first 8 bytes of sha256(visitorId + "\x1f" + contentId), computed once and pasted here, so a
# change of the split rule (hash, separator, encoding, byte order) fails the tests: it would move
# pairs between train and eval in every existing dataset.
SPLIT_DIGESTS = {
    ("v1", "a"): "342eddf2b5222316",
    ("v1", "b"): "1ee5f0d994f2a6c1",
    ("v2", "a"): "23ccf0faf64ff805",
    ("1234567890123456789", "/home"): "c13345c9f0157d6a",
    ("visitor", "content"): "66acd509c00dd708",
    ("ü", "café"): "1fac160cec3ab374",
    ("", "x"): "0a08c67db8521ee0",
    ("v7", "c3"): "2e98abca85330418",
    ("42", "/products/p-17"): "b2e6732063b671d5",
    ("u", "m"): "7f84dd8b73f3a8eb",
}


def test_split_digests_follow_the_documented_rule():
    for (visitor, content), digest in SPLIT_DIGESTS.items():
        computed = hashlib.sha256(visitor.encode() + b"\x1f" + content.encode()).digest()[:8]
        assert computed.hex() == digest, (visitor, content)


def test_split_puts_a_pair_in_eval_exactly_below_its_hash_position():
    for (visitor, content), digest in SPLIT_DIGESTS.items():
        position = int(digest, 16) / 2.0**64
        assert not events.is_eval(visitor, content, position), (visitor, content)
        assert events.is_eval(visitor, content, math.nextafter(position, 1.0)), (visitor, content)
        assert not events.is_eval(visitor, content, 0.0)
        assert events.is_eval(visitor, content, 1.0)


def test_split_assignments_are_pinned():
    eval_at_15_percent = {pair for pair in SPLIT_DIGESTS if events.is_eval(*pair, 0.15)}
    assert eval_at_15_percent == {("v1", "b"), ("v2", "a"), ("ü", "café"), ("", "x")}
    eval_at_half = {pair for pair in SPLIT_DIGESTS if events.is_eval(*pair, 0.5)}
    assert eval_at_half == {
        ("v1", "a"),
        ("v1", "b"),
        ("v2", "a"),
        ("visitor", "content"),
        ("ü", "café"),
        ("", "x"),
        ("v7", "c3"),
        ("u", "m"),
    }


def test_split_fraction_is_near_eval_fraction():
    keys = [(f"v{i}", f"c{i % 97}") for i in range(20000)]
    share = sum(events.is_eval(v, c, 0.1) for v, c in keys) / len(keys)
    assert 0.09 < share < 0.11


def test_split_train_eval_partitions_every_pair_once():
    pairs = [(f"v{i}", "c", 1.0) for i in range(200)]
    expected_eval = [pair for pair in pairs if events.is_eval(pair[0], pair[1], 0.25)]
    with TestPipeline() as p:
        batches = [pairs[:70], pairs[70:71], pairs[71:]]
        train, evaluation = p | beam.Create(batches) | events.SplitTrainEval(0.25)
        assert_that(_unbatch(evaluation, "Eval"), equal_to(expected_eval), label="Eval")
        assert_that(
            _unbatch(train, "Train"),
            equal_to([pair for pair in pairs if pair not in expected_eval]),
            label="Train",
        )


def test_parse_events_rejects_unknown_format():
    with pytest.raises(ValueError, match="unknown input format"):
        events.ParseEvents("parquet", CONFIG)


def _transformed(rows):
    """TF Transform's output with output_record_batches=True: (RecordBatch, passthrough)."""
    import pyarrow as pa

    columns = {
        "userId": pa.array([r[0] for r in rows], pa.int64()),
        "itemId": pa.array([r[1] for r in rows], pa.int64()),
        "rating": pa.array([r[2] for r in rows], pa.float32()),
    }
    return pa.RecordBatch.from_arrays(list(columns.values()), list(columns)), {}


def test_write_sparse_matrix_rows_and_columns(tmp_path):
    # Row 33 shares GROUP_SHARDS shard 1 with row 1; rows and columns span both batches.
    first = [(0, 1, 0.5), (33, 0, 0.75), (-1, 1, 1.0)]
    second = [(0, 0, 0.25), (1, 1, 1.0), (1, -1, 1.0), (33, 2, 0.125)]
    assert 33 % matrix_io.GROUP_SHARDS == 1
    with TestPipeline() as p:
        batches = p | beam.Create([_transformed(first), _transformed(second)])
        kept = batches | matrix_io.DropOutOfVocabulary("train")
        _ = kept[matrix_io.CELLS_TAG] | matrix_io.WriteSparseMatrix(str(tmp_path))
        totals = kept[counts.COUNTS_TAG] | beam.CombineGlobally(counts.SumCounts())
        want = {"train_interactions": 5, "train_dropped_out_of_vocabulary": 2}
        assert_that(totals, equal_to([want]))
    result = p.result.metrics().query()["counters"]
    metrics = {c.key.metric.name: c.committed for c in result}
    assert metrics == want, "the Beam counters stay, for monitoring"

    def read(name):
        out = {}
        for path in glob.glob(str(tmp_path / f"{name}-*.tfrecord.gz")):
            for record in _tfrecords(path):
                key, indices, values = examples.parse_sparse_example(record)
                assert key not in out
                out[key] = (indices.tolist(), values.tolist())
        return out

    assert read("items_for_user") == {
        0: ([0, 1], [0.25, 0.5]),
        1: ([1], [1.0]),
        33: ([0, 2], [0.75, 0.125]),
    }
    assert read("users_for_item") == {
        0: ([0, 33], [0.25, 0.75]),
        1: ([0, 1], [0.5, 1.0]),
        2: ([33], [0.125]),
    }


def _rows_by_file(directory) -> dict[str, list[tuple]]:
    """{file name: its records parsed to (key, indices, values) lists, sorted} of the TFRecords
    in directory (parsed: the encoder's byte order of an Example's features may vary)."""
    import os

    written = {}
    for path in sorted(glob.glob(f"{directory}/*.tfrecord.gz")):
        parsed = (examples.parse_sparse_example(record) for record in _tfrecords(path))
        written[os.path.basename(path)] = sorted(
            (key, indices.tolist(), values.tolist()) for key, indices, values in parsed
        )
    return written


def test_write_sparse_matrix_does_not_depend_on_groups(tmp_path, monkeypatch):
    import numpy as np

    rng = np.random.default_rng(5)
    cells = {(int(u), int(i)): float(rng.random()) for u, i in rng.integers(0, 300, (4000, 2))}
    rows = [(u, i, value) for (u, i), value in cells.items()]
    batches = [_transformed(rows[start : start + 500]) for start in range(0, len(rows), 500)]
    # A bundle's cells go to the shuffle every 700 cells, not only at its end.
    monkeypatch.setattr(matrix_io, "MAX_BUFFERED_CELLS", 700)
    counts = (1, 7, 32, 5000)
    with TestPipeline() as p:
        kept = p | beam.Create(batches) | matrix_io.DropOutOfVocabulary("train")
        cells_in = kept[matrix_io.CELLS_TAG]
        for groups in counts:
            _ = cells_in | f"Write{groups}" >> matrix_io.WriteSparseMatrix(
                str(tmp_path / str(groups)), groups=groups
            )
    written = {groups: _rows_by_file(tmp_path / str(groups)) for groups in counts}
    assert sorted(written[1]) == [
        "items_for_user-00000-of-00001.tfrecord.gz",
        "users_for_item-00000-of-00001.tfrecord.gz",
    ]
    for groups in counts[1:]:
        assert written[groups] == written[1], groups
    by_row = {
        (key, i, v)
        for key, ii, vv in written[1]["items_for_user-00000-of-00001.tfrecord.gz"]
        for i, v in zip(ii, vv)
    }
    assert by_row == {(u, i, float(np.float32(v))) for (u, i), v in cells.items()}


def test_sparse_examples_equal_one_sparse_example_per_key():
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(3)
    cells = {
        (int(k), int(o)): float(np.float32(rng.random())) for k, o in rng.integers(0, 40, (300, 2))
    }
    keys = np.array([k for k, _ in cells], dtype=np.int64)
    others = np.array([o for _, o in cells], dtype=np.int64)
    values = np.array(list(cells.values()), dtype=np.float32)
    order = rng.permutation(len(keys))
    encoded = examples.sparse_examples(keys[order], others[order], values[order])

    expected: dict[int, list] = {}
    for (key, other), value in cells.items():
        expected.setdefault(key, []).append((other, value))
    assert len(encoded) == len(expected)
    for record in encoded:
        key, indices, got_values = examples.parse_sparse_example(record)
        want = sorted(expected[key])
        assert indices.tolist() == [other for other, _ in want]
        assert got_values.tolist() == [value for _, value in want]
        assert tf.train.Example.FromString(record) == tf.train.Example.FromString(
            examples.sparse_example(key, want)
        )


def _tfrecords(path):
    import tensorflow as tf

    return [r.numpy() for r in tf.data.TFRecordDataset(path, compression_type="GZIP")]
