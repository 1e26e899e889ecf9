"""Measuring helpers: wall time and peak resident memory of a command and all of its child
processes; a cap on NumPy's BLAS threads for peers that ask for one."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Iterator


def run_measured(
    command: list[str],
    env: dict | None = None,
    interval: float = 0.2,
    pss_interval: float | None = None,
) -> dict:
    """Runs command; returns {"seconds", "peak_rss_mb", "returncode", "stderr_tail"}, and
    "peak_pss_mb" when `pss_interval` is given.

    Peak RSS is the largest sum, over one sampling instant (every `interval` s), of the RSS of
    the process and all its descendants (the DirectRunner's multi-processing workers included).
    The sum counts a shared page once per process that maps it: the libraries that several
    processes load (TensorFlow's among them) are counted in each.

    Peak PSS (only with `pss_interval`): the same largest sum of the proportional set size,
    where a page shared by k processes counts 1/k in each, so the sum counts it once; sampled
    every `pss_interval` s (reading a process's smaps takes about 12 ms once TensorFlow is
    loaded, against 0.01 ms for its RSS), so a short peak between two samples can be missed.
    """
    import psutil  # the bench extra; imported here so that importing this module needs none

    start = time.monotonic()
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    peak = peak_pss = 0
    done = threading.Event()

    def sample():
        nonlocal peak, peak_pss
        root = psutil.Process(process.pid)
        next_pss = time.monotonic()
        while not done.is_set():
            with_pss = pss_interval is not None and time.monotonic() >= next_pss
            try:
                tree = [root, *root.children(recursive=True)]
                total = total_pss = 0
                for proc in tree:
                    try:
                        if with_pss:
                            info = proc.memory_full_info()
                            total_pss += info.pss
                        else:
                            info = proc.memory_info()
                        total += info.rss
                    except psutil.Error:
                        pass
                peak = max(peak, total)
                if with_pss:
                    peak_pss = max(peak_pss, total_pss)
                    next_pss = time.monotonic() + pss_interval
            except psutil.Error:
                pass
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    seconds = time.monotonic() - start
    done.set()
    sampler.join()
    result = {
        "seconds": seconds,
        "peak_rss_mb": peak / 2**20,
        "returncode": process.returncode,
        "stderr_tail": "\n".join(stderr.splitlines()[-15:]),
    }
    if pss_interval is not None:
        result["peak_pss_mb"] = peak_pss / 2**20
    return result


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
