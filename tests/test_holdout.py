"""preprocess --holdout_visitors: whole visitors held out, their cells split into fold-in and
target parts, checked against the plain-Python oracle (tests/reference.py)."""

from __future__ import annotations

import concurrent.futures
import gzip
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from apache_beam.internal import pickler

from common import cli
from pipeline import holdout, preprocess, synthetic
from tests import reference
from tests.conftest import read_cells, read_sparse_records, read_vocabulary
from transforms import examples, features

HOLDOUT = 0.2
FOLDIN = 0.7


def _run(root, name: str, extra: list[str] = ()) -> str:
    out = str(root / name)
    preprocess.run(
        [
            "--input",
            str(root / "sessions.json.gz"),
            "--output_dir",
            out,
            "--holdout_visitors",
            str(HOLDOUT),
            "--holdout_foldin_fraction",
            str(FOLDIN),
            *extra,
        ]
    )
    return out


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("holdout")
    synthetic.write_sessions(str(root / "sessions.json.gz"), num_sessions=800, seed=5)
    return root


@pytest.fixture(scope="module")
def preprocessed(sample) -> str:
    return _run(sample, "preprocessed")


def read_heldout(directory: str) -> dict[str, dict[tuple[str, str], tuple[float, float]]]:
    """{part: {(visitorId, contentId): (rating, raw value)}} of heldout/, mapped back to IDs."""
    items = read_vocabulary(directory, features.ITEM_VOCAB)
    out = {}
    for part in holdout.PARTS:
        cells, seen = {}, set()
        pattern = os.path.join(directory, features.HELDOUT_DIR, f"{part}-*")
        for path in sorted(tf.io.gfile.glob(pattern)):
            for record in tf.data.TFRecordDataset(path, compression_type="GZIP"):
                visitor, indices, ratings, raw = examples.parse_heldout_example(record.numpy())
                assert visitor not in seen, f"{visitor} has two {part} records"
                seen.add(visitor)
                assert np.all(np.diff(indices) > 0), "indices are sorted and distinct"
                for item, rating, value in zip(indices, ratings, raw, strict=True):
                    cells[(visitor, items[item])] = (float(rating), float(value))
        out[part] = cells
    return out


@pytest.fixture(scope="module")
def expected(sample, preprocessed):
    with gzip.open(sample / "sessions.json.gz", "rt", encoding="utf-8") as handle:
        events, _ = reference.reference_events(handle)
    with open(os.path.join(preprocessed, features.SUMMARY_FILE)) as handle:
        summary = json.load(handle)
    ref = reference.reference_holdout(events, 0.1, HOLDOUT, FOLDIN, median=summary["median"])
    return events, ref, summary


def test_every_cell_lands_exactly_once_as_the_reference_says(preprocessed, expected):
    events, ref, summary = expected
    got = read_heldout(preprocessed)
    train, evaluation = read_cells(preprocessed, "train"), read_cells(preprocessed, "eval")
    assert set(train) == set(ref["train"])
    assert set(evaluation) == set(ref["eval"])
    for part in holdout.PARTS:
        assert set(got[part]) == set(ref[part]), part
        for pair, (rating, raw) in got[part].items():
            assert rating == pytest.approx(ref[part][pair], rel=1e-5)
            assert raw == pytest.approx(ref[f"{part}_raw"][pair], rel=1e-6)
    for pair, rating in train.items():
        assert rating == pytest.approx(ref["train"][pair], rel=1e-5)
    # Nothing twice, nothing lost: every aggregated pair is in exactly one place or dropped.
    places = [set(train), set(evaluation), set(got["foldin"]), set(got["target"])]
    assert sum(len(p) for p in places) == len(set().union(*places))
    dropped = summary["eval_dropped_unknown"] + summary["heldout_dropped_unknown"]
    assert sum(len(p) for p in places) + dropped == len(events)
    assert summary["heldout_dropped_unknown"] == ref["heldout_dropped"]
    assert summary["heldout_foldin_interactions"] == len(ref["foldin"])
    assert summary["heldout_target_interactions"] == len(ref["target"])
    assert summary["heldout_visitors"] == len(ref["heldout_visitors"])
    assert len(ref["foldin"]) > 1.5 * len(ref["target"]) > 0  # both parts are really used


