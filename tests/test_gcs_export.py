"""An export killed while it moves the SavedModel into its version directory on gs:// (the local
GCS emulator, tests/gcs_emulator.py), and the retry that redoes it.

On GCS a "directory" rename copies object by object, so the version directory exists from the
first object moved on (`trainer.serving.version_dir`). The exporting process is SIGKILLed after
three objects: what it leaves must name its owner (the marker) and not be loadable (no
saved_model.pb), and the next export to the same directory must replace it with a SavedModel that
answers exactly as a clean export does. TensorFlow's gs:// runs in subprocesses started inside
the emulator (it reads its GCS cache settings at import; see tests/test_gcs.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = ".written-by-ga-wals"
KILL_AFTER = 3  # objects moved before the kill: the marker and two more

# The fixture model of tests/test_export.py, exported with k=4 in every script.
_PRELUDE = """
    import json, os, signal, sys
    sys.path.insert(0, "tests")
    import numpy as np
    import tensorflow as tf
    from test_export import make_model, outputs
    from trainer.serving import export, version_dir
    base = "gs://{bucket}"
    model = make_model("uniform")
"""


def _run(code: str, bucket: str) -> subprocess.CompletedProcess:
    """Runs the prelude and `code` in a fresh interpreter with the emulator's environment."""
    script = textwrap.dedent(_PRELUDE) + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script.replace("{bucket}", bucket)],
        cwd=REPO,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _under(names: list[str], prefix: str) -> list[str]:
    return sorted(name[len(prefix) :] for name in names if name.startswith(prefix))


def test_an_export_killed_mid_move_on_gs_is_redone_by_the_next_one(gcs, bucket):
    killed = _run(
        f"""
        export.export_saved_model(model, base + "/clean/1", k=4)
        real_move, moved = version_dir._move_file, []

        def move(source, target):
            if len(moved) == {KILL_AFTER}:
                os.kill(os.getpid(), signal.SIGKILL)
            real_move(source, target)
            moved.append(target)

        version_dir._move_file = move
        export.export_saved_model(model, base + "/served/1", k=4)
        """,
        bucket,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    names = gcs.list_objects(bucket)
    clean = _under(names, "clean/1/")
    assert MARKER in clean and "saved_model.pb" in clean and "variables/variables.index" in clean
    left = _under(names, "served/1/")
    assert len(left) == KILL_AFTER and MARKER in left and set(left) < set(clean)
    assert "saved_model.pb" not in left
    staging = {name.split("/")[1] for name in names if name.startswith("served/.1.incomplete-")}
    assert len(staging) == 1  # the killed process's staging sibling, which TF Serving ignores

    retried = _run(
        """
        try:
            tf.saved_model.load(base + "/served/1")
            loadable = True
        except OSError:
            loadable = False
        tf.io.gfile.makedirs(base + "/other/1")
        with tf.io.gfile.GFile(base + "/other/1/saved_model.pb", "wb") as handle:
            handle.write(b"someone else's")
        try:
            export.export_saved_model(model, base + "/other/1", k=4, replace=True)
            refused = ""
        except FileExistsError as error:
            refused = str(error)
        export.export_saved_model(model, base + "/served/1", k=4)
        got = outputs(tf.saved_model.load(base + "/served/1"))
        want = outputs(tf.saved_model.load(base + "/clean/1"))
        print(json.dumps({
            "loadable_before_retry": loadable,
            "same": all(np.array_equal(a, b) for a, b in zip(got, want, strict=True)),
            "refused": refused,
        }))
        """,
        bucket,
    )
    assert retried.returncode == 0, retried.stderr[-3000:]
    out = json.loads(retried.stdout.strip().splitlines()[-1])
    assert out["loadable_before_retry"] is False
    assert out["same"] is True
    assert out["refused"].startswith(f"refusing to export to gs://{bucket}/other/1: ")
    assert "no .written-by-ga-wals" in out["refused"]
    names = gcs.list_objects(bucket)
    assert _under(names, "served/1/") == clean
    assert _under(names, "other/") == ["", "1/", "1/saved_model.pb"]  # kept, "folders" too
    # Nothing but the three version directories and the killed launch's staging directory
    # (and the "folder" objects of TensorFlow's makedirs, names ending in "/").
    top = {"/".join(name.split("/")[:2]) for name in names if not name.endswith("/")}
    assert top == {"clean/1", "other/1", "served/1", *(f"served/{s}" for s in staging)}


def test_a_copy_of_the_trainers_export_on_gs_answers_as_a_streamed_export(gcs, bucket):
    """The scheduled run's export stage on gs:// (`copy_from`): the train stage's export is
    copied object by object (server-side) into the version directory and published, the same
    objects and answers as a streamed export; with another k the model is streamed instead."""
    done = _run(
        """
        from trainer.serving import export_copy
        source = export.export_saved_model(model, base + "/train/export", k=4)
        clean = export.export_saved_model(model, base + "/clean/1", k=4)

        def must_not_stream(*args, **kwargs):
            raise AssertionError("streamed")

        real_write, export._write = export._write, must_not_stream
        copied = export.export_saved_model(model, base + "/served/1", k=4, copy_from=source)
        export._write = real_write
        other_k = export.export_saved_model(model, base + "/other/1", k=5, copy_from=source)
        got = outputs(tf.saved_model.load(copied))
        want = outputs(tf.saved_model.load(clean))
        print(json.dumps({
            "same": all(np.array_equal(a, b) for a, b in zip(got, want, strict=True)),
            "copied_from": version_dir.read_facts(copied).get(export_copy.COPIED_FROM),
            "other_k": [version_dir.read_facts(other_k).get(export_copy.COPIED_FROM),
                        outputs(tf.saved_model.load(other_k))[0].shape[1]],
        }))
        """,
        bucket,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {"same": True, "copied_from": f"gs://{bucket}/train/export", "other_k": [None, 5]}
    names = gcs.list_objects(bucket)
    clean = _under(names, "clean/1/")
    assert _under(names, "served/1/") == clean == _under(names, "train/export/")
    assert not [name for name in names if ".incomplete-" in name]  # no staging left
