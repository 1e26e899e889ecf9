"""common.staging: --overwrite replaces only our own outputs, on local disk and object stores.

The object-store tests run on `memobj://`, a Beam FileSystem with GCS's semantics (flat keys,
no directory rename, prefix listing; see tests/objectstore.py).
"""

from __future__ import annotations

import json
import os

import objectstore
import pytest
from apache_beam.io.filesystems import FileSystems

from common import staging
from pipeline import preprocess, synthetic
from trainer.local import dataset as data
from transforms import features

MARKER = "summary.json"


@pytest.fixture
def store():
    objectstore.STORE.clear()
    yield objectstore.STORE
    objectstore.STORE.clear()


def _write(path: str, text: str) -> None:
    if "://" not in path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with FileSystems.create(path) as handle:
        handle.write(text.encode("utf-8"))


def _read(path: str) -> str:
    with FileSystems.open(path) as handle:
        return handle.read().decode("utf-8")


def _publish(output_dir: str, files: dict[str, str], overwrite=False, marker=MARKER) -> None:
    """A run that writes `files` (relative name -> text), the marker last."""
    with staging.staged_output(output_dir, overwrite, marker) as out:
        for name, text in files.items():
            _write(f"{out}/{name}", text)


def _tree(directory) -> dict[str, str]:
    """{relative path: content, bytes as latin-1 text} of every file under a local directory."""
    tree = {}
    for root, _, names in os.walk(directory):
        for name in names:
            with open(os.path.join(root, name), "rb") as handle:
                tree[os.path.relpath(os.path.join(root, name), directory)] = handle.read().decode(
                    "latin-1"
                )
    return tree


OLD = {"train/part-0": "old rows", "train/part-1": "more old rows", MARKER: "{}"}
NEW = {"train/part-0": "new rows", "eval/part-0": "held out", MARKER: '{"new": 1}'}


# --- local directories ----------------------------------------------------------------------


def test_publish_writes_a_staging_marker_listing_the_files(tmp_path):
    out = str(tmp_path / "out")
    _publish(out, OLD)
    assert _tree(out).keys() == {*OLD, staging.STAGING_MARKER}
    content = json.loads((tmp_path / "out" / staging.STAGING_MARKER).read_text())
    assert content["completion_marker"] == MARKER
    assert sorted(content["files"]) == sorted(OLD)
    assert os.listdir(tmp_path) == ["out"]


def test_overwrite_replaces_our_output_and_leaves_no_siblings(tmp_path):
    out = str(tmp_path / "out")
    _publish(out, OLD)
    with pytest.raises(staging.OutputExistsError, match="--overwrite"):
        _publish(out, NEW)
    _publish(out, NEW, overwrite=True)
    tree = _tree(out)
    assert {name: tree[name] for name in NEW} == NEW
    assert tree.keys() == {*NEW, staging.STAGING_MARKER}
    assert os.listdir(tmp_path) == ["out"]


