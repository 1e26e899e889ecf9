"""The TensorFlow kernels of the row solves: the Gramian, the exact (Cholesky and Woodbury)
and the conjugate-gradient tile kernels, and `solve_planned`, which runs them over a plan.

Callers choose a solver once and go through `trainer.core.solver`; this module is its
engine. Each kernel solves, for the rows of a tile, the normal equations written once in
`trainer.core.problem`'s docstring, A_u x_u = b_u. In the terms of a tile, which carries
f_ui and c_ui = (w0 + f_ui)·t_ui per entry (t_ui the fitted target, 1 under binary_target):

    A_u = w0·G + Σ_(i∈obs(u)) f_ui y_i y_iᵀ + λ_u I,    b_u = Σ_(i∈obs(u)) c_ui y_i,    G = YᵀY,

so each solve touches only the row's observed items (the "Gramian trick").

    exact       forms A_u ([k, k]) with batched matmuls and factorises it. Short rows (one line
                of width W <= k/2, `trainer.core.tiling`) instead use the Woodbury identity in
                the eigenbasis of G (G = Q Λ Qᵀ, computed once per call), which only factorises
                a [W, W] matrix (when every λ_u > 0):
                    Z = Y_u Q,  U = diag(√f) Z,  v = Zᵀ c,  D = w0·Λ + λ_u I,
                    S = I + U D⁻¹ Uᵀ,  z = D⁻¹ (v − Uᵀ S⁻¹ U D⁻¹ v),  x_u = Q z,
                since A_u = Q (D + UᵀU) Qᵀ and b_u = Q v.
    cg          runs a few conjugate-gradient steps warm-started from the current factors, as in
                implicit's CG. It never forms A_u; it only needs
                A_u·p = w0·G·p + Σ_i f_ui y_i (y_i·p) + λ_u p.
Rows without observations have b_u = 0 and A_u positive definite, so x_u = 0; they skip both.

The CG kernel solves a tile (T sub-tiles of one shape) in one call, looping over its
sub-tiles: it gathers one sub-tile's factors into [B, W, k] (sized to stay in the L2 cache),
runs every CG step on its rows with batched matmuls, and moves on. So the gathered factors are
read from cache by the steps, and a call (whose fixed cost is about that of solving one
sub-tile) is paid once per T sub-tiles. The exact solver takes one sub-tile per tile. Two tiles
are in flight at a time.

All kernels are plain TensorFlow ops without device placement: they run on a GPU when one is
visible and on the CPU otherwise. XLA's settings are not applied here: see
`trainer.core.xla.configure_xla`.
"""

from __future__ import annotations

import concurrent.futures
import functools

import numpy as np
import tensorflow as tf

from trainer.core.fixed_table import FixedTable, kept_tensor
from trainer.core.plans import RowPlan, Tile
from trainer.core.tiling import CG, CHOLESKY, validate_solver

# Tiles solved concurrently by default. On 2 cores one CG tile at a time takes 1.4 times as long
# as two (its small ops run on one thread). Each tile's result does not depend on
# this; pass `tiles_in_flight` to `solve_planned` on larger machines.
DEFAULT_TILES_IN_FLIGHT = 2
# CG kernels with at most this many steps are unrolled; longer ones loop.
_MAX_UNROLLED_CG_STEPS = 8
_TILE_ARRAYS = ("cols", "f", "c", "line_rows", "reg")

FloatArray = np.ndarray | tf.Tensor


def as_tensor(value: FloatArray, dtype: tf.DType) -> tf.Tensor:
    """`value` as a tensor of `dtype`, casting NumPy arrays and tensors of other float types."""
    return tf.cast(tf.convert_to_tensor(value), dtype)


def gramian(factors: FloatArray, dtype: tf.DType = tf.float32) -> tf.Tensor:
    """G = FᵀF.

    Args:
        factors: [n, k] factor matrix F.
        dtype: computation dtype.

    Returns:
        [k, k] tensor of `dtype`, G_ab = Σ_n F_na F_nb.
    """
    factors = as_tensor(factors, dtype)
    return tf.matmul(factors, factors, transpose_a=True)


