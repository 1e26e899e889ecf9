"""Seconds per WALS iteration of our solvers and implicit's, on one matrix, in one process.

    python -m benchmarks.solver_speed [--matrix synthetic|power_law] [--users 100000]
        [--items 20000] [--nnz 5000000] [--k 64] [--repeats 3] [--solver all|cg|cholesky]

An iteration is a row sweep and a column sweep. Both libraries solve the same model, the one
`benchmarks.train_benchmark` compares them on (Hu, Koren & Volinsky's): preference 1 and weight
1 + α r on observed cells, preference 0 and weight 1 elsewhere, plain λ. Ours runs it as
`weighting="confidence"`, w0 = 1, `binary_target=True`, ν = 0; implicit is given the matrix
1 + α r. Both use 2 threads (TensorFlow's intra- and inter-op pools; implicit's num_threads with
BLAS pinned to 1 thread) and start from the same random factors.

The matrix is `benchmarks.matrices.synthetic_matrix` (the train benchmark's, default) or a
power law in both users and items (`power_law_matrix`). Ours is timed as
`trainer.local.train.fit` runs it: `Solver.solve` (`trainer.core.solver.solver_for`) on plans
built once (the planning is timed separately), the Gramian, and both factor tables copied to
NumPy. implicit's is its solver function (`_als.least_squares_cg` or `_als.least_squares`, BLAS
pinned to 1 thread) on both sides, as its `fit` runs it. Each solver is warmed up by one untimed
iteration (tracing and XLA compiles for ours), then the solvers take turns for --repeats rounds,
so that a slow spell of the machine hits them alike. The table gives the median, min and max
seconds per iteration, our time divided by implicit's CG time in the same round, and the loss
(`trainer.core.loss.loss`, the same objective for both) at each one's factors after the same
number of iterations from the same start.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import time
from collections.abc import Callable

import numpy as np

from benchmarks import matrices
from benchmarks.measure import blas_threads
from trainer.core.sparse import CsrMatrix

logger = logging.getLogger(__name__)

THREADS = 2
OURS = "ours"
IMPLICIT = "implicit"


def power_law_matrix(n_users: int, n_items: int, nnz: int, exponent: float, seed: int) -> CsrMatrix:
    """A random n_users x n_items matrix with about `nnz` entries, ratings uniform in (0, 1].

    Args:
        n_users: rows.
        n_items: columns.
        nnz: target number of distinct entries (duplicates are resampled away approximately).
        exponent: a of the Zipf laws p(rank) ∝ rank^-a for rows and columns.
        seed: NumPy Generator seed.

    Returns:
        The matrix; its nnz is within a few percent of `nnz`.
    """
    rng = np.random.default_rng(seed)
    user_p = np.arange(1, n_users + 1, dtype=np.float64) ** -exponent
    item_p = np.arange(1, n_items + 1, dtype=np.float64) ** -exponent
    user_p /= user_p.sum()
    item_p /= item_p.sum()
    rows = np.zeros(0, np.int64)
    cols = np.zeros(0, np.int64)
    draw = nnz
    for _ in range(8):
        rows = np.concatenate([rows, rng.choice(n_users, size=draw, p=user_p)])
        cols = np.concatenate([cols, rng.choice(n_items, size=draw, p=item_p)])
        keys = np.unique(rows * n_items + cols)
        if keys.size >= nnz:
            keys = rng.choice(keys, size=nnz, replace=False)
            break
        rows, cols = keys // n_items, keys % n_items
        draw = int((nnz - keys.size) * 1.5) + 1
    rows, cols = keys // n_items, keys % n_items
    values = rng.uniform(0.0, 1.0, size=rows.size) + 1e-3
    return CsrMatrix.from_triples(rows, cols, values, (n_users, n_items))


@dataclasses.dataclass
class Contestant:
    """One (library, solver): a callable that runs one iteration in place, and its timings.

    Attributes:
        library: OURS or IMPLICIT.
        solver: "cg" or "cholesky".
        iterate: runs one row sweep and one column sweep, updating its own factors.
        factors: its current (user factors [n_users, k], item factors [n_items, k]).
        seconds: wall seconds of each timed iteration.
    """

    library: str
    solver: str
    iterate: Callable[[], None]
    factors: Callable[[], tuple]
    seconds: list[float] = dataclasses.field(default_factory=list)


def equal_config(args, solver: str = "cg"):
    """Our `WALSConfig` of implicit's model: w0 = 1, f = α r, target 1, plain λ."""
    from trainer.core import objective
    from trainer.core.objective import WALSConfig

    return WALSConfig(
        latent_factors=args.k,
        unobserved_weight=1.0,
        regularization=args.regularization,
        regularization_exp=0.0,
        weighting=objective.CONFIDENCE,
        confidence_alpha=args.alpha,
        binary_target=True,
        solver=solver,
        cg_steps=args.cg_steps,
    )


