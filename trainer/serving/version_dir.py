"""A SavedModel version directory that is never half there: `check` before the export, then
`write_marker` and `publish` once the SavedModel is complete in its staging directory.

    existing = version_dir.check("gs://b/serving/20261122", replace=False)  # refuses early
    tf.saved_model.save(module, staging)                                    # a hidden sibling
    version_dir.write_marker(staging, {"k": 10})
    version_dir.publish(staging, "gs://b/serving/20261122")

How TensorFlow Serving finds a version (tensorflow/serving,
tensorflow_serving/sources/storage_path/file_system_storage_path_source.cc): its poller lists the
children of the model's base path (on GCS, where listing returns every object below it, names are
cut at the first "/") and aspires every child whose whole name parses as an integer
(`ParseVersionNumber`, `strings::safe_strto64`); it never looks inside. So a version directory is
seen as soon as its first file (object) exists, and the hidden staging sibling
`.<version>.incomplete-XXXXXXXX` (`common.atomic.temporary_sibling`) never is. What keeps a
version from loading is `saved_model.pb`: loading reads it first (tensorflow/cc/saved_model/
reader.cc, `ReadSavedModel`: NotFound "Could not find SavedModel .pb or .pbtxt" without it),
before the variables and assets, and TF Serving retries a failed load (tensorflow_serving/
model_servers/main.cc: `--max_num_load_retries`, default 5, `--load_retry_interval_micros`,
default 60 s). The rules here:

- Ownership: the staging directory gets the project's ownership marker, `common.staging`'s
  `STAGING_MARKER` (`.written-by-ga-wals`) in that module's format, a JSON object
  `{"written_by": "ga-wals staging", "completion_marker": "saved_model.pb", "files": [every
  other file, relative], "export": {facts}}`.
- Completion: `saved_model.pb`, for TF Serving and for this module alike.
- Publishing on the local disk: one `os.rename` of the whole directory (atomic on POSIX).
- Publishing elsewhere (gs://, where renaming a "directory" copies object by object): file by
  file, the marker first and `saved_model.pb` last, so the version directory is loadable only
  when every other file is in it, and whatever part of it exists names its owner.
- An exception while moving removes the files already moved (best effort; `saved_model.pb` is
  never among them), so the version disappears again rather than staying half there.
- Retry: what a killed move leaves (the marker, no `saved_model.pb`, only files the marker
  lists) is an unfinished export of this project; the next export to the same directory
  removes it and publishes its own. An interrupted export never blocks a retry.
- Replacing: a complete export of this project (marker and `saved_model.pb`) is replaced only
  with `replace=True`, once the new SavedModel is complete in staging. Removal goes
  `saved_model.pb` first and the marker last, so a half-removed export is again an unfinished
  export of this project, never a loadable one.
- Anything else (files but no marker, a marker this project did not write, files the marker
  does not list, a plain file) raises `common.staging.OutputExistsError` naming the path and a
  few of its files; nothing is deleted. An empty directory (or GCS "folder" placeholders alone)
  holds nothing of anyone's: it is removed and published into.

Two exports to the same version directory at the same time are not supported (the scheduled
run holds its date's lock). A killed export also leaves its staging sibling; the scheduled run
removes those (`pipeline.scheduled.stages.Run.remove_leftovers`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterable

import tensorflow as tf

from common import atomic, staging
from common.staging import OutputExistsError

logger = logging.getLogger(__name__)

SAVED_MODEL = "saved_model.pb"
MARKER = staging.STAGING_MARKER
# Object stores: a "directory" is a name prefix, nothing to create before writing under it.
_OBJECT_STORES = ("gs://", "s3://")
_FILES_NAMED = 5  # files an error message names before "and N more"


@dataclasses.dataclass(frozen=True)
class Existing:
    """What is at a version directory now.

    Attributes:
        files: relative paths ("variables/variables.index") of every file there, sorted.
        complete: it is a complete export of this project (the marker and saved_model.pb).
        problem: why it may not be written to or removed, or None.
    """

    files: tuple[str, ...] = ()
    complete: bool = False
    problem: str | None = None


def _files(directory: str) -> list[str]:
    """Relative paths of the files under a directory (local or any tf.io.gfile filesystem)."""
    if not tf.io.gfile.isdir(directory):
        return []
    found = []
    for root, _, names in tf.io.gfile.walk(directory):
        relative = root[len(directory) :].strip("/")
        found += [f"{relative}/{name}" if relative else name for name in names]
    return sorted(found)


def _few(names: Iterable[str]) -> str:
    names = sorted(names)
    more = len(names) - _FILES_NAMED
    shown = ", ".join(names[:_FILES_NAMED])
    return f"{shown} and {more} more" if more > 0 else shown


def read_marker(directory: str) -> dict | None:
    """The marker's content if this module wrote it (a dict with "files", the relative paths of
    the other files, and "export", the facts), else None."""
    try:
        with tf.io.gfile.GFile(f"{directory}/{MARKER}", "rb") as handle:
            content = json.loads(handle.read().decode("utf-8"))
    except Exception:  # unreadable or not JSON: not a marker this module wrote
        return None
    if not isinstance(content, dict) or content.get("written_by") != staging.WRITTEN_BY:
        return None
    if content.get("completion_marker") != SAVED_MODEL or not isinstance(
        content.get("files"), list
    ):
        return None
    return content


def inspect(export_dir: str) -> Existing:
    """Finds out what is at export_dir and whether this project wrote it."""
    if tf.io.gfile.exists(export_dir) and not tf.io.gfile.isdir(export_dir):
        return Existing(problem="it is a file, not a SavedModel directory")
    files = tuple(_files(export_dir))
    if not files:
        return Existing()
    if MARKER not in files:
        return Existing(
            files, problem=f"this project's export did not write it (no {MARKER}): {_few(files)}"
        )
    content = read_marker(export_dir)
    if content is None:
        return Existing(files, problem=f"its {MARKER} is not one this project's export wrote")
    listed = set(content["files"]) | {MARKER}
    foreign = [name for name in files if name not in listed]
    if foreign:
        return Existing(
            files, problem=f"it holds files this project did not write: {_few(foreign)}"
        )
    return Existing(files, complete=SAVED_MODEL in files)


def read_facts(export_dir: str) -> dict | None:
    """The "export" facts (`write_marker`'s `facts`) of the marker at export_dir if this project
    wrote it, else None: one read of the marker; `inspect` checks the files."""
    content = read_marker(export_dir)
    facts = content.get("export") if content is not None else None
    return facts if isinstance(facts, dict) else None


def check(export_dir: str, replace: bool = False) -> Existing:
    """Checks that export_dir may be published to; returns what is there.

    Args:
        export_dir: the version directory.
        replace: whether a complete export of this project there may be replaced.

    Raises:
        OutputExistsError: (a FileExistsError) export_dir holds something this project did not
            write, or a complete export and not `replace`. Nothing is deleted.
    """
    existing = inspect(export_dir)
    if existing.problem is not None:
        raise OutputExistsError(
            f"refusing to export to {export_dir}: {existing.problem}. Nothing was deleted; "
            "choose another version directory, or move those files away yourself"
        )
    if existing.complete and not replace:
        raise OutputExistsError(
            f"{export_dir} already holds a complete export; export to a new version directory"
        )
    return existing


def write_marker(staging_dir: str, facts: dict) -> None:
    """Writes the ownership marker into a complete staging directory, listing its files."""
    content = {
        "written_by": staging.WRITTEN_BY,
        "completion_marker": SAVED_MODEL,
        "files": [name for name in _files(staging_dir) if name != MARKER],
        "export": facts,
    }
    with tf.io.gfile.GFile(f"{staging_dir}/{MARKER}", "wb") as handle:
        handle.write(json.dumps(content, indent=1).encode("utf-8"))


def _publishing_order(files: Iterable[str]) -> list[str]:
    """The marker, every other file (sorted), saved_model.pb; removal goes the other way."""
    files = set(files)
    head = [MARKER] if MARKER in files else []
    tail = [SAVED_MODEL] if SAVED_MODEL in files else []
    return head + sorted(files - {MARKER, SAVED_MODEL}) + tail


def _moves_atomically(path: str) -> bool:
    """Whether a whole directory at `path` moves with one atomic rename (the local disk)."""
    return atomic.is_local(path)


def _move_file(source: str, target: str) -> None:
    """Moves one file (on GCS: a server-side copy, then the source's deletion)."""
    tf.io.gfile.rename(source, target, overwrite=True)


def _delete_file(path: str) -> None:
    """Deletes one file (object)."""
    tf.io.gfile.remove(path)


def remove(export_dir: str, files: Iterable[str]) -> None:
    """Removes these files of an export of this project: saved_model.pb first, the marker last,
    then the directories (or GCS placeholders) left empty. Keeps anything else, with a warning.
    """
    for name in reversed(_publishing_order(files)):
        with contextlib.suppress(tf.errors.NotFoundError):
            _delete_file(f"{export_dir}/{name}")
    left = _files(export_dir)
    if left:
        logger.warning("left %s: it holds files this project did not write: %s", export_dir, left)
    elif tf.io.gfile.exists(export_dir):
        tf.io.gfile.rmtree(export_dir)  # only empty directories are left


def publish(staging_dir: str, export_dir: str, replace: bool = False) -> None:
    """Moves a complete staging directory (with its marker) into export_dir, by the rules of
    the module docstring.

    Args:
        staging_dir: the SavedModel, with `write_marker`'s marker.
        export_dir: the version directory.
        replace: whether a complete export of this project there may be replaced.

    Raises:
        OutputExistsError: as `check` (export_dir may have changed since the first check).
        Whatever a move raises; the files already moved are then removed (best effort).
    """
    existing = check(export_dir, replace)
    if existing.files:
        state = "complete" if existing.complete else "interrupted (no saved_model.pb)"
        logger.warning("removing %s, an export of this project: %s", export_dir, state)
    if existing.files or tf.io.gfile.isdir(export_dir):
        remove(export_dir, existing.files)  # with no files: empty directories only
    if _moves_atomically(export_dir):
        os.rename(staging_dir, export_dir)  # atomic on POSIX
        return
    moved: list[str] = []
    made: set[str] = set()
    try:
        for name in _publishing_order(_files(staging_dir)):
            parent = os.path.dirname(f"{export_dir}/{name}")
            if not export_dir.startswith(_OBJECT_STORES) and parent not in made:
                tf.io.gfile.makedirs(parent)
                made.add(parent)
            _move_file(f"{staging_dir}/{name}", f"{export_dir}/{name}")
            moved.append(name)
    except BaseException:
        logger.error(
            "moving %s to %s failed; removing the %d files moved",
            staging_dir,
            export_dir,
            len(moved),
        )
        try:
            remove(export_dir, moved)
        except Exception:
            logger.warning(
                "could not remove %s; the next export there will", export_dir, exc_info=True
            )
        raise
