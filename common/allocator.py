"""Freed memory given back to the operating system in worker processes (glibc's malloc).

glibc serves a request below its mmap threshold from the heap, and each time a block above the
threshold is freed it raises the threshold to that block's size, up to 32 MiB (the "dynamic
mmap threshold", mallopt(3)). A Beam worker handles elements of one to tens of MiB one after
the other (packed rows, blocks, chunks of scores, factor parts), so after the first few they
all come from the heap, and a heap gives memory back only from its top: the freed blocks stay
in the worker's RSS, stage after stage. On Beam's local portable runner, `python -m
benchmarks.runner_memory --pipeline train` (the train, evaluate and new-visitor jobs of
`trainer.task --distributed`, S and 8S of `benchmarks.scale`, 2 cores) measured the workers'
peak growing by +220 MB per 8x with glibc's defaults and +144 MB with the threshold fixed at
1 MiB (the job service: +126 and +33 MB).

`return_freed_memory()` fixes the mmap threshold at MMAP_THRESHOLD, so that every larger block
is a mapping of its own, unmapped when freed, and trims the heap's top above TRIM_THRESHOLD (as
Dask advises for its workers with MALLOC_TRIM_THRESHOLD_). It acts once per process, only in an
SDK worker process that a runner started, only on glibc, and never over a MALLOC_*_ variable
the user set. Element types: none; this module sets the process's allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading

logger = logging.getLogger(__name__)

MMAP_THRESHOLD = 1 << 20
TRIM_THRESHOLD = 1 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # malloc.h
_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_lock = threading.Lock()
_done = False


def return_freed_memory() -> bool:
    """Sets this worker process's glibc to give freed blocks of MMAP_THRESHOLD or more back to
    the OS (module doc). Returns whether it was set now or before; False outside an SDK worker
    process, without glibc, or where the user set a MALLOC_*_ threshold variable."""
    global _done
    with _lock:
        if _done:
            return True
        if "CONTROL_API_SERVICE_DESCRIPTOR" not in os.environ:  # not a runner's SDK worker
            return False
        if any(name in os.environ for name in _ENVIRONMENT):
            return False
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
            mallopt = libc.mallopt if libc is not None else None
        except (OSError, AttributeError):
            mallopt = None
        if mallopt is None:  # not glibc (musl, macOS): their allocators behave otherwise
            return False
        if not (
            mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        ):
            logger.debug("mallopt refused the thresholds")
            return False
        _done = True
        logger.info(
            "worker process %d: blocks of %d bytes or more go back to the OS when freed",
            os.getpid(),
            MMAP_THRESHOLD,
        )
        return True
