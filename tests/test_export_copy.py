"""`export_saved_model(copy_from=...)`: an export of the same model already written (the
trainer's `export/`) is copied instead of streamed, and only when it would be the same SavedModel
(`trainer.serving.export_copy`); on the hand-built model of tests/test_export.py, whose streamed
export is checked against NumPy there. tests/test_run.py checks the scheduled run's export stage
end to end, tests/test_gcs_export.py the copy on gs://.
"""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from test_export import HISTORY, HISTORY_MS, assert_same_model, fold_in, make_model, outputs

from trainer.serving import export, export_copy, version_dir

K = 4


def _marker(path: str) -> dict:
    with open(os.path.join(path, version_dir.MARKER)) as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(model, the trainer-like export/ of it with k=K, a clean streamed export with k=K)."""
    base = tmp_path_factory.mktemp("copies")
    model = make_model("uniform")
    exported = export.export_saved_model(model, str(base / "train" / "export"), k=K)
    clean = export.export_saved_model(model, str(base / "clean" / "1"), k=K)
    return model, exported, clean


def _assert_same_fold_in_model(path: str, clean: str) -> None:
    """The fold-in-only model's `assert_same_model`: its one signature has no visitorId."""
    assert version_dir._files(path) == version_dir._files(clean)
    got, want = (fold_in(tf.saved_model.load(p), HISTORY, HISTORY_MS) for p in (path, clean))
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def _must_not_stream(*args, **kwargs):
    raise AssertionError("the model was streamed, not copied")


def test_a_copy_has_the_streamed_exports_files_and_answers_and_writes_no_bytes(
    source, tmp_path, monkeypatch
):
    model, exported, clean = source
    before = {name: os.stat(os.path.join(exported, name)) for name in version_dir._files(exported)}
    monkeypatch.setattr(export, "_write", _must_not_stream)
    path = export.export_saved_model(model, str(tmp_path / "1"), k=K, copy_from=exported + "/")
    assert os.listdir(tmp_path) == ["1"]  # the staging directory is gone
    assert_same_model(path, clean)  # the same files, the same answers from both signatures
    marker, streamed = _marker(path), _marker(clean)
    assert marker["export"] == {**streamed["export"], "copied_from": exported}
    assert sorted(marker["files"]) == sorted(streamed["files"])
    assert version_dir.read_facts(path)["copied_from"] == exported
    # On the local disk the files are hard links: the same bytes, none written again.
    for name in streamed["files"]:
        assert os.path.samefile(os.path.join(path, name), os.path.join(exported, name)), name
    # The source is left as it was, its marker included.
    after = {name: os.stat(os.path.join(exported, name)) for name in version_dir._files(exported)}
    assert after.keys() == before.keys()
    assert all(after[n].st_mtime_ns == before[n].st_mtime_ns for n in after)
    # A copy replaces a complete export of this project only when asked, as a streamed one does.
    with pytest.raises(FileExistsError):
        export.export_saved_model(model, path, k=K, copy_from=exported)
    assert export.export_saved_model(model, path, k=K, replace=True, copy_from=exported) == path
    assert_same_model(path, clean)


def test_where_files_cannot_be_linked_they_are_copied(source, tmp_path, monkeypatch):
    model, exported, clean = source

    def cannot_link(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link", src)

    monkeypatch.setattr(os, "link", cannot_link)
    monkeypatch.setattr(export, "_write", _must_not_stream)
    path = export.export_saved_model(model, str(tmp_path / "1"), k=K, copy_from=exported)
    assert_same_model(path, clean)
    assert _marker(path)["export"]["copied_from"] == exported
    for name in _marker(clean)["files"]:
        assert not os.path.samefile(os.path.join(path, name), os.path.join(exported, name))


def _older_format(path: str) -> None:
    """Rewrites the marker as a release before the `format` fact wrote it."""
    marker = _marker(path)
    del marker["export"]["format"]
    with open(os.path.join(path, version_dir.MARKER), "w") as handle:
        json.dump(marker, handle)


def _incomplete(path: str) -> None:
    os.remove(os.path.join(path, version_dir.SAVED_MODEL))


def _lacks_a_file(path: str) -> None:
    os.remove(os.path.join(path, "assets", "vocab_items.txt"))


def _foreign(path: str) -> None:
    with open(os.path.join(path, "notes.txt"), "w") as handle:
        handle.write("someone else's")


# case -> (the source's k, its serving model, what is done to it, the k and serving model asked)
FALLBACKS = {
    "other_k": (K, export.FULL, None, K + 1, export.FULL),
    "other_serving_model": (K, export.FULL, None, K, export.FOLD_IN),
    "fold_in_source_for_full": (K, export.FOLD_IN, None, K, export.FULL),
    "older_format": (K, export.FULL, _older_format, K, export.FULL),
    "incomplete": (K, export.FULL, _incomplete, K, export.FULL),
    "lacks_a_file": (K, export.FULL, _lacks_a_file, K, export.FULL),
    "foreign_files": (K, export.FULL, _foreign, K, export.FULL),
    "missing": (K, export.FULL, "remove", K, export.FULL),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_a_source_that_differs_is_not_copied_and_the_model_is_streamed(case, tmp_path, caplog):
    source_k, source_model, spoil, k, serving_model = FALLBACKS[case]
    model = make_model("uniform")
    source = str(tmp_path / "train" / "export")
    if spoil == "remove":
        source = str(tmp_path / "train" / "nothing")
    else:
        export.export_saved_model(model, source, k=source_k, serving_model=source_model)
        if spoil is not None:
            spoil(source)
    kept = version_dir._files(source)
    clean = export.export_saved_model(
        model, str(tmp_path / "clean" / "1"), k=k, serving_model=serving_model
    )
    with caplog.at_level("INFO", logger="trainer.serving.export"):
        path = export.export_saved_model(
            model,
            str(tmp_path / "serving" / "1"),
            k=k,
            serving_model=serving_model,
            copy_from=source,
        )
    assert f"not copying {source}" in caplog.text
    if serving_model == export.FULL:
        assert_same_model(path, clean)
    else:
        _assert_same_fold_in_model(path, clean)
    assert "copied_from" not in _marker(path)["export"]
    assert version_dir._files(source) == kept  # never touched
    if case == "other_k":
        assert np.asarray(outputs(tf.saved_model.load(path))[0]).shape == (7, k)


def test_why_not_names_the_facts_that_differ(source):
    _, exported, _ = source
    facts = {**_marker(exported)["export"], "k": K + 2}
    why = export_copy.why_not(exported, exported + "-elsewhere", facts)
    assert why == f"its export facts differ: k {K} (wanted {K + 2})"
    assert export_copy.why_not(exported, "gs://bucket/serving/1", facts).startswith(
        "it is on another filesystem"
    )
    assert export_copy.why_not(exported, exported + "-elsewhere", facts | {"k": K}) is None