def test_no_heldout_visitor_in_the_vocabularies_or_the_matrices(preprocessed, expected):
    _, ref, _ = expected
    heldout_visitors = ref["heldout_visitors"]
    assert len(heldout_visitors) >= 20
    users = set(read_vocabulary(preprocessed, features.USER_VOCAB))
    assert not users & heldout_visitors
    for split in ("train", "eval"):
        assert not {v for v, _ in read_cells(preprocessed, split)} & heldout_visitors
    # The content vocabulary is the train split's: held-out visitors add no content.
    items = set(read_vocabulary(preprocessed, features.ITEM_VOCAB))
    assert items == {c for _, c in ref["train"]}
    columns = read_sparse_records(os.path.join(preprocessed, "train"), features.USERS_FOR_ITEM)
    assert sum(len(indices) for indices, _ in columns.values()) == len(ref["train"])


def test_split_is_deterministic_across_runs_and_workers(sample, preprocessed):
    again = _run(
        sample,
        "again",
        ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"],
    )
    assert read_heldout(again) == read_heldout(preprocessed)
    assert read_cells(again, "train") == read_cells(preprocessed, "train")


def test_hashes_are_salted_and_independent_of_the_pair_split():
    visitors = [f"visitor-{n}" for n in range(4000)]
    held = [holdout.is_heldout_visitor(v, 0.25) for v in visitors]
    assert abs(np.mean(held) - 0.25) < 0.03
    pairs = [(v, f"article-{n % 97}") for n, v in enumerate(visitors)]
    foldin = np.array([holdout.is_foldin(v, c, 0.8) for v, c in pairs])
    is_eval = np.array([reference.split_is_eval(v, c, 0.5) for v, c in pairs])
    assert abs(foldin.mean() - 0.8) < 0.03
    # Independent of the (unsalted) eval hash: fold-in share is the same on both sides.
    assert abs(foldin[is_eval].mean() - foldin[~is_eval].mean()) < 0.05
    # And the same functions as the oracle's.
    assert held == [reference._unit_hash(f"holdout-visitor\x1f{v}") < 0.25 for v in visitors]


@pytest.mark.parametrize(
    "flags",
    [
        ["--holdout_visitors", "1"],
        ["--holdout_visitors", "-0.1"],
        ["--holdout_foldin_fraction", "0"],
        ["--holdout_foldin_fraction", "1"],
    ],
)
def test_bad_holdout_flags_are_refused(sample, tmp_path, flags):
    argv = ["--input", str(sample / "sessions.json.gz"), "--output_dir", str(tmp_path / "o")]
    with pytest.raises(cli.UsageError, match=flags[0].lstrip("-")):
        preprocess.run(argv + flags)


def test_a_process_loads_the_transform_model_once_for_all_its_dofns(preprocessed, tmp_path):
    """Every DoFn instance of a process (a thread each; Beam unpickles one per thread) uses the
    one transform model, loaded once per SavedModel directory, also when they start at once."""
    directory = str(tmp_path / "transform_fn")  # a directory no DoFn of this process has seen
    shutil.copytree(os.path.join(preprocessed, "transform_fn"), directory)
    known = read_vocabulary(preprocessed, features.ITEM_VOCAB)[0]
    batch = [("visitor-a", known, 30.0), ("visitor-b", "no-such-content", 10.0)]
    original = holdout._TransformBatch(FOLDIN)
    fns = [holdout._TransformBatch(FOLDIN), *(pickler.loads(pickler.dumps(original)) for _ in "ab")]
    with concurrent.futures.ThreadPoolExecutor(len(fns)) as pool:
        outputs = list(pool.map(lambda fn: list(fn.process(batch, directory)), fns))
    assert holdout.TRANSFORM_MODEL_LOADS[directory] == 1
    assert len({id(fn._transform(directory)) for fn in fns}) == 1
    assert outputs[0] == outputs[1] == outputs[2]
    assert [cell[0] for cell in outputs[0]] == ["visitor-a"]  # unknown content is dropped
