"""Every ID that preprocessing accepts survives the whole round trip byte for byte.

A small CSV whose visitor and content IDs hold each character that `str.splitlines()` treats as
a line break (but the '\\n'-separated vocabulary files do not), plus commas, tabs, quotes,
backslashes and non-ASCII, goes through the real entry points: `pipeline.preprocess` ->
`trainer.task` -> `trainer.batch_predict` (TSV and JSONL) -> `trainer.serving.model.load` -> the
exported SavedModel. Every ID must come back exactly as it went in.
"""

from __future__ import annotations

import csv
import itertools
import json
import os

import pytest
import tensorflow as tf
from conftest import read_cells

from pipeline import preprocess, records
from trainer import batch_predict, show, task
from trainer.local import dataset as data
from trainer.serving import model as model_lib
from trainer.serving import predictions
from transforms import features

# Line breaks to str.splitlines() but not to a '\n'-separated file, then the CSV and TSV
# specials and some non-ASCII. Every one sits inside an ID (CSV fields are stripped of
# surrounding whitespace, and some of these count as whitespace).
SEPARATORS = ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"]
SPECIALS = [",", "\t", '"', "'", "\\", '","', "é", "中文", "😀"]
MARKS = SEPARATORS + SPECIALS
VISITORS = [f"v{n}{mark}x" for n, mark in enumerate(MARKS)] + ["plain-visitor"]
CONTENTS = [f"c{n}{mark}y" for n, mark in enumerate(MARKS)] + ["plain-content"]
K = 3


def interactions() -> list[tuple[str, str, float]]:
    """Each visitor reads 5 of the contents, so every content is read and unread by someone."""
    rows = []
    for u, visitor in enumerate(VISITORS):
        for step in range(5):
            content = CONTENTS[(u * 3 + step * 4) % len(CONTENTS)]
            rows.append((visitor, content, 1000.0 * (1 + (u + step) % 7)))
    return rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("ids")
    events = root / "events.csv"
    with open(events, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["visitorId", "contentId", "session_duration"])
        writer.writerows(interactions())
    preprocessed = str(root / "preprocessed")
    preprocess.run(
        [
            "--input",
            str(events),
            "--input_format",
            "csv",
            "--eval_fraction",
            "0",
            "--output_dir",
            preprocessed,
        ]
    )
    model_dir = str(root / "model")
    task.run(
        [
            "--input_dir",
            preprocessed,
            "--output_dir",
            model_dir,
            "--num_iters",
            "2",
            "--latent_factors",
            "4",
            "--eval_every",
            "0",
            "--export_k",
            str(K),
            "--no_progress",
        ]
    )
    return preprocessed, model_dir


def test_the_fixture_ids_are_accepted_by_the_parser():
    for visitor, content, value in interactions():
        line = (
            f'"{visitor.replace(chr(34), chr(34) * 2)}","{content.replace(chr(34), chr(34) * 2)}"'
        )
        assert records.csv_event(f"{line},{value}") == [(visitor, content, value)]


def test_space_separated_movielens_splits_on_spaces_only():
    assert records.movielens_event("u\x1cx  i\u2028y 4 7") == [("u\x1cx", "i\u2028y", (7.0, 4.0))]
    assert records.movielens_event("u\x0bx i 4 7") == [("u\x0bx", "i", (7.0, 4.0))]


def test_ids_with_line_breaks_are_rejected_with_their_reason():
    session = {"fullVisitorId": "a\nb", "visitId": 1, "hits": [{"type": "PAGE", "time": 0}]}
    for parse in (
        lambda: records.csv_event('"a\rb",c,1'),
        lambda: records.csv_event('a,"c\nd",1'),
        lambda: records.movielens_event("a\rb::c::5"),
        lambda: records.events_from_session(session, records.SessionConfig()),
    ):
        with pytest.raises(records.Rejected, match="bad_id:line_break"):
            parse()


def test_vocabularies_hold_every_id(trained):
    preprocessed, _ = trained
    dataset = data.load_dataset(preprocessed)
    assert sorted(dataset.users) == sorted(VISITORS)
    assert sorted(dataset.items) == sorted(CONTENTS)
    cells = read_cells(preprocessed, features.TRAIN_DIR)
    assert set(cells) == {(v, c) for v, c, _ in interactions()}


def expected_recommendations(model_dir: str) -> dict[str, list[str]]:
    model = model_lib.load(model_dir)
    assert sorted(model.users) == sorted(VISITORS)
    assert sorted(model.items) == sorted(CONTENTS)
    recs = model.recommend(VISITORS, k=K)
    assert all(rec.known for rec in recs)
    seen = {(v, c) for v, c, _ in interactions()}
    for rec in recs:
        assert len(rec.content_ids) == K
        assert set(rec.content_ids) <= set(CONTENTS)
        assert not {(rec.visitor_id, c) for c in rec.content_ids} & seen
    return {rec.visitor_id: rec.content_ids for rec in recs}


