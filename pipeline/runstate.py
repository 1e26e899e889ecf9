"""The state of scheduled runs on disk: each date's run.json, its lock, and the published pointer.

Layout under a root directory (local, or an object store such as gs:// for Dataflow runs):

    ROOT/published              "runs/2026-11-22\\n": the run whose model is live (replaced
                                atomically, by `common.atomic.write_text_atomically`)
    ROOT/runs/DATE/run.json     the run's record (below), rewritten atomically after each step
    ROOT/runs/DATE/.lock        held while a launch works on DATE: {"pid", "host", "started"}

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

Both files are written with `common.atomic.write_text_atomically`: locally a temporary
sibling, fsynced and renamed into place; on object stores a single upload, which is atomic
(visible only when complete). Object stores have no O_EXCL: the lock is local only, and on a
gs:// root the scheduler must serialise launches of one date (the Airflow DAG's
max_active_runs=1 and check_if_running do).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import socket
import time
from collections.abc import Iterator

from apache_beam.io.filesystems import FileSystems

from common.atomic import is_local, write_text_atomically

logger = logging.getLogger(__name__)

RUNS_DIR = "runs"
RUN_FILE = "run.json"
LOCK_FILE = ".lock"
PUBLISHED_FILE = "published"

RUNNING, DONE, FAILED = "running", "done", "failed"
PUBLISHED, REJECTED = "published", "rejected"
PASSED = "passed"  # passed the gate, not published: a newer date is
PENDING = "pending"  # the stages asked for (--stages) are done, later ones are not


class LockedError(RuntimeError):
    """Another live launch holds the date's lock."""


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


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
    text = (read_text(f"{root.rstrip('/')}/{PUBLISHED_FILE}") or "").strip()
    return text or None


def published_date(root: str) -> str | None:
    pointer = published(root)
    return pointer.split("/", 1)[1] if pointer and "/" in pointer else None


def publish(root: str, date: str) -> str:
    """Points ROOT/published at runs/DATE, atomically; returns the pointer text."""
    pointer = f"{RUNS_DIR}/{date}"
    write_text_atomically(f"{root.rstrip('/')}/{PUBLISHED_FILE}", pointer + "\n")
    return pointer


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_lock(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _is_stale(holder: dict | None, path: str) -> bool:
    """A lock is stale when its holder ran on this host and its pid is gone.

    A lock file that is empty or unreadable (its writer died between creating and filling it)
    is stale once it is a minute old. A lock from another host is never presumed stale.
    """
    if holder is None:
        try:
            return time.time() - os.path.getmtime(path) > 60
        except FileNotFoundError:
            return False
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    return not isinstance(pid, int) or not _pid_alive(pid)


def _try_create(path: str) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": now()}
        os.write(fd, json.dumps(holder).encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _who(holder: dict | None) -> str:
    if not holder:
        return "a launch that has not written its pid yet"
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"


def _break_stale(path: str, holder: dict | None) -> None:
    """Removes the stale lock at path, unless another launch is doing so or has done so.

    Only the launch that creates `path.break` (O_EXCL) may remove another's lock, and only after
    re-reading it under that claim, so that two launches finding the same stale lock never
    remove a fresh lock that one of them has just taken.
    """
    breaker = f"{path}.break"
    if not _try_create(breaker):
        if _is_stale(_read_lock(breaker), breaker):
            with contextlib.suppress(FileNotFoundError):
                os.remove(breaker)
        time.sleep(0.05)
        return
    try:
        current = _read_lock(path)
        if current == holder and _is_stale(current, path):
            logger.warning("removing the stale lock %s (its holder %s is gone)", path, holder)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    finally:
        os.remove(breaker)


@contextlib.contextmanager
def date_lock(root: str, date: str, wait_seconds: float = 0.0, poll: float = 1.0) -> Iterator[None]:
    """Holds the date's lock, ROOT/runs/DATE/.lock (see `file_lock`).

    Raises:
        LockedError: another launch of the date still holds it after `wait_seconds`.
    """
    directory = run_dir(root, date)
    if not is_local(directory):
        logger.info("no lock on %s (an object store): the scheduler serialises launches", root)
        yield
        return
    os.makedirs(directory, exist_ok=True)
    with file_lock(os.path.join(directory, LOCK_FILE), f"the run of {date}", wait_seconds, poll):
        yield


@contextlib.contextmanager
def publish_lock(root: str, wait_seconds: float = 600.0) -> Iterator[None]:
    """Holds ROOT/.publish.lock while a run compares against and replaces `published`."""
    if not is_local(root):
        yield
        return
    with file_lock(os.path.join(root, ".publish.lock"), "publishing", wait_seconds, 0.2):
        yield


@contextlib.contextmanager
def file_lock(path: str, what: str, wait_seconds: float = 0.0, poll: float = 1.0) -> Iterator[None]:
    """Holds a lock: a file created with O_CREAT | O_EXCL holding {"pid", "host", "started"}.

    A stale lock (its pid gone, on this host) is removed and taken over. A live one makes this
    wait up to `wait_seconds`, then raise LockedError naming the holder.

    Raises:
        LockedError: another process still holds the lock after `wait_seconds`.
    """
    deadline = time.monotonic() + wait_seconds
    waited = False
    while not _try_create(path):
        holder = _read_lock(path)
        if _is_stale(holder, path):
            _break_stale(path, holder)
            continue
        if time.monotonic() >= deadline:
            raise LockedError(
                f"{what} is locked by another launch ({_who(holder)}; {path}), which is still "
                "running, so this launch does nothing; wait for it, or pass --lock_wait SECONDS"
            )
        if not waited:
            logger.info("waiting for %s, locked by %s", what, _who(holder))
            waited = True
        time.sleep(poll)
    try:
        yield
    finally:
        try:
            holder = _read_lock(path)
            if holder and holder.get("pid") == os.getpid():
                os.remove(path)
        except OSError as error:
            if error.errno != errno.ENOENT:
                logger.warning("could not remove the lock %s: %s", path, error)