def _tensors(tile: Tile) -> dict[str, tf.Tensor]:
    """A tile's arrays as tensors, made on first use and kept with the tile
    (`fixed_table.kept_tensor`). On a CPU they read the arrays in place (`plan_rows` allocates
    them aligned), so keeping them costs no second copy of a cached plan; an array that is not
    aligned (the offsets of a flattened tile's `line_rows`) is copied. With a GPU they are
    device copies, made once per tile rather than on every solve."""
    names = ("rows", *_TILE_ARRAYS)
    return tile.memo("tensors", lambda: {name: kept_tensor(getattr(tile, name)) for name in names})


def _observed_product(
    y: tf.Tensor, weights: tf.Tensor, line_rows: tf.Tensor, multi_line: bool, n_rows: tf.Tensor
) -> tf.Tensor:
    """Σ_(lines l of row u) Σ_w weights_lw y_lw: [B, W, k], [B, W] -> [R, k]."""
    per_line = tf.einsum("bw,bwk->bk", weights, y)
    if not multi_line:
        return per_line
    return tf.math.unsorted_segment_sum(per_line, line_rows, n_rows)


def observed_gramians(y: tf.Tensor, f: tf.Tensor) -> tf.Tensor:
    """Σ_i f_i y_i y_iᵀ per row: y [B, W, k], f [B, W] -> [B, k, k] (padding has f = 0)."""
    return tf.matmul(y * f[:, :, None], y, transpose_a=True)


def solve_normal_equations(
    observed: tf.Tensor, rhs: tf.Tensor, w0_gramian: tf.Tensor, reg: tf.Tensor
) -> tf.Tensor:
    """The exact row solve x = A⁻¹ b with A = w0·G + observed + λ I, for a batch of rows.

    Args:
        observed: [R, k, k] Σ_i f_ui y_i y_iᵀ (`observed_gramians`).
        rhs: [R, k] b_u = Σ_i (w0 + f_ui) t_ui y_i.
        w0_gramian: [k, k] w0·G.
        reg: [R] λ_u.

    Returns:
        [R, k] the solutions, by Cholesky factorisation (A is symmetric positive definite).
    """
    a = observed + w0_gramian[None, :, :]
    a = tf.linalg.set_diag(a, tf.linalg.diag_part(a) + reg[:, None])
    return tf.linalg.cholesky_solve(tf.linalg.cholesky(a), rhs[:, :, None])[:, :, 0]


def _per_line(x: tf.Tensor, line_rows: tf.Tensor, multi_line: bool) -> tf.Tensor:
    """Each line's row of x: [R, k] -> [B, k]."""
    return tf.gather(x, line_rows) if multi_line else x


def _cg_steps(y, f, c, line_rows, reg, x, w0_gramian, multi_line: bool, steps) -> tf.Tensor:
    """`steps` CG steps on the rows of one sub-tile, from x.

    Args:
        y: [B, W, k] the gathered fixed factors of the lines' entries.
        f, c: [B, W] f_ui and (w0 + f_ui) t_ui of the entries (0 on padding).
        line_rows: int32 [B] the row of each line; reg [R] λ_u; x [R, k] the warm start.
        w0_gramian: [k, k] w0·G.
        multi_line: whether some row spans several lines.
        steps: a Python int (unrolled) or a scalar tensor (a loop).

    Returns:
        [R, k] x after the steps.
    """
    n_rows = tf.shape(reg)[0]
    reg = reg[:, None]

    def apply(p):
        # A p = w0·G p + Σ_i f_i y_i (y_i·p) + λ p   (G symmetric: G p = (pᵀ G)ᵀ).
        yp = tf.einsum("bwk,bk->bw", y, _per_line(p, line_rows, multi_line))
        observed = _observed_product(y, f * yp, line_rows, multi_line, n_rows)
        return observed + tf.matmul(p, w0_gramian) + reg * p

    # r = b − A x = Σ_i y_i (c_i − f_i y_i·x) − w0·G x − λ x.
    yx = tf.einsum("bwk,bk->bw", y, _per_line(x, line_rows, multi_line))
    r = _observed_product(y, c - f * yx, line_rows, multi_line, n_rows)
    r = r - tf.matmul(x, w0_gramian) - reg * x
    p = r
    rs = tf.reduce_sum(r * r, axis=1, keepdims=True)
    for _ in range(steps) if isinstance(steps, int) else tf.range(steps):
        ap = apply(p)
        alpha = tf.math.divide_no_nan(rs, tf.reduce_sum(p * ap, axis=1, keepdims=True))
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = tf.reduce_sum(r * r, axis=1, keepdims=True)
        p = r + tf.math.divide_no_nan(rs_new, rs) * p
        rs = rs_new
    return x


