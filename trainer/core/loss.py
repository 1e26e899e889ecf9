"""The training loss of the WALS objective, in partial sums that blocks merge by addition.

The objective is the one of `trainer.core.problem` (its docstring writes the normal
equations and what f, t and λ are under each weighting):

    L = Σ_(u,i) w_ui (t_ui − x_u·y_i)² + Σ_u λ_u ‖x_u‖² + Σ_i λ_i ‖y_i‖²,

with w_ui = w0 + f_ui on observed cells and w_ui = w0, t_ui = 0 on the others. Each block adds
its `LossSums` (a Beam CombineFn, or a plain sum locally). The unobserved term comes from the
two Gramians, so no block needs the other side's rows:

    observed       = Σ_obs (w0 + f_ui)(t_ui − x_u·y_i)²
    unobserved     = w0·sum(XᵀX ∘ YᵀY) − w0·Σ_obs (x_u·y_i)²
    regularization = Σ_u λ_u‖x_u‖² + Σ_i λ_i‖y_i‖²

It gathers both factor tables once per observed cell: on the large benchmark matrix it cost
about 45% of a 0.45 s CG iteration (issue 16), so the trainers compute it only when asked
(`loss_every`; the local trainer's default is after the last iteration only).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import tensorflow as tf

from trainer.core.kernels import as_tensor, gramian
from trainer.core.problem import RowProblem
from trainer.core.sparse import CsrMatrix
from trainer.core.tiling import next_power_of_two

# Entries per step of `observed_sums`.
_LOSS_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class LossSums:
    """Partial sums of the objective over some blocks; merge with `+`.

    Attributes:
        squared: Σ_obs (t_ui − x_u·y_i)² over the blocks' observed cells.
        weighted: Σ_obs f_ui (t_ui − x_u·y_i)².
        predicted: Σ_obs (x_u·y_i)².
        regularization: Σ λ_u‖x_u‖² over the blocks' rows.
        entries: observed cells counted.
    """

    squared: float = 0.0
    weighted: float = 0.0
    predicted: float = 0.0
    regularization: float = 0.0
    entries: int = 0

    def __add__(self, other: LossSums) -> LossSums:
        return LossSums(
            self.squared + other.squared,
            self.weighted + other.weighted,
            self.predicted + other.predicted,
            self.regularization + other.regularization,
            self.entries + other.entries,
        )

    def finish(self, gramian_users: np.ndarray, gramian_items: np.ndarray, w0: float) -> dict:
        """The loss from all blocks' sums and the two Gramians (module docstring).

        Args:
            gramian_users: [k, k] XᵀX.
            gramian_items: [k, k] YᵀY.
            w0: the unobserved weight.

        Returns:
            {"observed", "unobserved", "regularization", "total", "rmse"} as floats; rmse is
            the unweighted root-mean-square error over the observed cells.
        """
        all_cells = w0 * float(
            np.sum(np.asarray(gramian_users, np.float64) * np.asarray(gramian_items, np.float64))
        )
        observed = w0 * self.squared + self.weighted
        unobserved = all_cells - w0 * self.predicted
        return {
            "observed": observed,
            "unobserved": unobserved,
            "regularization": self.regularization,
            "total": observed + unobserved + self.regularization,
            "rmse": float(np.sqrt(self.squared / max(self.entries, 1))),
        }


def loss_sums(
    problem: RowProblem,
    solved: np.ndarray | tf.Tensor,
    fixed: np.ndarray | tf.Tensor | None,
    dtype: tf.DType = tf.float32,
) -> LossSums:
    """A block's partial sums of the loss.

    Count every observed cell once: pass `fixed` for the blocks of one side (the users), and
    None for the other side's blocks, which then add only their regularization.

    Args:
        problem: the block's problem.
        solved: [n_rows, k] the block's factors.
        fixed: [n_fixed, k] the other side's factors, or None.
        dtype: computation dtype of the predictions; sums accumulate in float64.
    """
    solved = as_tensor(solved, dtype)
    norms = tf.reduce_sum(tf.square(tf.cast(solved, tf.float64)), axis=1).numpy()
    regularization = float(np.dot(np.asarray(problem.reg, np.float64), norms))
    if fixed is None:
        return LossSums(regularization=regularization)
    squared, weighted, predicted = observed_sums(problem.targets, problem.f, solved, fixed, dtype)
    return LossSums(squared, weighted, predicted, regularization, problem.targets.nnz)


def loss(
    users: RowProblem,
    items: RowProblem,
    user_factors: np.ndarray | tf.Tensor,
    item_factors: np.ndarray | tf.Tensor,
    dtype: tf.DType = tf.float32,
) -> dict:
    """The loss of a whole model: both sides' partial sums, finished with the Gramians.

    Returns:
        `LossSums.finish`'s {"observed", "unobserved", "regularization", "total", "rmse"}.
    """
    x = as_tensor(user_factors, dtype)
    y = as_tensor(item_factors, dtype)
    sums = loss_sums(users, x, y, dtype) + loss_sums(items, y, None, dtype)
    return sums.finish(gramian(x, tf.float64).numpy(), gramian(y, tf.float64).numpy(), users.w0)


@functools.cache
def _observed_sums_kernel(dtype: tf.DType):
    """Per-chunk sums of the observed loss terms, accumulated in float64.

    XLA-compiled, so that the two gathers fuse with the products instead of materialising
    [chunk, k] twice (0.25 s -> 0.12 s for 4.5M cells at k = 64 on 2 cores). Every chunk has
    the same number of entries, the last one padded and masked by `count`, so there is one
    compile per pair of factor table shapes.
    """

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None], dtype),  # X
            tf.TensorSpec([None, None], dtype),  # Y
            tf.TensorSpec([None], tf.int32),  # row of each entry
            tf.TensorSpec([None], tf.int32),  # column of each entry
            tf.TensorSpec([None], tf.float32),  # t
            tf.TensorSpec([None], tf.float32),  # f
            tf.TensorSpec([], tf.int32),  # count: the entries that are real, the first ones
        ],
        jit_compile=True,
    )
    def observed_sums(x, y, row_ids, col_ids, t, f, count):
        prediction = tf.reduce_sum(tf.gather(x, row_ids) * tf.gather(y, col_ids), axis=1)
        real = tf.range(tf.shape(t)[0]) < count
        prediction = tf.where(real, tf.cast(prediction, tf.float64), 0.0)
        squared = tf.square(tf.cast(t, tf.float64) - prediction)
        f = tf.cast(f, tf.float64)
        return (
            tf.reduce_sum(squared),
            tf.reduce_sum(f * squared),
            tf.reduce_sum(tf.square(prediction)),
        )

    return observed_sums


def observed_sums(
    rows: CsrMatrix,
    f: np.ndarray,
    solved: np.ndarray | tf.Tensor,
    fixed: np.ndarray | tf.Tensor,
    dtype: tf.DType = tf.float32,
) -> tuple[float, float, float]:
    """Sums over a block's observed cells, for `loss_sums`.

    With p_ui = x_u·y_i computed in `dtype` and the sums accumulated in float64:
        (Σ (t_ui − p_ui)²,  Σ f_ui (t_ui − p_ui)²,  Σ p_ui²).

    Args:
        rows: [n_rows, n_fixed] the block, values t_ui.
        f: float [nnz], f_ui in `rows`' nnz order.
        solved: [n_rows, k] the block's factors x_u.
        fixed: [n_fixed, k] the other side's factors y_i.
        dtype: computation dtype of the predictions.
    """
    x = as_tensor(solved, dtype)
    y = as_tensor(fixed, dtype)
    if x.shape[0] != rows.shape[0] or y.shape[0] != rows.shape[1]:
        raise ValueError(f"factors {x.shape} and {y.shape} do not match the block {rows.shape}")
    if max(rows.shape) > np.iinfo(np.int32).max:
        raise ValueError(f"at most {np.iinfo(np.int32).max} rows and columns, got {rows.shape}")
    kernel = _observed_sums_kernel(dtype)
    entries = (
        rows.row_ids().astype(np.int32),
        rows.indices.astype(np.int32, copy=False),
        rows.values,
        np.asarray(f, dtype=np.float32),
    )
    # Chunks of one length (a power of two for small blocks): one compile per table shapes.
    chunk = min(_LOSS_CHUNK, int(next_power_of_two(max(rows.nnz, 1))))
    squared = weighted = predicted_sq = 0.0
    for lo in range(0, rows.nnz, chunk):
        count = min(rows.nnz - lo, chunk)
        parts = [values[lo : lo + count] for values in entries]
        if count < chunk:  # the last chunk: padded with entries of row 0, column 0, masked
            parts = [np.pad(values, (0, chunk - count)) for values in parts]
        sums = kernel(x, y, *parts, tf.constant(count, tf.int32))
        squared += float(sums[0])
        weighted += float(sums[1])
        predicted_sq += float(sums[2])
    return squared, weighted, predicted_sq