def ours(matrix: CsrMatrix, args, solver: str, x0: np.ndarray, y0: np.ndarray) -> Contestant:
    """Our trainer's iteration (as in `trainer.local.train.fit`) on plans built here, timed once."""
    import tensorflow as tf

    from trainer.core import problem
    from trainer.core.solver import solver_for

    config = equal_config(args, solver)
    chosen = solver_for(config)
    start = time.perf_counter()
    counts = matrix.col_counts()
    users = problem.define_rows(matrix, problem.USERS, counts, config)
    items = problem.define_rows(matrix.transpose(), problem.ITEMS, counts, config)
    user_plan = chosen.plan(users)
    item_plan = chosen.plan(items)
    logger.info(
        "ours %-8s: problems and plans in %.2f s; %d + %d tiles of %d shapes, padding "
        "%.1f%% / %.1f%%",
        solver,
        time.perf_counter() - start,
        len(user_plan.tiles),
        len(item_plan.tiles),
        len(user_plan.tile_shapes | item_plan.tile_shapes),
        100.0 * (user_plan.solved_slots / matrix.nnz - 1),
        100.0 * (item_plan.solved_slots / matrix.nnz - 1),
    )
    state = {"x": tf.constant(x0), "y": tf.constant(y0)}

    def iterate() -> None:
        x = chosen.solve(user_plan, state["y"], x0=state["x"])
        y = chosen.solve(item_plan, x, x0=state["y"])
        x.numpy(), y.numpy()
        state.update(x=x, y=y)

    return Contestant(OURS, solver, iterate, lambda: (state["x"], state["y"]))


def implicit_als(matrix: CsrMatrix, args, solver: str, x0: np.ndarray, y0: np.ndarray):
    """implicit's iteration, as its `AlternatingLeastSquares.fit` runs it, on C = 1 + α r."""
    import scipy.sparse
    from implicit.cpu import _als

    confidence = scipy.sparse.csr_matrix(
        ((1.0 + args.alpha * matrix.values).astype(np.float32), matrix.indices, matrix.indptr),
        shape=matrix.shape,
    )
    transposed = confidence.T.tocsr()
    x, y = x0.copy(), y0.copy()
    if solver == "cg":

        def sweep(cui, rows, fixed):
            _als.least_squares_cg(
                cui, rows, fixed, args.regularization, THREADS, cg_steps=args.cg_steps
            )
    else:

        def sweep(cui, rows, fixed):
            _als.least_squares(cui, rows, fixed, args.regularization, THREADS)

    def iterate() -> None:
        with blas_threads(1):
            sweep(confidence, x, y)
            sweep(transposed, y, x)

    return Contestant(IMPLICIT, solver, iterate, lambda: (x, y))


def _summary(values: list[float]) -> str:
    """'median (min–max)' of a list of numbers."""
    return f"{statistics.median(values):7.3f} ({min(values):.3f}–{max(values):.3f})"


