"""Host arrays that TensorFlow can read in place: NumPy only.

TensorFlow's CPU kernels (Eigen) want their buffers 64-byte aligned; a C-ordered NumPy array
that starts on such a boundary becomes a tensor over the same memory (DLPack,
`trainer.core.fixed_table.host_tensor`), while any other array is copied. NumPy aligns its
buffers to 16 bytes only. So arrays that are kept and read by many solves (a plan's tiles, the
fixed table) are allocated here, and a process holds them once, not once as NumPy and once
more as tensors.

Element types: `aligned_empty` / `aligned_zeros` / `aligned_full` return C-ordered arrays of
the given shape and dtype whose data starts on an ALIGNMENT-byte boundary.
"""

from __future__ import annotations

import numpy as np

ALIGNMENT = 64  # bytes: Eigen's (and so TensorFlow's CPU kernels') alignment


def aligned_empty(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """An uninitialised C-ordered array whose data starts on an ALIGNMENT-byte boundary."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(size + ALIGNMENT, dtype=np.uint8)
    offset = -raw.ctypes.data % ALIGNMENT
    return raw[offset : offset + size].view(dtype).reshape(shape)


def aligned_full(shape: tuple[int, ...], value, dtype=np.float32) -> np.ndarray:
    """`np.full(shape, value, dtype)`, aligned (`aligned_empty`)."""
    array = aligned_empty(shape, dtype)
    array.fill(value)
    return array


def aligned_zeros(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """`np.zeros(shape, dtype)`, aligned (`aligned_empty`)."""
    return aligned_full(shape, 0, dtype)


def is_aligned(array: np.ndarray) -> bool:
    """Whether TensorFlow can read `array` in place: C-ordered, non-empty, and starting on an
    ALIGNMENT-byte boundary."""
    return bool(array.flags.c_contiguous and array.size and array.ctypes.data % ALIGNMENT == 0)
