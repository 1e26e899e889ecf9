"""The state of scheduled runs: each date's run.json, its lock, and the published pointer.

Layout under a root directory (local, or gs:// for Dataflow runs; `check_root`):

    ROOT/published              "runs/2026-11-22\\n": the run whose model is live (`publish`)
    ROOT/.publish.lock          held while a launch compares against and replaces `published`
    ROOT/runs/DATE/run.json     the run's record (below), rewritten atomically after each step
    ROOT/runs/DATE/.lock        held while a launch works on DATE (`date_lock`)

run.json:

    {"date": "2026-11-22",
     "status": "running" | "published" | "rejected" | "failed" | "passed" | "pending",
     "started": ISO time, "finished": ISO time | null, "attempts": int, "argv": [...],
     "input": [patterns], "error": str | null,
     "stages": {NAME: {"status": "running" | "done" | "failed", "started": ISO,
                       "finished": ISO, "seconds": float, ...stage facts...}},
     "gate": {"decision": "pass" | "reject", "reasons": [...], ...}}

A stage is complete only when run.json says "done" *and* its output exists (a directory's
completion marker); anything else is redone. Since run.json is replaced atomically and every
output is staged (written elsewhere, moved into place when complete), neither a SIGKILL nor a
full disk can leave a run that looks complete: the worst case is a stage marked "running",
which the next launch redoes.

run.json is written with `common.atomic.write_text_atomically`: locally a temporary sibling,
fsynced and renamed into place; on gs:// a single upload, which is atomic (visible only when
complete).

Locks (`date_lock`, `publish_lock`), by the root's scheme:
- local: a file created with O_CREAT | O_EXCL (`pipeline.locks.file_lock`); stale when its
  pid is gone on this host.
- gs://: an object created only if absent (if_generation_match=0), naming its owner, renewed by
  a heartbeat, stale once unrenewed for its lease (`--lock_lease_seconds`) or when its pid is
  gone on this host; a stale one is taken over by a replace conditioned on its generation
  (`pipeline.object_locks`). A holder whose lock was taken over learns it at its next renewal;
  the held lock's `check()` then raises LockLostError, and the run calls it before each write of
  its run.json and before replacing `published`.

The pointer (`read_published`, then `publish`) is a compare-and-swap: a launch reads it with
its version, decides (the newer-date rule, the gate), and replaces it only if it still has that
version, else `PointerMovedError` (the run then reads it again and decides again). On gs:// the
version is the object's generation (0: none) and the replace one upload with
if_generation_match; locally the version is the text read, compared again under the publish
lock, and the file is replaced atomically (a temporary sibling, then `os.replace`).

Other schemes (s3://, hdfs://, ...) have no conditional write here: `check_root` refuses them,
before anything runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Iterator

from apache_beam.io.filesystems import FileSystems

from common import cli, object_store
from common.atomic import is_local, write_text_atomically
from pipeline import locks, object_locks

logger = logging.getLogger(__name__)

RUNS_DIR = "runs"
RUN_FILE = "run.json"
LOCK_FILE = ".lock"
PUBLISH_LOCK_FILE = ".publish.lock"
PUBLISHED_FILE = "published"
SCHEMES = ("a local directory", "gs://")  # the --root schemes `check_root` accepts

RUNNING, DONE, FAILED = "running", "done", "failed"
PUBLISHED, REJECTED = "published", "rejected"
PASSED = "passed"  # passed the gate, not published: a newer date is
PENDING = "pending"  # the stages asked for (--stages) are done, later ones are not

LockedError = locks.LockedError  # another live launch holds the lock
LockLostError = locks.LockLostError  # this launch's gs:// lock was taken over
now = locks.now  # the current UTC time, ISO 8601 to the second


class PointerMovedError(RuntimeError):
    """`published` is no longer the version the launch read and decided on."""


@dataclasses.dataclass(frozen=True)
class Pointer:
    """`published` as read: its text and the version a replacement is conditioned on.

    Attributes:
        text: "runs/DATE", or None when nothing is published.
        version: gs://: the object's generation (0: no object); local: the file's text as read
            (None: no file).
    """

    text: str | None
    version: int | str | None

    @property
    def date(self) -> str | None:
        return self.text.split("/", 1)[1] if self.text and "/" in self.text else None


def check_root(root: str) -> None:
    """Refuses a --root whose scheme has no conditional writes here (the module doc).

    Raises:
        cli.UsageError: `root` is neither local nor gs://.
    """
    if not is_local(root) and not object_store.has_preconditions(root):
        scheme = root.split("://", 1)[0]
        raise cli.UsageError(
            f"--root {root}: scheduled runs need {' or '.join(SCHEMES)}, whose locks and "
            f"`published` pointer are created and replaced with preconditions; {scheme}:// has "
            "none here"
        )


def run_dir(root: str, date: str) -> str:
    return f"{root.rstrip('/')}/{RUNS_DIR}/{date}"


def read_run(root: str, date: str) -> dict | None:
    """The date's run.json, or None when there is none (or it is unreadable)."""
    text = read_text(f"{run_dir(root, date)}/{RUN_FILE}")
    try:
        return None if text is None else json.loads(text)
    except json.JSONDecodeError:
        return None