@pytest.mark.parametrize("output_format", ["tsv", "jsonl"])
def test_batch_predictions_give_back_every_id(trained, tmp_path, output_format):
    _, model_dir = trained
    expected = expected_recommendations(model_dir)
    out = str(tmp_path / f"recs.{output_format}")
    argv = ["--model_dir", model_dir, "--output", out, "--k", str(K), "--no_progress"]
    assert batch_predict.run([*argv, "--format", output_format]) == len(VISITORS)
    rows = list(predictions.read_predictions(out))
    assert {row.key: row.ranked for row in rows} == expected
    assert len(rows) == len(VISITORS) and not any(row.targeting for row in rows)

    targets = str(tmp_path / f"targets.{output_format}")
    batch_predict.run(["--model_dir", model_dir, "--output", targets, "--k", "2", "--no_progress",
                       "--format", output_format, "--targeting"])  # fmt: skip
    rows = list(predictions.read_predictions(targets))
    assert sorted(row.key for row in rows) == sorted(CONTENTS)
    assert all(row.targeting and set(row.ranked) <= set(VISITORS) for row in rows)
    assert {v for row in rows for v in row.ranked} & set(VISITORS[:-1])


def test_jsonl_lines_split_on_newline_only(trained, tmp_path):
    _, model_dir = trained
    out = tmp_path / "recs.jsonl"
    batch_predict.run(["--model_dir", model_dir, "--output", str(out), "--no_progress",
                       "--format", "jsonl", "--k", str(K)])  # fmt: skip
    with open(out, encoding="utf-8") as handle:  # Text mode splits on '\n' only.
        records_ = [json.loads(line) for line in handle]
    assert sorted(r["visitorId"] for r in records_) == sorted(VISITORS)


def test_savedmodel_serves_every_id(trained):
    _, model_dir = trained
    expected = expected_recommendations(model_dir)
    loaded = tf.saved_model.load(os.path.join(model_dir, "export"))
    visitors = VISITORS + ["v0x"]  # The last one is unknown: \u2028 is not a separator to drop.
    served = loaded.signatures["serving_default"](visitorId=tf.constant(visitors))
    known = served["known"].numpy().tolist()
    assert known == [True] * len(VISITORS) + [False]
    for row, visitor in enumerate(VISITORS):
        ids = [c.decode("utf-8") for c in served["contentIds"][row].numpy()]
        assert ids == expected[visitor]

    model = model_lib.load(model_dir)
    history = CONTENTS[:4]
    folded = loaded.signatures["fold_in"](
        contentIds=tf.constant(history), durations=tf.constant([2000.0] * len(history))
    )
    ids = [c.decode("utf-8") for c in folded["contentIds"].numpy()]
    assert ids == model.recommend_for_history(history, [2000.0] * len(history), k=K).content_ids
    assert set(ids) <= set(CONTENTS) - set(history)
    similar = model.similar_items(CONTENTS, k=2)
    assert all(set(c for c, _ in row) <= set(CONTENTS) for row in similar)


def pairs() -> set[tuple[str, str]]:
    return {(v, c) for v, c, _ in interactions()}


def durations() -> dict[tuple[str, str], float]:
    return {(v, c): duration for v, c, duration in interactions()}


def run_show(capsys, *argv: str) -> tuple[int, str, str]:
    status = show.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("output_format", ["tsv", "jsonl"])
def test_show_a_targeting_file(trained, tmp_path, capsys, output_format):
    _, model_dir = trained
    targets = str(tmp_path / f"targets.{output_format}")
    batch_predict.run(["--model_dir", model_dir, "--output", targets, "--k", "2", "--no_progress",
                       "--format", output_format, "--targeting"])  # fmt: skip
    status, out, _ = run_show(capsys, model_dir, "--predictions", targets, "--visitors", "3")
    assert status == 0
    model = model_lib.load(model_dir)
    assert "targeting for 3 contents" in out
    for row in itertools.islice(predictions.read_predictions(targets), 3):
        # Who read it most first (their longest reads; ties in the model's visitor order).
        readers = sorted(
            (v for v in model.users if (v, row.key) in pairs()),
            key=lambda v: (-durations()[v, row.key], model.users.index(v)),
        )
        assert f"  {row.key}\n    read by:     {', '.join(readers)}\n" in out
        assert f"    recommended: {', '.join(row.ranked)}\n" in out
    assert "SavedModel serving_default" in out


def test_show_visitors_known_and_unknown(trained, tmp_path, capsys):
    _, model_dir = trained
    recs = tmp_path / "recs.tsv"
    with open(recs, "w", encoding="utf-8") as handle:  # As another model's run could give.
        handle.write(predictions.tsv_line(["visitorId", "contentIds"]))
        handle.write(predictions.tsv_line(["someone-new", json.dumps(CONTENTS[:2])]))
        handle.write(predictions.tsv_line([VISITORS[0], json.dumps(CONTENTS[5:7])]))
    status, out, _ = run_show(capsys, model_dir, "--predictions", str(recs))
    assert status == 0
    assert "recommendations for 2 visitors" in out
    assert "  someone-new\n    seen:        (not in this model)\n" in out
    # What the visitor read most first: their longest reads (all of different lengths).
    seen = sorted(
        (c for c in model_lib.load(model_dir).items if (VISITORS[0], c) in pairs()),
        key=lambda c: -durations()[VISITORS[0], c],
    )
    assert f"  {VISITORS[0]}\n    seen:        {', '.join(seen)}\n" in out
    assert f"    recommended: {', '.join(CONTENTS[5:7])}\n" in out


def test_show_refuses_a_file_that_is_not_predictions(trained, tmp_path, capsys):
    _, model_dir = trained
    old = tmp_path / "old.tsv"
    old.write_text("v1\tc1,c2\n", encoding="utf-8")
    status, _, err = run_show(capsys, model_dir, "--predictions", str(old))
    assert status == 2 and "not a batch-prediction TSV" in err
    status, _, err = run_show(capsys, str(tmp_path / "missing"))
    assert status == 2 and "no finished trained model" in err
