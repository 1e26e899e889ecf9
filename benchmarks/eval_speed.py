"""Cost of trainer.task's per-iteration evaluation against one training iteration, in one run.

On a synthetic matrix of `benchmarks.matrices` (default the large one, 100K users x 20K items x
5M cells, 20% of the cells held out), our CG trainer runs --iters iterations with the
evaluation trainer.task does after each one called from the fit callback, exactly as
trainer.task calls it; the training iteration's time is the time between two callbacks less the
evaluation. A first 1-iteration fit compiles the CG kernel and is not timed. Each figure is the
median of the --iters iterations, with the minimum and maximum; the evaluation is timed both as
trainer.task runs it per iteration (on its sample of users, `--eval_users`) and on every user
with a held-out item (what the final evaluation scores).

    flock /tmp/ga-heavy.lock python -m benchmarks.eval_speed [--size large] [--iters 3]
        [--eval_users N] [--json_out out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time

import numpy as np

from benchmarks import matrices, train_benchmark
from trainer import task, training
from trainer.core import metrics

logger = logging.getLogger(__name__)

KS = (10, 20, 50)  # trainer.task's default --eval_ks


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "all": [round(v, 4) for v in values],
    }


def run(size: str, iters: int, eval_users: int | None, seed: int = 0) -> dict:
    """Times `iters` training iterations and, after each, the per-iteration and the full
    evaluation; returns {"iteration", "eval_sampled", "eval_full"}: {median, min, max, all}
    in seconds, and the metrics of the last evaluations."""
    from trainer.core.objective import WALSConfig
    from trainer.local import train as local_train

    train_benchmark._set_tensorflow_threads(train_benchmark.THREADS)
    full = matrices.synthetic_matrix(*matrices.SIZES[size], seed=seed)
    train, heldout = matrices.split_cells(full, train_benchmark.EVAL_FRACTION, seed)
    config = WALSConfig(
        latent_factors=64,
        num_iters=1,
        solver="cg",
        confidence_alpha=10.0,
        regularization=300.0,
        seed=seed,
        **train_benchmark.OURS_FIXED,
    )
    local_train.fit(train, config, show_progress=False, compute_loss=False)  # compiles, untimed
    sampled = _per_iteration_evaluation(train, heldout, eval_users, seed)
    times: dict[str, list[float]] = {"iteration": [], "eval_sampled": [], "eval_full": []}
    last: dict[str, dict] = {}
    mark = [0.0]

    def callback(iteration: int, factors, loss) -> None:
        times["iteration"].append(time.perf_counter() - mark[0])
        for name, evaluate in (("eval_sampled", sampled), ("eval_full", None)):
            start = time.perf_counter()
            if evaluate is None:
                last[name] = metrics.evaluate(training._scorer(factors), train, heldout, ks=KS)
            else:
                last[name] = evaluate(factors)
            times[name].append(time.perf_counter() - start)
            logger.info("iteration %d: %s %.3f s", iteration, name, times[name][-1])
        mark[0] = time.perf_counter()

    config = WALSConfig(**{**config.__dict__, "num_iters": iters})
    mark[0] = time.perf_counter()
    local_train.fit(train, config, callback=callback, show_progress=False, compute_loss=False)
    result = {name: _summary(values) for name, values in times.items()}
    result.update(
        size=size,
        shape=list(train.shape),
        train_nnz=train.nnz,
        heldout_nnz=heldout.nnz,
        users_with_heldout=int(np.count_nonzero(heldout.row_counts())),
        metrics=last,
    )
    return result


def _per_iteration_evaluation(train, heldout, eval_users, seed):
    """factors -> metrics: what trainer.task evaluates after each iteration."""
    if not hasattr(task, "per_iteration_evaluator"):  # before the sampled evaluation existed
        return lambda factors: metrics.evaluate(training._scorer(factors), train, heldout, ks=KS)
    eval_users = task.EVAL_USERS if eval_users is None else eval_users
    return task.per_iteration_evaluator(train, heldout, KS, eval_users, seed)


def format_table(result: dict) -> str:
    lines = [
        f"{result['size']} matrix {result['shape'][0]:,} x {result['shape'][1]:,}, "
        f"{result['train_nnz']:,} train / {result['heldout_nnz']:,} held-out cells, "
        f"{result['users_with_heldout']:,} users with held-out cells",
        f"{'':<34} {'median s':>9} {'min':>8} {'max':>8} {'x iteration':>12}",
    ]
    iteration = result["iteration"]["median"]
    for name, label in (
        ("iteration", "training iteration (ours CG)"),
        ("eval_sampled", "per-iteration evaluation"),
        ("eval_full", "evaluation of every user"),
    ):
        row = result[name]
        users = result["metrics"].get(name, {}).get("users_evaluated", "")
        lines.append(
            f"{label:<34} {row['median']:>9.3f} {row['min']:>8.3f} {row['max']:>8.3f} "
            f"{row['median'] / iteration:>12.2f}" + (f"   ({users:,} users)" if users else "")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(matrices.SIZES), default="large")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations (default 3)")
    parser.add_argument(
        "--eval_users", type=int, default=None, help="trainer.task's --eval_users (its default)"
    )
    parser.add_argument("--json_out", help="also write the result as JSON to this path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    result = run(args.size, args.iters, args.eval_users)
    print(format_table(result))
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