def read_text(path: str) -> str | None:
    """The file's text, or None when it does not exist."""
    if is_local(path):
        try:
            with open(path, encoding="utf-8") as handle:
                return handle.read()
        except FileNotFoundError:
            return None
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as handle:
        return handle.read().decode("utf-8")


def write_run(root: str, date: str, record: dict) -> None:
    directory = run_dir(root, date)
    if is_local(directory):
        os.makedirs(directory, exist_ok=True)
    write_text_atomically(f"{directory}/{RUN_FILE}", json.dumps(record, indent=2, sort_keys=True))


def published(root: str) -> str | None:
    """The published run as "runs/DATE", or None when nothing is published yet."""
    return read_published(root).text


def published_date(root: str) -> str | None:
    return read_published(root).date


def read_published(root: str) -> Pointer:
    """`published` with its version, for `publish` (the module doc)."""
    path = f"{root.rstrip('/')}/{PUBLISHED_FILE}"
    if object_store.has_preconditions(path):
        current = object_store.read(path)
        if current is None:
            return Pointer(None, 0)
        return Pointer(current.data.decode("utf-8").strip() or None, current.generation)
    text = read_text(path)
    return Pointer((text or "").strip() or None, text)


def publish(root: str, date: str, expected: Pointer) -> str:
    """Points ROOT/published at runs/DATE if it is still `expected`; returns the pointer text.

    Locally the caller holds `publish_lock`, under which the file is read again and compared.

    Raises:
        PointerMovedError: `published` has changed since `expected` was read; nothing written.
    """
    check_root(root)
    pointer = f"{RUNS_DIR}/{date}"
    path = f"{root.rstrip('/')}/{PUBLISHED_FILE}"
    if object_store.has_preconditions(path):
        data = (pointer + "\n").encode("utf-8")
        written = object_store.write_if(path, data, expected.version) is not None
    else:
        written = read_text(path) == expected.version
        if written:
            write_text_atomically(path, pointer + "\n")
    if not written:
        raise PointerMovedError(
            f"{path} changed after this launch read it ({expected.text}): another launch "
            "published meanwhile"
        )
    return pointer


@contextlib.contextmanager
def date_lock(
    root: str,
    date: str,
    wait_seconds: float = 0.0,
    poll: float = 1.0,
    lease_seconds: float = object_locks.LEASE_SECONDS,
) -> Iterator[locks.Held]:
    """Holds the date's lock, ROOT/runs/DATE/.lock (the module doc).

    Args:
        lease_seconds: gs:// only: how long the lock stays fresh unrenewed (its holder renews
            it every quarter of that).

    Raises:
        LockedError: another launch of the date still holds it after `wait_seconds`.
        cli.UsageError: the root's scheme is neither local nor gs://.
    """
    directory = run_dir(root, date)
    path = f"{directory}/{LOCK_FILE}"
    with _lock(path, f"the run of {date}", wait_seconds, poll, lease_seconds) as held:
        yield held


@contextlib.contextmanager
def publish_lock(
    root: str, wait_seconds: float = 600.0, lease_seconds: float = object_locks.LEASE_SECONDS
) -> Iterator[locks.Held]:
    """Holds ROOT/.publish.lock while a run compares against and replaces `published`."""
    path = f"{root.rstrip('/')}/{PUBLISH_LOCK_FILE}"
    with _lock(path, "publishing", wait_seconds, 0.2, lease_seconds) as held:
        yield held


@contextlib.contextmanager
def _lock(
    path: str, what: str, wait_seconds: float, poll: float, lease_seconds: float
) -> Iterator[locks.Held]:
    check_root(path)
    if is_local(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with locks.file_lock(path, what, wait_seconds, poll) as held:
            yield held
    else:
        with object_locks.object_lock(path, what, wait_seconds, poll, lease_seconds) as held:
            yield held