def _tile_specs(dtype: tf.DType) -> list[tf.TensorSpec]:
    return [
        tf.TensorSpec([None, None], dtype),  # fixed_ext [n_other + 1, k]
        tf.TensorSpec([None, None], dtype),  # w0 · G [k, k]
        tf.TensorSpec([None, None, None], tf.int32),  # cols [T, B, W]
        tf.TensorSpec([None, None, None], dtype),  # f [T, B, W]
        tf.TensorSpec([None, None, None], dtype),  # c [T, B, W]
        tf.TensorSpec([None, None], tf.int32),  # line_rows [T, B]
        tf.TensorSpec([None, None], dtype),  # reg [T, R]
    ]


@functools.cache
def _cholesky_kernel(dtype: tf.DType, multi_line: bool):
    """The exact solve of one sub-tile (`Tile.flat`); never XLA-compiled (its Cholesky
    factorisation is much slower there). Shapes are dynamic."""

    @tf.function(input_signature=_tile_specs(dtype))
    def cholesky_tile(fixed_ext, w0_gramian, cols, f, c, line_rows, reg):
        cols, f, c, line_rows, reg = cols[0], f[0], c[0], line_rows[0], reg[0]
        n_rows = tf.shape(reg)[0]
        y = tf.gather(fixed_ext, cols)  # [B, W, k]
        a = observed_gramians(y, f)  # [B, k, k]
        if multi_line:
            a = tf.math.unsorted_segment_sum(a, line_rows, n_rows)  # [R, k, k]
        rhs = _observed_product(y, c, line_rows, multi_line, n_rows)  # [R, k]
        return solve_normal_equations(a, rhs, w0_gramian, reg)

    return cholesky_tile


@functools.cache
def _cg_kernel(dtype: tf.DType, multi_line: bool, cg_steps: int, jit_compile: bool):
    """The CG tile kernel for one configuration; shapes are dynamic.

    It loops over a tile's sub-tiles: it gathers one sub-tile's factors ([B, W, k], 512 KiB by
    default, so they stay in the L2 cache), runs the CG steps on its rows and moves on, so a
    call costs one launch however many sub-tiles it holds. With `jit_compile` it is
    XLA-compiled once per tile shape; XLA fuses the gathers and the elementwise work around
    the two [B, W, k] contractions of each step, and the loop reuses one buffer for the
    gathered factors. Up to `_MAX_UNROLLED_CG_STEPS` steps are unrolled; more steps use a loop
    so that compile time stays flat.
    """
    specs = _tile_specs(dtype) + [
        tf.TensorSpec([None, None, None], dtype),  # x0 [T, R, k], the sub-tile rows' warm start
        tf.TensorSpec([], tf.int32),  # count: sub-tiles to solve, the first of the T
    ]
    steps = cg_steps if cg_steps <= _MAX_UNROLLED_CG_STEPS else tf.constant(cg_steps)

    @tf.function(input_signature=specs, jit_compile=jit_compile)
    def cg_tile(fixed_ext, w0_gramian, cols, f, c, line_rows, reg, x0, count):
        n_tiles = tf.shape(cols)[0]
        solutions = tf.TensorArray(dtype, size=n_tiles, element_shape=[None, None])

        def solve_one(t, solutions):
            y = tf.gather(fixed_ext, cols[t])  # [B, W, k]
            x = _cg_steps(y, f[t], c[t], line_rows[t], reg[t], x0[t], w0_gramian, multi_line, steps)
            return t + 1, solutions.write(t, x)

        _, solutions = tf.while_loop(lambda t, _: t < count, solve_one, (0, solutions))
        return solutions.stack()  # [T, R, k]; sub-tiles from count on are zeros

    return cg_tile


def _short(tile: Tile, k: int) -> bool:
    """Whether the exact solver takes the Woodbury path for a tile: one line of <= k/2."""
    return not tile.multi_line and 2 * int(tile.cols.shape[2]) <= k


