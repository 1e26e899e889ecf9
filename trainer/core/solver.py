"""The one solver interface: choose a solver once, then plan and solve blocks of rows.

    solver = solver_for(config)            # from WALSConfig.solver and .cg_steps, once
    plan = solver.plan(problem)            # a block's tiles (`trainer.core.problem.RowProblem`)
    x = solver.solve(plan, fixed, x0=x)    # every row's x_u against the fixed factors

As in Spark's ALS, the solver is an interface chosen once (there Cholesky or NNLS); callers
then never name it again. Both solvers solve, for every row u of a block, the same normal
equations, written once in `trainer.core.problem`'s docstring (with what f, t and λ are under
each weighting):

    ExactSolver              "cholesky": exactly, by Cholesky (Woodbury for short rows).
    ConjugateGradientSolver  "cg": `steps` conjugate-gradient steps warm-started from x0 (the
                             current factors), as in implicit's CG; XLA-compiled per tile shape.

The room is split by what each part holds: `trainer.core.tiling` (how rows are cut into tiles,
from their lengths; NumPy), `trainer.core.plans` (the tiles filled with a block's entries;
NumPy, picklable), `trainer.core.kernels` (the TensorFlow kernels) and `trainer.core.loss`.
The names after the interface in `__all__` are re-exported for the callers of the kernels'
engine (`solve_planned` and friends) and of the layout.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar

import numpy as np
import tensorflow as tf

from trainer.core import kernels
from trainer.core.fixed_table import FixedTable
from trainer.core.kernels import (
    DEFAULT_TILES_IN_FLIGHT,
    gramian,
    observed_gramians,
    solve_normal_equations,
    solve_planned,
    warm_up,
)
from trainer.core.plans import RowPlan, RowsToPlan, Tile, as_numpy_dtype, plan_rows
from trainer.core.tiling import (
    CG,
    CHOLESKY,
    DEFAULT_CHUNK_ROWS,
    DEFAULT_TILES,
    SOLVERS,
    TileShape,
    kernel_shapes,
    validate_solver,
)

__all__ = [
    "Solver",
    "ExactSolver",
    "ConjugateGradientSolver",
    "solver_for",
    # Re-exported: the names callers of the kernels' engine and the layout import from here.
    "CG",
    "CHOLESKY",
    "SOLVERS",
    "DEFAULT_CHUNK_ROWS",
    "DEFAULT_TILES",
    "DEFAULT_TILES_IN_FLIGHT",
    "TileShape",
    "Tile",
    "RowPlan",
    "plan_rows",
    "kernel_shapes",
    "validate_solver",
    "gramian",
    "observed_gramians",
    "solve_normal_equations",
    "solve_planned",
    "warm_up",
]

FloatArray = np.ndarray | tf.Tensor


@dataclasses.dataclass(frozen=True)
class Solver(abc.ABC):
    """A row solver: plans blocks of rows once, then solves them every iteration.

    Attributes:
        dtype: the float dtype of the plans and the kernels (float32; float64 for tests);
            a NumPy dtype or a `tf.DType`, kept as a NumPy dtype.
        chunk_rows: rows sorted and tiled together when planning; results do not depend on it
            beyond round-off.
        tile_shape: the tile sizes; the solver's `DEFAULT_TILES` when None.
        tiles_in_flight: tiles solved concurrently (threads); results do not depend on it.
    """

    name: ClassVar[str]

    dtype: np.dtype = np.dtype(np.float32)
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    tile_shape: TileShape | None = None
    tiles_in_flight: int = DEFAULT_TILES_IN_FLIGHT

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", as_numpy_dtype(self.dtype))
        if self.chunk_rows < 1 or self.tiles_in_flight < 1:
            raise ValueError("chunk_rows and tiles_in_flight must be >= 1")

    @property
    def tf_dtype(self) -> tf.DType:
        return tf.as_dtype(self.dtype)

    def plan(self, problem: RowsToPlan) -> RowPlan:
        """The tiles of a block's problem (f_ui, c_ui = (w0 + f_ui)·t_ui, λ_u), built once and
        reused every iteration; the one place a trainer lays rows out."""
        return plan_rows(
            problem.targets,
            problem.f,
            problem.reg,
            problem.w0,
            solver=self.name,
            dtype=self.dtype,
            chunk_rows=self.chunk_rows,
            tile_shape=self.tile_shape,
        )

    def gramian(self, factors: FloatArray) -> tf.Tensor:
        """G = FᵀF, [k, k] in the solver's dtype."""
        return gramian(factors, self.tf_dtype)

    @abc.abstractmethod
    def solve(
        self,
        plan: RowPlan,
        fixed: FloatArray,
        gramian_matrix: FloatArray | None = None,
        x0: FloatArray | None = None,
    ) -> tf.Tensor:
        """Solves every row of a planned block.

        Args:
            plan: the block's tiles, from `plan`.
            fixed: [n_other, k] the fixed side's factors (Y when solving users), or a
                `FixedTable` of them, which many solves (and threads) share without a copy.
            gramian_matrix: [k, k] G = fixedᵀ fixed over the whole fixed side; computed from
                `fixed` when None (pass it when `fixed` is only the rows a block touches).
            x0: [n_rows, k] the block's current factors, the warm start of iterative solvers.

        Returns:
            [n_rows, k] tensor of plan.dtype; rows without observations are 0.
        """

    def kernel_shapes(self, lengths: np.ndarray) -> frozenset[tuple[int, int, int, int, bool]]:
        """The (T, B, W, R, multi_line) of the tiles of rows of these lengths (`warm_up`)."""
        return kernel_shapes(lengths, self.name, self.chunk_rows, self.tile_shape)

    @abc.abstractmethod
    def warm_up(self, shapes, n_other: int, k: int) -> None:
        """Compiles ahead the kernels of tiles of `shapes` ((T, B, W, R, multi_line), from
        `kernel_shapes`) against n_other fixed rows of k factors, so that a process that solves
        many blocks (a Beam worker) compiles a side's shapes at once; a no-op for solvers that
        are not XLA-compiled."""

    def _gramian_of(self, plan: RowPlan, fixed, given: FloatArray | None):
        if given is not None:
            return given
        return gramian(
            fixed.factors if isinstance(fixed, FixedTable) else fixed, tf.as_dtype(plan.dtype)
        )


