"""The launch lock on an object store (gs://): an object created only if absent, with a lease.

    with object_lock("gs://b/root/runs/2026-11-22/.lock", "the run of 2026-11-22",
                     wait_seconds=0, lease_seconds=600) as held:
        ...              # held.check() raises LockLostError once another launch took it over

The lock object is one small JSON document, its holder:

    {"owner": "<uuid4 hex>", "pid": 4242, "host": "host-a", "pid_namespace": "pid:[4026531836]",
     "started": ISO time, "heartbeat": ISO time, "lease_seconds": 600.0}

All its writes are `common.object_store.write_if`, one simple upload with a generation
precondition:

- Taking: `write_if(path, holder, 0)` (if_generation_match=0) creates the object only if there
  is none: of launches racing for it, exactly one succeeds.
- Holding: a thread rewrites it every lease/4 seconds (a new "heartbeat"), each time only if its
  generation is still the one this launch last wrote. A rewrite that fails that precondition
  means another launch took the lock over (this one's lease ran out): the lock is lost, and
  `check()` raises `LockLostError` from then on (the scheduled run checks before each write of
  its run.json and before replacing `published`).
- Breaking a stale lock (`is_stale`): the breaker replaces the lock with its own holder,
  conditioned on the generation it judged stale. Of several breakers of one stale lock exactly
  one succeeds, and a lock rewritten since (a heartbeat, a new holder) has another generation,
  so a fresh lock is never broken. Never a delete and a create: two steps would let one breaker
  delete the lock another has just taken, and the emulator ignores preconditions on delete.
- Releasing: the heartbeat stops and the object is deleted if its generation is still the last
  one this launch wrote (real GCS enforces that; a lost lock is left to its new holder).

A lock is stale, to a launch that finds it taken, when
- it has not been rewritten for longer than its holder's `lease_seconds` (the finder's own
  lease when the object names none or is unreadable), judged from the object's `updated` time
  (the store's clock) against the finder's clock: its holder stopped renewing it (killed, its
  host gone). Clocks kept by NTP agree far more closely than a lease (default
  `LEASE_SECONDS`, 10 minutes, renewed every 2.5);
- or its holder ran on this host in this pid namespace and its pid is gone (a launch killed on
  this machine: taken over at once, as the local lock is).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from common import object_store
from pipeline import locks

logger = logging.getLogger(__name__)

LEASE_SECONDS = 600.0
BEATS_PER_LEASE = 4


def pid_namespace() -> str | None:
    """This process's pid namespace ("pid:[4026531836]"), where Linux tells; else None."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _parse(data: bytes) -> dict | None:
    try:
        holder = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return holder if isinstance(holder, dict) else None


def is_stale(holder: dict | None, updated: float, now: float, lease_seconds: float) -> bool:
    """Whether a lock object whose holder is `holder` may be taken over (the module doc).

    Args:
        holder: the lock's parsed JSON, or None when it is unreadable.
        updated: when the store last wrote the lock, in seconds since the epoch.
        now: the finder's time, in seconds since the epoch.
        lease_seconds: the finder's lease, for a lock that names none.
    """
    if holder is not None:
        here = holder.get("host") == socket.gethostname()
        if here and holder.get("pid_namespace") == pid_namespace():
            pid = holder.get("pid")
            if isinstance(pid, int) and not locks.pid_alive(pid):
                return True
        lease = holder.get("lease_seconds")
        if isinstance(lease, (int, float)) and not isinstance(lease, bool) and lease > 0:
            lease_seconds = float(lease)
    return now - updated > lease_seconds


class ObjectLock(locks.Held):
    """One launch's lock object at `path` (see the module doc); `acquire`, then `release`."""

    def __init__(self, path: str, what: str, lease_seconds: float = LEASE_SECONDS):
        if not lease_seconds > 0:
            raise ValueError(f"lease_seconds must be > 0, got {lease_seconds}")
        super().__init__(path)
        self.what = what
        self.lease_seconds = float(lease_seconds)
        self.owner = uuid.uuid4().hex
        self.started = locks.now()
        self.generation = 0  # the generation this launch last wrote; 0 while not held
        self.lost: str | None = None
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict:
        """The lock's content as this launch writes it now."""
        return {
            "owner": self.owner,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "pid_namespace": pid_namespace(),
            "started": self.started,
            "heartbeat": locks.now(),
            "lease_seconds": self.lease_seconds,
        }

    def _write(self, generation: int) -> int | None:
        data = json.dumps(self.holder(), sort_keys=True).encode("utf-8")
        return object_store.write_if(self.path, data, generation)

    def acquire(self, wait_seconds: float = 0.0, poll: float = 1.0) -> None:
        """Takes the lock, taking over a stale one; waits up to `wait_seconds` for a live one.

        Raises:
            LockedError: a live launch still holds the lock after `wait_seconds`.
        """
        waiting = locks.Waiting(self.what, wait_seconds, poll)
        while (generation := self._write(0)) is None:
            current = object_store.read(self.path)
            if current is None:
                continue  # released in between: try to create it again
            holder = _parse(current.data)
            if is_stale(holder, current.updated, time.time(), self.lease_seconds):
                generation = self._write(current.generation)
                if generation is not None:
                    logger.warning("took over the stale lock %s of %s", self.path, holder)
                    break
                continue  # another launch broke it first, or its holder renewed it
            age = time.time() - current.updated
            waiting.pause(holder, f"{self.path}, renewed {age:.0f} s ago")
        self.generation = generation
        self._thread = threading.Thread(
            target=self._renew, name=f"lock-heartbeat {self.path}", daemon=True
        )
        self._thread.start()

    def _renew(self) -> None:
        """The heartbeat: rewrites the lock every lease / BEATS_PER_LEASE seconds."""
        while not self._stop.wait(self.lease_seconds / BEATS_PER_LEASE):
            with self._guard:
                try:
                    generation = self._write(self.generation)
                except Exception as error:  # a network error: the next beat tries again
                    logger.warning("could not renew the lock %s: %s", self.path, error)
                    continue
                if generation is not None:
                    self.generation = generation
                    continue
                holder = None
                with contextlib.suppress(Exception):
                    current = object_store.read(self.path)
                    holder = None if current is None else _parse(current.data)
                self.lost = (
                    f"{self.what}: this launch's lock {self.path} was taken over by another "
                    f"launch ({locks.who(holder)}) after it went unrenewed for its lease of "
                    f"{self.lease_seconds:g} s; this launch stops"
                )
                logger.error("%s", self.lost)
                return

    def check(self) -> None:
        if self.lost:
            raise locks.LockLostError(self.lost)

    def release(self) -> None:
        """Stops the heartbeat and deletes the lock, unless another launch has taken it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost or not self.generation:
            return
        try:
            if not object_store.delete_if(self.path, self.generation):
                logger.warning("the lock %s was no longer this launch's: left alone", self.path)
        except Exception as error:  # left behind, it goes stale after its lease
            logger.warning("could not remove the lock %s: %s", self.path, error)
        self.generation = 0


@contextlib.contextmanager
def object_lock(
    path: str,
    what: str,
    wait_seconds: float = 0.0,
    poll: float = 1.0,
    lease_seconds: float = LEASE_SECONDS,
) -> Iterator[ObjectLock]:
    """Holds the lock object at `path` (gs://) for the block; the module doc says how.

    Raises:
        LockedError: a live launch still holds the lock after `wait_seconds`.
    """
    held = ObjectLock(path, what, lease_seconds)
    held.acquire(wait_seconds, poll)
    try:
        yield held
    finally:
        held.release()