@functools.cache
def _woodbury_kernel(dtype: tf.DType):
    """The exact solve of single-line tiles of width W <= k/2, by Woodbury (module docstring)."""

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None], dtype),  # fixed_ext Q [n_other + 1, k]
            tf.TensorSpec([None], dtype),  # w0 Λ [k], eigenvalues of w0·G
            tf.TensorSpec([None, None], dtype),  # Q [k, k], eigenvectors of G in columns
            tf.TensorSpec([None, None], tf.int32),  # cols [B, W]
            tf.TensorSpec([None, None], dtype),  # f [B, W]
            tf.TensorSpec([None, None], dtype),  # c [B, W]
            tf.TensorSpec([None], dtype),  # reg [B]
        ]
    )
    def woodbury_tile(fixed_rotated, w0_eigenvalues, basis, cols, f, c, reg):
        z = tf.gather(fixed_rotated, cols)  # [B, W, k], Z = Y_u Q
        d = w0_eigenvalues[None, :] + reg[:, None]  # [B, k], D = w0 Λ + λ_u
        v = tf.einsum("bw,bwk->bk", c, z)  # Zᵀ c
        u = tf.sqrt(f)[:, :, None] * z  # U = diag(√f) Z
        u_d = u / d[:, None, :]  # U D⁻¹
        s = tf.matmul(u_d, u, transpose_b=True)  # [B, W, W], U D⁻¹ Uᵀ
        s = tf.linalg.set_diag(s, tf.linalg.diag_part(s) + 1)
        rhs = tf.einsum("bwk,bk->bw", u_d, v)[:, :, None]  # U D⁻¹ v
        t = tf.linalg.cholesky_solve(tf.linalg.cholesky(s), rhs)[:, :, 0]
        solution = (v - tf.einsum("bw,bwk->bk", t, u)) / d  # z = D⁻¹ (v − Uᵀ t)
        return tf.matmul(solution, basis, transpose_b=True)  # x = Q z, as rows

    return woodbury_tile


