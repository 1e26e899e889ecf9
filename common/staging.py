"""Write to a temporary location, then move into place: a crashed run never leaves output that
looks finished, and `--overwrite` never deletes what this project did not write.

    with staged_output(output_dir, overwrite=False, marker="summary.json") as staging:
        ...write everything under `staging`, `marker` last...
    # Now `output_dir` holds it all; on an exception, `staging` is deleted and `output_dir` is
    # untouched.

The rules:

- Before publishing, staging writes `STAGING_MARKER` (`.written-by-ga-wals`) into the output: a
  JSON object naming the completion marker (`marker`) and listing every file of the output.
- An existing `output_dir` is ours when it holds a `STAGING_MARKER` for the same `marker` and
  no file that marker does not list, or (outputs written before the staging marker existed)
  when it holds `marker` itself. Only ours is replaced, and only with `overwrite`. Anything
  else (a directory of other files, another kind of output, a plain file) raises
  `OutputExistsError` naming the path and a few of its files; nothing is deleted.
- Local directories move with one atomic rename: the old output is first renamed aside to
  `{output_dir}.incomplete-replaced-XXXXXXXX`, then removed file by file (only the files its
  staging marker lists).
- On object stores (gs://, s3://), where there are no directories to rename, the old output is
  deleted completion marker first and staging marker last, so a half-deleted output never looks
  finished but still looks ours. The new files are then renamed one by one: staging marker
  first, `marker` last, so the presence of `marker` means the output is complete.
- Staging works in `{output_dir}.incomplete-XXXXXXXX` and removes only that one directory.
- Both temporary names hold `common.atomic.TEMPORARY_INFIX`, like every temporary file this
  project writes, so `common.atomic.is_temporary` recognises what an interrupted run left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator

from apache_beam.io.filesystems import FileSystems

from common.atomic import is_local as _is_local
from common.atomic import temporary_name

logger = logging.getLogger(__name__)

STAGING_MARKER = ".written-by-ga-wals"
WRITTEN_BY = "ga-wals staging"
_FILES_NAMED = 5  # files an error message names before "and N more"


class OutputExistsError(FileExistsError):
    """output_dir holds something that may not be written to or replaced; nothing was deleted."""


@dataclasses.dataclass(frozen=True)
class _Existing:
    """What is at an output location now.

    Attributes:
        files: relative paths of every file under the location, sorted.
        is_file: the location itself is a file (an object, on object stores).
        owned: the files this project may delete there; None for all of them (an output
            written before the staging marker existed, recognised by its completion marker).
        problem: why the location may not be replaced, or None.
    """

    files: tuple[str, ...] = ()
    is_file: bool = False
    owned: frozenset[str] | None = None
    problem: str | None = None


def _list_files(directory: str) -> list[str]:
    """Relative paths of the files under a directory (or object-store prefix), sorted."""
    if _is_local(directory):
        if not os.path.isdir(directory):
            return []
        return sorted(
            os.path.relpath(os.path.join(root, name), directory)
            for root, _, names in os.walk(directory)
            for name in names
        )
    prefix = directory.rstrip("/") + "/"
    matched = FileSystems.match([prefix + "**"])[0].metadata_list
    # A key ending in "/" is a console-made "folder" placeholder, not a file.
    return sorted(m.path[len(prefix) :] for m in matched if not m.path.endswith("/"))


def child_names(directory: str) -> list[str]:
    """The names directly under a local directory or an object-store prefix, sorted: its files
    and sub-directories (on object stores, the first path component of every object under it,
    "folder" placeholders included)."""
    if _is_local(directory):
        return sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    prefix = directory.rstrip("/") + "/"
    matched = FileSystems.match([prefix + "**"])[0].metadata_list
    return sorted({m.path[len(prefix) :].split("/")[0] for m in matched} - {""})


def _few(names: Iterable[str]) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_FILES_NAMED])
    more = len(names) - _FILES_NAMED
    return f"{shown} and {more} more" if more > 0 else shown


def _read_staging_marker(output_dir: str) -> dict | None:
    try:
        with FileSystems.open(f"{output_dir}/{STAGING_MARKER}") as handle:
            content = json.loads(handle.read().decode("utf-8"))
    except Exception:  # unreadable or not JSON: not a marker this code wrote
        return None
    if not isinstance(content, dict) or content.get("written_by") != WRITTEN_BY:
        return None
    if not isinstance(content.get("files"), list):
        return None
    return content


def _inspect(output_dir: str, marker: str | None) -> _Existing:
    """Finds out what is at output_dir and whether this project may replace it."""
    if _is_local(output_dir):
        is_file = os.path.lexists(output_dir) and not os.path.isdir(output_dir)
    else:
        is_file = FileSystems.exists(output_dir)
    if is_file:
        return _Existing(is_file=True, problem="it is a file, not an output directory")
    files = tuple(_list_files(output_dir))
    if not files:
        return _Existing()
    if STAGING_MARKER in files:
        content = _read_staging_marker(output_dir)
        if content is None:
            return _Existing(files, problem=f"its {STAGING_MARKER} is not one this project wrote")
        if content.get("completion_marker") != marker:
            other = content.get("completion_marker")
            return _Existing(
                files, problem=f"it holds a different kind of output (one completed by {other})"
            )
        owned = frozenset(content["files"]) | {STAGING_MARKER}
        foreign = [name for name in files if name not in owned]
        if foreign:
            return _Existing(
                files, problem=f"it holds files this project did not write: {_few(foreign)}"
            )
        return _Existing(files, owned=owned)
    if marker is not None and marker in files:
        return _Existing(files)
    markers = f"{marker} or {STAGING_MARKER}" if marker else STAGING_MARKER
    return _Existing(
        files,
        problem=f"it was not written by this project (no {markers}); it holds {_few(files)}",
    )


def _check(output_dir: str, overwrite: bool, existing: _Existing, marker: str | None) -> None:
    if existing.problem is not None:
        verb = "replace" if overwrite else "write to"
        raise OutputExistsError(
            f"refusing to {verb} {output_dir}: {existing.problem}. Nothing was deleted; "
            "choose another output directory, or move those files away yourself"
        )
    if existing.files and not overwrite:
        state = "" if marker is None or marker in existing.files else f" (unfinished: no {marker})"
        raise OutputExistsError(
            f"output directory {output_dir} already holds an output of this project{state} "
            f"({_few(existing.files)}); pass --overwrite to replace it"
        )


def check_writable(output_dir: str, overwrite: bool, marker: str | None = None) -> None:
    """Checks that output_dir is missing, empty, or (with overwrite) an output of ours.

    Args:
        output_dir: the final location (local path or any Beam filesystem URL).
        overwrite: whether an existing output of ours may be replaced.
        marker: the completion marker of the output kind (e.g. "summary.json").

    Raises:
        OutputExistsError: naming output_dir and a few of the files found there.
    """
    output_dir = output_dir.rstrip("/") or output_dir
    _check(output_dir, overwrite, _inspect(output_dir, marker), marker)


def _write_staging_marker(staging: str, marker: str | None) -> None:
    content = {
        "written_by": WRITTEN_BY,
        "completion_marker": marker,
        "files": [name for name in _list_files(staging) if name != STAGING_MARKER],
    }
    with FileSystems.create(f"{staging}/{STAGING_MARKER}") as handle:
        handle.write(json.dumps(content, indent=1).encode("utf-8"))


def _deletion_order(files: Iterable[str], marker: str | None) -> list[list[str]]:
    """Batches to delete in order: the completion marker, the rest, the staging marker."""
    files = list(files)
    first = [name for name in files if name == marker]
    last = [name for name in files if name == STAGING_MARKER]
    middle = [name for name in files if name not in (marker, STAGING_MARKER)]
    return [batch for batch in (first, middle, last) if batch]


def _publishing_order(files: Iterable[str], marker: str | None) -> list[list[str]]:
    """Batches to publish in order: the staging marker, the rest, the completion marker."""
    return list(reversed(_deletion_order(files, marker)))


def _remove_local_output(root: str, existing: _Existing, marker: str | None) -> None:
    """Removes the files of an old output of ours, then the directories left empty."""
    owned = existing.owned if existing.owned is not None else existing.files
    for batch in _deletion_order(sorted(owned), marker):
        for name in batch:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(root, name))
    for directory, _, _ in sorted(os.walk(root), key=lambda entry: -len(entry[0])):
        with contextlib.suppress(OSError):
            os.rmdir(directory)
    if os.path.lexists(root):
        logger.warning("left %s: it holds files this project did not write", root)


def _publish_local(staging: str, output_dir: str, existing: _Existing, marker: str | None) -> None:
    old = None
    if existing.files:
        old = temporary_name(output_dir, "replaced")
        os.rename(output_dir, old)
    elif os.path.isdir(output_dir):
        os.rmdir(output_dir)  # empty; fails rather than deletes if a file appeared meanwhile
    try:
        os.rename(staging, output_dir)
    except BaseException:
        if old:
            os.rename(old, output_dir)
        raise
    if old:
        _remove_local_output(old, existing, marker)


def _publish_remote(staging: str, output_dir: str, existing: _Existing, marker: str | None) -> None:
    owned = existing.owned if existing.owned is not None else existing.files
    old = [name for name in existing.files if name in owned]
    for batch in _deletion_order(old, marker):
        FileSystems.delete([f"{output_dir}/{name}" for name in batch])
    for batch in _publishing_order(_list_files(staging), marker):
        FileSystems.rename(
            [f"{staging}/{name}" for name in batch], [f"{output_dir}/{name}" for name in batch]
        )
    _delete(staging)


def delete_tree(path: str) -> None:
    """Deletes a local directory, or every object under the prefix `path`/ on object stores.

    Beam's `FileSystems.delete` cannot do both with one spelling: on GCS, "dir" (no slash) names
    one object and deletes nothing, while locally "dir/" deletes only the files directly in it.
    A missing path is not an error.
    """
    path = path.rstrip("/")
    if _is_local(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
    elif FileSystems.match([path + "/**"])[0].metadata_list:
        # Every object under the prefix, "folder" placeholders ("dir/", which TensorFlow's
        # directory writes leave on GCS) included: "dir/" deletes them all.
        FileSystems.delete([path + "/"])
    elif FileSystems.exists(path):  # an empty directory, on filesystems that have them
        FileSystems.delete([path])


def _delete(path: str) -> None:
    """Removes a staging directory this module created, logging rather than raising."""
    try:
        delete_tree(path)
    except Exception:
        logger.warning("could not remove %s", path, exc_info=True)


@contextlib.contextmanager
def staged_output(
    output_dir: str, overwrite: bool = False, marker: str | None = None
) -> Iterator[str]:
    """Yields a fresh staging directory next to output_dir; publishes it on success.

    Args:
        output_dir: the final location (local path or any Beam filesystem URL).
        overwrite: replace an existing output of ours (see the module docstring).
        marker: the completion marker, a file name relative to the directory that the caller
            writes last (e.g. "summary.json"); it is published last, and it names the kind of
            output that `overwrite` may replace.

    Raises:
        OutputExistsError: output_dir may not be written to, either before the run starts or
            (if something changed it meanwhile) at publishing; then the run's output is kept
            in its staging directory, which the message names.
    """
    output_dir = output_dir.rstrip("/") or output_dir
    check_writable(output_dir, overwrite, marker)
    staging = temporary_name(output_dir)
    if _is_local(staging):
        os.makedirs(staging)
    try:
        yield staging
        _write_staging_marker(staging, marker)
    except BaseException:
        logger.error("run failed; removing its partial output %s", staging)
        _delete(staging)
        raise
    existing = _inspect(output_dir, marker)
    try:
        _check(output_dir, overwrite, existing, marker)
    except OutputExistsError as error:
        raise OutputExistsError(f"{error} (this run's output is kept in {staging})") from None
    if _is_local(output_dir):
        _publish_local(staging, output_dir, existing, marker)
    else:
        _publish_remote(staging, output_dir, existing, marker)
    logger.info("wrote %s", output_dir)