def main(argv: list[str] | None = None) -> dict[tuple[str, str], list[float]]:
    """Runs the benchmark and prints its table; returns {(library, solver): s per iteration}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrix", choices=("synthetic", "power_law"), default="synthetic")
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--nnz", type=int, default=5_000_000)
    parser.add_argument("--k", type=int, default=64, help="latent factors")
    parser.add_argument("--solver", choices=("cg", "cholesky", "all"), default="all")
    parser.add_argument("--library", choices=(OURS, IMPLICIT, "all"), default="all")
    parser.add_argument("--cg_steps", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=10.0, help="confidence scale α")
    parser.add_argument("--regularization", type=float, default=100.0, help="λ")
    parser.add_argument("--exponent", type=float, default=0.8, help="power_law's Zipf exponent")
    parser.add_argument("--repeats", type=int, default=3, help="timed iterations per solver")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import tensorflow as tf

    from trainer.core.xla import configure_xla

    configure_xla()  # before the first XLA compile, as the trainer does
    tf.config.threading.set_intra_op_parallelism_threads(THREADS)
    tf.config.threading.set_inter_op_parallelism_threads(THREADS)

    start = time.perf_counter()
    if args.matrix == "synthetic":
        matrix = matrices.synthetic_matrix(args.users, args.items, args.nnz, seed=args.seed)
    else:
        matrix = power_law_matrix(args.users, args.items, args.nnz, args.exponent, args.seed)
    logger.info(
        "%s matrix %d x %d, nnz %d, longest row %d, longest column %d (%.1f s to generate)",
        args.matrix,
        *matrix.shape,
        matrix.nnz,
        matrix.row_counts().max(),
        matrix.col_counts().max(),
        time.perf_counter() - start,
    )
    rng = np.random.default_rng(args.seed)
    x0 = (rng.random((matrix.shape[0], args.k), dtype=np.float32) * 0.01).astype(np.float32)
    y0 = (rng.random((matrix.shape[1], args.k), dtype=np.float32) * 0.01).astype(np.float32)
    solvers = ("cg", "cholesky") if args.solver == "all" else (args.solver,)
    libraries = (OURS, IMPLICIT) if args.library == "all" else (args.library,)
    contestants = []
    for solver in solvers:
        for library in libraries:
            make = ours if library == OURS else implicit_als
            contestant = make(matrix, args, solver, x0, y0)
            start = time.perf_counter()
            contestant.iterate()
            logger.info(
                "%s %-8s: first iteration (warm-up, tracing and compiles) %.2f s",
                library,
                solver,
                time.perf_counter() - start,
            )
            contestants.append(contestant)
    for _ in range(args.repeats):
        for contestant in contestants:
            start = time.perf_counter()
            contestant.iterate()
            contestant.seconds.append(time.perf_counter() - start)

    reference = next((c for c in contestants if (c.library, c.solver) == (IMPLICIT, "cg")), None)
    print(
        f"\n{matrix.shape[0]} x {matrix.shape[1]}, nnz {matrix.nnz}, k {args.k}, "
        f"{args.cg_steps} CG steps, {THREADS} threads, {args.repeats} timed iterations after "
        f"{1} warm-up; median (min–max)"
    )
    from trainer.core import problem
    from trainer.core.loss import loss as wals_loss

    config = equal_config(args)
    counts = matrix.col_counts()
    users = problem.define_rows(matrix, problem.USERS, counts, config)
    items = problem.define_rows(matrix.transpose(), problem.ITEMS, counts, config)
    print(f"{'library':<9} {'solver':<9} {'s/iter':>22} {'x implicit cg':>26} {'loss':>14}")
    for c in contestants:
        # The same objective for both: our loss at each one's factors after the same iterations.
        loss = wals_loss(users, items, *c.factors())["total"]
        ratio = "-"
        if reference is not None:
            ratio = _summary([a / b for a, b in zip(c.seconds, reference.seconds, strict=True)])
        print(f"{c.library:<9} {c.solver:<9} {_summary(c.seconds):>22} {ratio:>26} {loss:14.8g}")
    return {(c.library, c.solver): c.seconds for c in contestants}


if __name__ == "__main__":
    main()
