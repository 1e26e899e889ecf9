"""common.atomic: the one "temporary name, then move into place" for a file, and the one rule
that recognises every temporary name this project writes (files and staged directories).

Object-store cases run on `memobj://` (tests/objectstore.py: GCS's semantics, an object appears
when its upload is closed)."""

from __future__ import annotations

import os

import objectstore
import pytest
from apache_beam.io.filesystems import FileSystems

from common import atomic, staging


@pytest.fixture
def store():
    objectstore.STORE.clear()
    yield objectstore.STORE
    objectstore.STORE.clear()


def _read(path: str) -> bytes:
    with FileSystems.open(path) as handle:
        return handle.read()


def test_a_local_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "run.json")
    atomic.write_text_atomically(path, "old")
    atomic.write_bytes_atomically(path, b"new")
    assert open(path, "rb").read() == b"new"
    assert os.listdir(tmp_path) == ["run.json"]


def test_a_local_write_creates_the_missing_directories(tmp_path):
    path = str(tmp_path / "data" / "2026" / "sessions.json.gz")
    atomic.write_bytes_atomically(path, b"x")
    assert open(path, "rb").read() == b"x"
    assert os.listdir(tmp_path / "data" / "2026") == ["sessions.json.gz"]


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()])
def test_a_failed_local_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, error):
    path = str(tmp_path / "data.json.gz")
    atomic.write_text_atomically(path, "old")
    with pytest.raises(type(error)):
        with atomic.write_atomically(path) as handle:
            handle.write(b"half of the new")
            names = os.listdir(tmp_path)
            raise error
    # While it was written, the bytes went to one hidden temporary sibling.
    temporary = [name for name in names if name != "data.json.gz"]
    assert len(temporary) == 1 and temporary[0].startswith(".data.json.gz.incomplete-")
    assert open(path).read() == "old"
    assert os.listdir(tmp_path) == ["data.json.gz"]


def test_bytes_are_written_as_given_whatever_the_extension(tmp_path, store):
    """No compression is inferred from a name ending in .gz, locally or on an object store."""
    for path in (str(tmp_path / "a.gz"), "memobj://bucket/a.gz"):
        atomic.write_bytes_atomically(path, b"plain bytes")
        with atomic.write_atomically(path + ".2.gz") as handle:
            handle.write(b"streamed bytes")
        with FileSystems.open(path, compression_type="uncompressed") as handle:
            assert handle.read() == b"plain bytes"
        with FileSystems.open(path + ".2.gz", compression_type="uncompressed") as handle:
            assert handle.read() == b"streamed bytes"


def test_object_store_bytes_are_one_upload_without_a_temporary_object(store):
    path = "memobj://bucket/root/published"
    atomic.write_text_atomically(path, "runs/2026-11-21\n")
    store.log.clear()
    atomic.write_text_atomically(path, "runs/2026-11-22\n")
    assert store.log == [("put", path)]  # never a moment without the object, nor a temporary
    assert _read(path) == b"runs/2026-11-22\n"


def test_object_store_streamed_write_goes_through_a_temporary_object(store):
    path = "memobj://bucket/predictions.tsv"
    with atomic.write_atomically(path) as handle:
        handle.write(b"visitorId\tcontentIds\n")
    puts = [key for op, key in store.log if op == "put"]
    assert len(puts) == 2 and atomic.is_temporary(puts[0]) and puts[1] == path
    assert store.keys() == [path]
    with pytest.raises(RuntimeError):
        with atomic.write_atomically(path) as handle:
            handle.write(b"partial")
            raise RuntimeError("worker lost")
    assert store.keys() == [path] and _read(path) == b"visitorId\tcontentIds\n"


def test_one_rule_recognises_every_temporary_name(tmp_path):
    out = str(tmp_path / "train")
    names = [
        os.path.basename(atomic.temporary_sibling(f"{tmp_path}/run.json")),
        os.path.basename(atomic.temporary_name(out)),
        os.path.basename(atomic.temporary_name(out, "replaced")),
    ]
    assert names[0].startswith(".run.json.incomplete-")
    assert names[1].startswith("train.incomplete-") and "replaced" not in names[1]
    assert names[2].startswith("train.incomplete-replaced-")
    assert all(atomic.is_temporary(name) for name in names)
    for finished in ("train", "run.json", "gate.json", "predictions.tsv", "train.checkpoints"):
        assert not atomic.is_temporary(finished)


def test_staging_names_its_directories_by_the_same_rule(tmp_path, monkeypatch):
    """What a staged output works in, and an old output it sets aside, are temporary names."""
    out = str(tmp_path / "out")
    seen = []
    with staging.staged_output(out, marker="done") as staged:
        seen.append(os.path.basename(staged))
        open(os.path.join(staged, "done"), "w").close()
    real_rename = os.rename
    monkeypatch.setattr(
        os, "rename", lambda a, b: (seen.append(os.path.basename(b)), real_rename(a, b))
    )
    with staging.staged_output(out, overwrite=True, marker="done") as staged:
        seen.append(os.path.basename(staged))
        open(os.path.join(staged, "done"), "w").close()
    assert seen[0].startswith("out.incomplete-") and seen[1].startswith("out.incomplete-")
    assert seen[2].startswith("out.incomplete-replaced-")  # the old output, set aside
    assert all(atomic.is_temporary(name) for name in seen if name != "out")
    assert sorted(os.listdir(tmp_path)) == ["out"]
