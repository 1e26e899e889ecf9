"""The fixed side's factors held once and read by every solve against them.

A half-sweep solves many blocks against one fixed table Y [n, k]. The kernels read it extended
by a zero row (row n: the padding cells of the tiles point there, `trainer.core.kernels`), and
the loss reads Y itself. Given a plain array, `kernels.solve_planned` builds that extended
tensor for every solve (a copy of the whole table per solve, and per concurrent solve); a
`FixedTable` holds it once:

    table = FixedTable.filled(n, k, fill)    fill(buffer [n + 1, k] float32 zeros) writes Y
    solver.solve(plan, table, G, x0)         no copy of Y per solve
    loss.loss_sums(problem, x, table.factors)

The host buffer is allocated 64-byte aligned (TensorFlow's requirement) and shared with the
tensors without a copy (DLPack): `extended` [n + 1, k] and `factors` [n, k] are views of one
buffer of (n + 1) · k · 4 bytes, read-only by convention. On a machine with a GPU, `extended` is
one device copy, made once. Threads may share a table.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from trainer.core.host_arrays import aligned_zeros, is_aligned


def host_tensor(array: np.ndarray) -> tf.Tensor:
    """A CPU tensor over `array`'s memory (no copy) when TensorFlow can read it in place
    (`host_arrays.is_aligned`), else a copy. The tensor keeps the array alive; neither may be
    written afterwards."""
    if is_aligned(array):
        return tf.experimental.dlpack.from_dlpack(array.__dlpack__())
    return tf.convert_to_tensor(array)


@functools.cache
def _gpus() -> tuple:
    return tuple(tf.config.list_logical_devices("GPU"))


def kept_tensor(array: np.ndarray) -> tf.Tensor:
    """A tensor of `array` that is kept and read by many solves: on a CPU the array's own memory
    (`host_tensor`), with a GPU one copy on the first GPU, made once."""
    tensor, gpus = host_tensor(array), _gpus()
    if gpus:
        with tf.device(gpus[0].name):
            tensor = tf.identity(tensor)
    return tensor


class FixedTable:
    """Y [n, k] float32, with the zero-row extension the kernels read, held once.

    Attributes:
        array: float32 [n, k], the factors (a view of the host buffer).
        factors: the same as a tensor [n, k] (no copy).
        extended: tensor [n + 1, k], the factors then a zero row (no copy on a CPU; one device
            copy on a GPU).
    """

    def __init__(self, buffer: np.ndarray):
        """`buffer`: float32 [n + 1, k] whose last row is zero, preferably `aligned_zeros`."""
        buffer = np.asarray(buffer)
        if buffer.ndim != 2 or buffer.shape[0] < 1 or buffer.dtype != np.float32:
            raise ValueError(
                f"a fixed table is float32 [n + 1, k], not {buffer.dtype} {buffer.shape}"
            )
        if np.any(buffer[-1]):
            raise ValueError("the last row of a fixed table's buffer must be zero")
        self.array = buffer[:-1]
        self.factors = host_tensor(self.array)
        self.extended = kept_tensor(buffer)  # read by every solve
        self._memo: tuple[object, object] | None = None
        self._memo_lock = threading.Lock()

    @classmethod
    def filled(cls, n: int, k: int, fill: Callable[[np.ndarray], None]) -> FixedTable:
        """The table whose factors `fill` writes into a float32 [n + 1, k] aligned buffer of
        zeros (rows 0..n-1; row n stays zero)."""
        buffer = aligned_zeros((n + 1, k))
        fill(buffer[:n])
        return cls(buffer)

    @property
    def shape(self) -> tuple[int, int]:
        """(n, k)."""
        return self.array.shape

    def memo(self, key, build: Callable[[], object]):
        """`build()`, kept for the latest `key` (one value per table, shared by threads): e.g.
        the table rotated into the eigenbasis of a Gramian, which every exact solve of a
        half-sweep reads."""
        with self._memo_lock:
            if self._memo is None or self._memo[0] != key:
                self._memo = (key, build())
            return self._memo[1]
