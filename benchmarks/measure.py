"""Measuring helpers: wall time and peak resident memory of a command and all of its child
processes; a cap on NumPy's BLAS threads for peers that ask for one."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Iterator


def run_measured(command: list[str], env: dict | None = None, interval: float = 0.2) -> dict:
    """Runs command; returns {"seconds", "peak_rss_mb", "returncode", "stderr_tail"}.

    Peak RSS is the largest sum, over one sampling instant, of the RSS of the process and all
    its descendants (the DirectRunner's multi-processing workers included).
    """
    import psutil  # the bench extra; imported here so that importing this module needs none

    start = time.monotonic()
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        root = psutil.Process(process.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                total = 0
                for proc in tree:
                    try:
                        total += proc.memory_info().rss
                    except psutil.Error:
                        pass
                peak = max(peak, total)
            except psutil.Error:
                pass
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    seconds = time.monotonic() - start
    done.set()
    sampler.join()
    return {
        "seconds": seconds,
        "peak_rss_mb": peak / 2**20,
        "returncode": process.returncode,
        "stderr_tail": "\n".join(stderr.splitlines()[-15:]),
    }


@contextlib.contextmanager
def blas_threads(threads: int) -> Iterator[None]:
    """Limits NumPy's BLAS thread pool inside the block (when threadpoolctl is installed)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=threads, user_api="blas"):
        yield