@dataclasses.dataclass(frozen=True)
class ExactSolver(Solver):
    """x_u = A_u⁻¹ b_u exactly (`trainer.core.kernels`: Cholesky, Woodbury for short rows)."""

    name: ClassVar[str] = CHOLESKY

    def solve(self, plan, fixed, gramian_matrix=None, x0=None) -> tf.Tensor:
        gramian_matrix = self._gramian_of(plan, fixed, gramian_matrix)
        return solve_planned(
            plan, fixed, gramian_matrix, CHOLESKY, tiles_in_flight=self.tiles_in_flight
        )

    def warm_up(self, shapes, n_other: int, k: int) -> None:
        """Nothing to compile: the exact kernels are traced, never XLA-compiled."""


@dataclasses.dataclass(frozen=True)
class ConjugateGradientSolver(Solver):
    """`steps` CG steps on A_u x_u = b_u from x0 (zeros when None).

    Attributes:
        steps: CG steps per solve, >= 1.
        jit_compile: XLA-compile the kernel (about 0.5 s per distinct tile shape, then about
            twice as fast); turn off for one-off solves of many small blocks.
    """

    name: ClassVar[str] = CG

    steps: int = 3
    jit_compile: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_solver(CG, self.steps)

    def solve(self, plan, fixed, gramian_matrix=None, x0=None) -> tf.Tensor:
        gramian_matrix = self._gramian_of(plan, fixed, gramian_matrix)
        return solve_planned(
            plan,
            fixed,
            gramian_matrix,
            CG,
            x0=x0,
            cg_steps=self.steps,
            jit_compile=self.jit_compile,
            tiles_in_flight=self.tiles_in_flight,
        )

    def warm_up(self, shapes, n_other: int, k: int) -> None:
        if self.jit_compile:
            kernels.warm_up(shapes, n_other, k, self.tf_dtype, self.steps)


def solver_for(config, dtype=np.float32, **options) -> Solver:
    """The solver a config names (`WALSConfig.solver`, with `cg_steps` for CG).

    Args:
        config: the hyperparameters (a `trainer.core.objective.WALSConfig`).
        dtype: the float dtype of plans and kernels (NumPy or TensorFlow).
        **options: `Solver` attributes (chunk_rows, tile_shape, tiles_in_flight) and, for CG,
            jit_compile.
    """
    validate_solver(config.solver, config.cg_steps)
    if config.solver == CG:
        return ConjugateGradientSolver(dtype=dtype, steps=int(config.cg_steps), **options)
    options.pop("jit_compile", None)  # the exact solver is never XLA-compiled
    return ExactSolver(dtype=dtype, **options)