def test_overwrite_replaces_an_output_written_before_the_staging_marker(tmp_path):
    for name, text in OLD.items():
        _write(str(tmp_path / "out" / name), text)
    _publish(str(tmp_path / "out"), NEW, overwrite=True)
    assert _tree(tmp_path / "out").keys() == {*NEW, staging.STAGING_MARKER}
    assert os.listdir(tmp_path) == ["out"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_directory_of_other_files_is_refused_and_kept(tmp_path, overwrite):
    out = tmp_path / "d"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    for i in range(7):
        (out / f"file{i}.csv").write_text("x")
    with pytest.raises(staging.OutputExistsError) as raised:
        _publish(str(out), NEW, overwrite=overwrite)
    message = str(raised.value)
    assert str(out) in message and "not written by this project" in message
    assert "file0.csv" in message and "and 3 more" in message  # a few of the files, not all
    assert "Nothing was deleted" in message
    assert (out / "notes.txt").read_text() == "keep"
    assert len(os.listdir(out)) == 8
    assert os.listdir(tmp_path) == ["d"]


def test_a_plain_file_is_refused_and_kept(tmp_path):
    path = tmp_path / "model"
    path.write_text("keep")
    with pytest.raises(staging.OutputExistsError, match=f"{path}: it is a file"):
        _publish(str(path), NEW, overwrite=True)
    assert path.read_text() == "keep"
    assert os.listdir(tmp_path) == ["model"]


def test_our_output_with_a_file_added_by_hand_is_refused(tmp_path):
    out = str(tmp_path / "out")
    _publish(out, OLD)
    (tmp_path / "out" / "train" / "notes.txt").write_text("keep")
    with pytest.raises(staging.OutputExistsError, match="did not write: train/notes.txt"):
        _publish(out, NEW, overwrite=True)
    assert _tree(out)["train/notes.txt"] == "keep"
    assert _tree(out)["train/part-0"] == "old rows"


def test_another_kind_of_output_is_refused(tmp_path):
    """A model run (metrics.json) may not replace a dataset (summary.json), nor the reverse."""
    out = str(tmp_path / "out")
    _publish(out, OLD)
    with pytest.raises(staging.OutputExistsError, match="different kind of output"):
        _publish(out, {"metrics.json": "{}"}, overwrite=True, marker="metrics.json")
    assert _tree(out)["train/part-0"] == "old rows"


def test_an_empty_directory_is_used_without_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    _publish(str(tmp_path / "out"), NEW)
    assert _tree(tmp_path / "out").keys() == {*NEW, staging.STAGING_MARKER}


def test_a_failed_run_removes_only_its_own_staging_directory(tmp_path):
    out = str(tmp_path / "out")
    _publish(out, OLD)
    for other in ("out.incomplete-0000beef", "out.incomplete-replaced-0000beef"):  # not this run's
        (tmp_path / other).mkdir()
        (tmp_path / other / "x").write_text("keep")
    with pytest.raises(RuntimeError, match="boom"):
        with staging.staged_output(out, True, MARKER) as staged:
            _write(f"{staged}/train/part-0", "partial")
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == [
        "out",
        "out.incomplete-0000beef",
        "out.incomplete-replaced-0000beef",
    ]
    assert _tree(out)["train/part-0"] == "old rows"


def test_a_file_added_during_the_run_stops_the_publish_and_keeps_both(tmp_path):
    out = tmp_path / "out"
    _publish(str(out), OLD)
    with pytest.raises(staging.OutputExistsError, match="output is kept in .*out.incomplete-"):
        with staging.staged_output(str(out), True, MARKER) as staged:
            _write(f"{staged}/{MARKER}", "{}")
            (out / "notes.txt").write_text("keep")
    assert (out / "notes.txt").read_text() == "keep"
    assert _tree(out)["train/part-0"] == "old rows"
    kept = [name for name in os.listdir(tmp_path) if name.startswith("out.incomplete-")]
    assert len(kept) == 1 and os.listdir(tmp_path / kept[0])


# --- object stores (memobj://, GCS semantics) -------------------------------------------------


def test_object_store_publish_puts_the_staging_marker_first_and_the_marker_last(store):
    out = "memobj://bucket/runs/out"
    _publish(out, OLD)
    assert store.keys() == sorted(f"{out}/{name}" for name in [*OLD, staging.STAGING_MARKER])
    published = [path for op, path in store.log if op == "put" and path.startswith(out + "/")]
    assert published[0] == f"{out}/{staging.STAGING_MARKER}"
    assert published[-1] == f"{out}/{MARKER}"
    assert not store.keys(f"{out}.incomplete-")


def test_object_store_overwrite_deletes_the_old_marker_first(store):
    out = "memobj://bucket/runs/out"
    _publish(out, OLD)
    store.log.clear()
    _publish(out, NEW, overwrite=True)
    assert store.keys() == sorted(f"{out}/{name}" for name in [*NEW, staging.STAGING_MARKER])
    assert _read(f"{out}/train/part-0") == "new rows"
    at_output = [(op, path) for op, path in store.log if path.startswith(out + "/")]
    deletes = [path for op, path in at_output if op == "delete"]
    assert at_output[0] == ("delete", f"{out}/{MARKER}")  # before anything else changes
    assert deletes[-1] == f"{out}/{staging.STAGING_MARKER}"
    assert sorted(deletes) == sorted(f"{out}/{name}" for name in [*OLD, staging.STAGING_MARKER])
    assert at_output[-1] == ("put", f"{out}/{MARKER}")
    assert not store.keys(f"{out}.incomplete-")


def test_object_store_half_replaced_output_never_looks_finished(store):
    out = "memobj://bucket/runs/out"
    _publish(out, OLD)
    store.fail_when = lambda op, path: op == "put" and path == f"{out}/eval/part-0"
    with pytest.raises(Exception, match="injected failure"):
        _publish(out, NEW, overwrite=True)
    assert not FileSystems.exists(f"{out}/{MARKER}")
    with pytest.raises(data.DatasetError, match="not a finished preprocessing output"):
        data.load_dataset(out)
    # It is still recognisably ours, so the next --overwrite run replaces it.
    store.fail_when = None
    with pytest.raises(staging.OutputExistsError, match=f"unfinished: no {MARKER}"):
        _publish(out, NEW)
    _publish(out, NEW, overwrite=True)
    assert {key for key in store.keys() if key.startswith(out + "/")} == {
        f"{out}/{name}" for name in [*NEW, staging.STAGING_MARKER]
    }
    assert _read(f"{out}/{MARKER}") == NEW[MARKER]


def test_object_store_foreign_prefix_is_refused_and_nothing_deleted(store):
    out = "memobj://bucket/shared"
    _write(f"{out}/notes.txt", "keep")
    _write(f"{out}/reports/q1.csv", "keep")
    before = dict(store.objects)
    with pytest.raises(staging.OutputExistsError) as raised:
        _publish(out, NEW, overwrite=True)
    assert out in str(raised.value) and "notes.txt" in str(raised.value)
    assert store.objects == before
    assert not [op for op, _ in store.log if op == "delete"]


def test_object_store_plain_object_is_refused(store):
    _write("memobj://bucket/model", "keep")
    with pytest.raises(staging.OutputExistsError, match="it is a file"):
        _publish("memobj://bucket/model", NEW, overwrite=True)
    assert store.keys() == ["memobj://bucket/model"]


def test_object_store_failed_run_removes_its_staging_prefix(store):
    out = "memobj://bucket/runs/out"
    _write("memobj://bucket/runs/out.incomplete-0000beef/x", "not this run's")
    with pytest.raises(RuntimeError, match="boom"):
        with staging.staged_output(out, False, MARKER) as staged:
            _write(f"{staged}/train/part-0", "partial")
            raise RuntimeError("boom")
    assert store.keys() == ["memobj://bucket/runs/out.incomplete-0000beef/x"]


def test_object_store_finish_output_removes_the_scratch_prefix(store):
    """On GCS, deleting "{out}/tmp" (no slash) matches one missing object: nothing goes."""
    out = "memobj://bucket/run.incomplete-1234"
    _write(f"{out}/tmp/{preprocess.SCALE_STATS_FILE}", "{}")
    _write(f"{out}/tmp/tftransform_tmp/abc/saved_model.pb", "x")
    _write(f"{out}/tmp_notes.txt", "not scratch")
    _write(f"{out}/train/{features.ITEMS_FOR_USER}-00000-of-00001.tfrecord.gz", "rows")
    preprocess.finish_output(out, {"nusers": 1})
    assert store.keys() == [
        f"{out}/summary.json",
        f"{out}/tmp_notes.txt",
        f"{out}/train/{features.ITEMS_FOR_USER}-00000-of-00001.tfrecord.gz",
    ]
    assert json.loads(_read(f"{out}/{features.SUMMARY_FILE}")) == {"nusers": 1}


# --- a real dataset through the object-store publish path -------------------------------------


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("staging")
    sample = str(root / "sessions.json.gz")
    synthetic.write_sessions(sample, num_sessions=300, seed=9, num_items=60, num_topics=4)
    out = str(root / "preprocessed")
    preprocess.run(["--input", sample, "--output_dir", out, "--eval_fraction", "0.2"])
    return out


def _upload(local_dir: str, output_dir: str, overwrite: bool) -> None:
    """Publishes a dataset written locally as if the pipeline had written it on the store."""
    with staging.staged_output(output_dir, overwrite, features.SUMMARY_FILE) as out:
        names = sorted(_tree(local_dir))
        names.remove(features.SUMMARY_FILE)
        for name in [*names, features.SUMMARY_FILE]:
            if name == staging.STAGING_MARKER:
                continue
            with open(os.path.join(local_dir, name), "rb") as src:
                with FileSystems.create(f"{out}/{name}", compression_type="uncompressed") as dst:
                    dst.write(src.read())


def _download(output_dir: str, local_dir: str) -> None:
    for m in FileSystems.match([output_dir + "/**"])[0].metadata_list:
        path = os.path.join(local_dir, m.path[len(output_dir) + 1 :])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with FileSystems.open(m.path, compression_type="uncompressed") as src:
            with open(path, "wb") as dst:
                dst.write(src.read())


def test_a_real_dataset_survives_the_object_store_publish(store, dataset_dir, tmp_path):
    assert "tmp" not in os.listdir(dataset_dir)
    out = "memobj://bucket/datasets/ga"
    _upload(dataset_dir, out, overwrite=False)
    assert not store.keys(f"{out}/tmp/") and not store.keys(f"{out}.incomplete-")
    assert [p for op, p in store.log if op == "put"][-1] == f"{out}/{features.SUMMARY_FILE}"
    _upload(dataset_dir, out, overwrite=True)  # our own output: replaced
    copy = str(tmp_path / "copy")
    _download(out, copy)
    assert _tree(copy) == _tree(dataset_dir)
    original, published = data.load_dataset(dataset_dir), data.load_dataset(copy)
    assert (published.users, published.items) == (original.users, original.items)
    assert published.summary == original.summary
    assert published.train.nnz == original.train.nnz > 0


def test_trainer_may_not_replace_a_dataset(dataset_dir, tmp_path):
    from trainer import task

    before = _tree(dataset_dir)
    argv = ["--input_dir", dataset_dir, "--output_dir", dataset_dir, "--overwrite"]
    assert task.main(argv) == 2
    assert _tree(dataset_dir) == before
