"""Times one WALS iteration (row sweep + column sweep) of each solver on a random power-law matrix.

    python -m benchmarks.solver_speed --users 100000 --items 20000 --nnz 5000000 --k 64

User activity and item popularity both follow Zipf-like laws (p ∝ rank^-a), so row lengths span
1 to thousands like real session logs. Each solver is warmed up (tracing) on one iteration,
then timed over --repeats iterations; the planning step (layout of the matrix, once per fit)
is timed separately. On a shared machine the CPU seconds (all threads) are the steadier number.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import tensorflow as tf

from trainer import problem, weights
from trainer import solver as wals_solver
from trainer.config import WALSConfig
from trainer.sparse import CsrMatrix

logger = logging.getLogger(__name__)


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--nnz", type=int, default=5_000_000)
    parser.add_argument("--k", type=int, default=64, help="latent factors")
    parser.add_argument("--solver", choices=wals_solver.SOLVERS + ("all",), default="all")
    parser.add_argument("--cg_steps", type=int, default=3)
    parser.add_argument("--exponent", type=float, default=0.8, help="Zipf exponent a")
    parser.add_argument("--repeats", type=int, default=2, help="timed iterations per solver")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    start = time.perf_counter()
    matrix = power_law_matrix(args.users, args.items, args.nnz, args.exponent, args.seed)
    transposed = matrix.transpose()
    logger.info(
        "matrix %d x %d, nnz %d, longest row %d, longest column %d (%.1f s to generate)",
        *matrix.shape,
        matrix.nnz,
        matrix.row_counts().max(),
        transposed.row_counts().max(),
        time.perf_counter() - start,
    )
    config = WALSConfig(
        latent_factors=args.k,
        unobserved_weight=0.1,
        regularization=0.1,
        regularization_exp=1.0,
        weighting=weights.CONFIDENCE,
        confidence_alpha=10.0,
    )
    counts = matrix.col_counts()
    users = problem.define_rows(matrix, problem.USERS, counts, config)
    items = problem.define_rows(transposed, problem.ITEMS, counts, config)

    rng = np.random.default_rng(args.seed)
    solvers = wals_solver.SOLVERS if args.solver == "all" else (args.solver,)
    for name in solvers:
        start = time.perf_counter()
        user_plan = users.plan(name)
        item_plan = items.plan(name)
        logger.info(
            "%-8s plan: %.2f s; %d + %d tiles of %d shapes, padding %.1f%% / %.1f%%",
            name,
            time.perf_counter() - start,
            len(user_plan.tiles),
            len(item_plan.tiles),
            len(user_plan.tile_shapes | item_plan.tile_shapes),
            100.0 * (user_plan.padded_slots / matrix.nnz - 1),
            100.0 * (item_plan.padded_slots / matrix.nnz - 1),
        )
        x = tf.constant(rng.normal(0, 0.01, (args.users, args.k)).astype(np.float32))
        y = tf.constant(rng.normal(0, 0.01, (args.items, args.k)).astype(np.float32))
        timings = []
        cpu_timings = []
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            cpu_start = time.process_time()
            x = wals_solver.solve_planned(
                user_plan, y, wals_solver.gramian(y), name, x, args.cg_steps
            )
            y = wals_solver.solve_planned(
                item_plan, x, wals_solver.gramian(x), name, y, args.cg_steps
            )
            _ = y.numpy()
            timings.append(time.perf_counter() - start)
            cpu_timings.append(time.process_time() - cpu_start)
        logger.info(
            "%-8s first iteration (includes tracing and XLA compiles): %.2f s", name, timings[0]
        )
        timings, cpu_timings = timings[1:], cpu_timings[1:]
        start = time.perf_counter()
        loss = problem.loss(users, items, x, y)
        logger.info(
            "%-8s %.3f s per iteration (best of %d; %s), %.3f CPU s; loss %.6g in %.2f s",
            name,
            min(timings),
            len(timings),
            ", ".join(f"{t:.3f}" for t in timings),
            min(cpu_timings),
            loss["total"],
            time.perf_counter() - start,
        )


if __name__ == "__main__":
    main()
