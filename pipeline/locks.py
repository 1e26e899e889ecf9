"""The launch locks' common part and the local one: a file created with O_CREAT | O_EXCL.

    with file_lock("/srv/ga-wals/runs/2026-11-22/.lock", "the run of 2026-11-22") as held:
        ...                       # held.check() raises LockLostError once the lock is not ours

The lock file holds its holder, {"pid", "host", "started"}. A lock whose pid is gone on this
host is stale: it is removed (by one launch only, `_break_stale`) and taken over. A lock from
another host is never presumed stale: a local directory is one host's. The object-store lock,
with the same interface and a lease, is `pipeline.object_locks`; `pipeline.runstate` picks one
by the root's scheme.
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

logger = logging.getLogger(__name__)


class LockedError(RuntimeError):
    """Another live launch holds the lock."""


class LockLostError(LockedError):
    """The lock this launch held was taken over by another launch (its lease ran out)."""


class Held:
    """A lock this launch holds, at `path`. A local lock cannot be lost: `check` never raises."""

    def __init__(self, path: str):
        self.path = path

    def check(self) -> None:
        """Raises LockLostError when the lock is no longer this launch's."""


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def who(holder: dict | None) -> str:
    """The holder as a message names it: "pid 4242 on host-a since 2026-11-22T21:00:03+00:00"."""
    if not holder:
        return "a launch that has not written its pid yet"
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"


class Waiting:
    """One acquisition's patience with a live holder, the same for a lock file and a lock object:
    each `pause` before `wait_seconds` have passed logs "waiting for" (once) and sleeps `poll`
    seconds; after that, it raises LockedError naming the holder."""

    def __init__(self, what: str, wait_seconds: float, poll: float):
        self.what, self.poll = what, poll
        self._deadline = time.monotonic() + wait_seconds
        self._logged = False

    def pause(self, holder: dict | None, where: str) -> None:
        """Waits `poll` s for `holder` (of the lock at `where`), or raises LockedError."""
        if time.monotonic() >= self._deadline:
            raise LockedError(
                f"{self.what} is locked by another launch ({who(holder)}; {where}), which is "
                "still running, so this launch does nothing; wait for it, or pass --lock_wait "
                "SECONDS"
            )
        if not self._logged:
            logger.info("waiting for %s, locked by %s", self.what, who(holder))
            self._logged = True
        time.sleep(self.poll)


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
    return not isinstance(pid, int) or not pid_alive(pid)


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
def file_lock(path: str, what: str, wait_seconds: float = 0.0, poll: float = 1.0) -> Iterator[Held]:
    """Holds a lock: a file created with O_CREAT | O_EXCL holding {"pid", "host", "started"}.

    A stale lock (its pid gone, on this host) is removed and taken over. A live one makes this
    wait up to `wait_seconds`, then raise LockedError naming the holder.

    Raises:
        LockedError: another process still holds the lock after `wait_seconds`.
    """
    waiting = Waiting(what, wait_seconds, poll)
    while not _try_create(path):
        holder = _read_lock(path)
        if _is_stale(holder, path):
            _break_stale(path, holder)
            continue
        waiting.pause(holder, path)
    try:
        yield Held(path)
    finally:
        try:
            holder = _read_lock(path)
            if holder and holder.get("pid") == os.getpid():
                os.remove(path)
        except OSError as error:
            if error.errno != errno.ENOENT:
                logger.warning("could not remove the lock %s: %s", path, error)
