"""The peak of the allocations a call makes, as tracemalloc sees them (NumPy reports its
buffers to it): for tests that bound an element's memory."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable


def peak_bytes(run: Callable[[], object]) -> int:
    """The peak traced bytes while `run()` runs (tracemalloc started and stopped around it)."""
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