def solve_planned(
    plan: RowPlan,
    fixed: FloatArray,
    gramian_matrix: FloatArray,
    solver: str = CHOLESKY,
    x0: FloatArray | None = None,
    cg_steps: int = 3,
    jit_compile: bool = True,
    tiles_in_flight: int = DEFAULT_TILES_IN_FLIGHT,
) -> tf.Tensor:
    """Solves every row of a planned block: x_u = A_u⁻¹ b_u (exactly, or by CG from x0).

    The engine of `trainer.core.solver`'s solvers, which callers should use instead.

    Args:
        plan: the block's layout from `trainer.core.plans.plan_rows`.
        fixed: [n_other, k] fixed factors (Y when solving users), or a `FixedTable` of them
            (read without a copy when its dtype is the plan's; a plain array is extended by a
            zero row, i.e. copied, on every call).
        gramian_matrix: [k, k] G = fixedᵀ fixed over all of `fixed`, from `gramian`.
        solver: "cholesky" for the exact solve, "cg" for `cg_steps` conjugate-gradient steps.
        x0: [n_rows, k] warm start for "cg" (the current factors); zeros when None. Unused by
            "cholesky".
        cg_steps: CG iterations per row.
        jit_compile: XLA-compile the CG kernel (about 0.5 s per distinct tile shape, then about
            twice as fast). Turn off for one-off solves of many small blocks.
        tiles_in_flight: tiles solved concurrently (threads); results do not depend on it.

    Returns:
        [n_rows, k] tensor of plan.dtype; rows without observations are 0.
    """
    validate_solver(solver, cg_steps)
    if tiles_in_flight < 1:
        raise ValueError(f"tiles_in_flight must be >= 1, got {tiles_in_flight}")
    dtype = tf.as_dtype(plan.dtype)
    n_rows, n_other = plan.shape
    table = fixed if isinstance(fixed, FixedTable) and fixed.extended.dtype == dtype else None
    if table is not None:
        fixed = table.factors
    else:
        fixed = as_tensor(fixed.factors if isinstance(fixed, FixedTable) else fixed, dtype)
    if fixed.shape.rank != 2 or fixed.shape[0] != n_other:
        raise ValueError(f"fixed must be [{n_other}, k], got {fixed.shape}")
    k = int(fixed.shape[1])
    w0_gramian = plan.w0 * as_tensor(gramian_matrix, dtype)
    if w0_gramian.shape != (k, k):
        raise ValueError(f"gramian must be [{k}, {k}], got {w0_gramian.shape}")
    if table is not None:
        fixed_ext = table.extended  # shared by every solve against the table
    else:
        fixed_ext = tf.concat([fixed, tf.zeros([1, k], dtype)], axis=0)
    if solver == CG:
        x0 = tf.zeros([n_rows, k], dtype) if x0 is None else as_tensor(x0, dtype)
        if x0.shape != (n_rows, k):
            raise ValueError(f"x0 must be [{n_rows}, {k}], got {x0.shape}")
        x0_ext = tf.concat([x0, tf.zeros([1, k], dtype)], axis=0)
    woodbury = solver == CHOLESKY and plan.min_reg > 0
    if woodbury and any(_short(tile.flat(), k) for tile in plan.tiles):

        def eigenbasis():
            values, vectors = tf.linalg.eigh(w0_gramian)
            # G is positive semi-definite; the table rotated into its eigenbasis
            return tf.maximum(values, 0), vectors, tf.matmul(fixed_ext, vectors)

        if table is not None:  # once per table and Gramian, not per solve
            key = ("eigenbasis", w0_gramian.numpy().tobytes())
            eigenvalues, basis, fixed_rotated = table.memo(key, eigenbasis)
        else:
            eigenvalues, basis, fixed_rotated = eigenbasis()

    def solve_tile(tile: Tile) -> tf.Tensor:
        """[T · R, k] the solutions of a tile's rows, sub-tile after sub-tile."""
        if solver == CG:
            arrays = _tensors(tile)
            kernel = _cg_kernel(dtype, tile.multi_line, int(cg_steps), jit_compile)
            # Without XLA the padding sub-tiles are solved too (to 0): the loop writes all T.
            count = tile.count if jit_compile else int(tile.cols.shape[0])
            # The warm start is gathered here, not in the kernel: the kernel's shapes are then
            # the tile's alone, not the block's row count, so a worker compiles each tile shape
            # once for all the blocks it solves.
            solutions = kernel(
                fixed_ext,
                w0_gramian,
                *(arrays[name] for name in _TILE_ARRAYS),
                tf.gather(x0_ext, arrays["rows"]),
                tf.constant(count, tf.int32),
            )
            return tf.reshape(solutions, [-1, k])
        tile = tile.flat()
        arrays = _tensors(tile)
        if woodbury and _short(tile, k):
            cols, f, c, reg = (arrays[name][0] for name in ("cols", "f", "c", "reg"))
            return _woodbury_kernel(dtype)(fixed_rotated, eigenvalues, basis, cols, f, c, reg)
        kernel = _cholesky_kernel(dtype, tile.multi_line)
        return kernel(fixed_ext, w0_gramian, *(arrays[name] for name in _TILE_ARRAYS))

    with concurrent.futures.ThreadPoolExecutor(tiles_in_flight) as pool:
        outputs = list(pool.map(solve_tile, plan.tiles))
    outputs.append(tf.zeros([1, k], dtype))
    return tf.gather(tf.concat(outputs, axis=0), plan.gather_index)


def warm_up(
    shapes,
    n_other: int,
    k: int,
    dtype: tf.DType = tf.float32,
    cg_steps: int = 3,
) -> None:
    """XLA-compiles the CG kernel for tiles of `shapes` ((T, B, W, R, multi_line), from
    `trainer.core.tiling.kernel_shapes`) against n_other fixed rows of k factors, by running it
    on zeros with no sub-tile to solve. A process that solves many blocks (a Beam worker)
    compiles every shape of a side at once, rather than one block's shapes each time it meets
    a new block."""
    dtype = tf.as_dtype(dtype)
    fixed_ext = tf.zeros([n_other + 1, k], dtype)
    w0_gramian = tf.zeros([k, k], dtype)
    for n_tiles, size, width, n_rows, multi_line in sorted(shapes):
        kernel = _cg_kernel(dtype, bool(multi_line), int(cg_steps), True)
        kernel(
            fixed_ext,
            w0_gramian,
            tf.zeros([n_tiles, size, width], tf.int32),
            tf.zeros([n_tiles, size, width], dtype),
            tf.zeros([n_tiles, size, width], dtype),
            tf.zeros([n_tiles, size], tf.int32),
            tf.ones([n_tiles, n_rows], dtype),
            tf.zeros([n_tiles, n_rows, k], dtype),
            tf.constant(0, tf.int32),
        )
