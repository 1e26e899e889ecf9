"""One training run: load the dataset, fit WALS (locally or on Beam), evaluate, and write the
model directory. `trainer.task` checks the flags and stages the output; this module fills it.

Under `out` (a staging directory that `trainer.task` publishes as --output_dir):
    model/          factors, vocabularies, seen items, config (`trainer.serving.model.save`)
    export/         the SavedModel (`trainer.serving.export`)
    metrics.json    `METRICS_FILE`: final metrics of WALS and popularity, the per-iteration
                    history (each entry names its iteration and holds "loss/*" only where the
                    loss was computed, "eval/*" only where the evaluation ran), timings, config
    tensorboard/    the same curves for TensorBoard
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections.abc import Callable

import numpy as np
import tensorflow as tf
from apache_beam.io.filesystems import FileSystems

from common import cli
from trainer.beam import evaluate as beam_evaluate
from trainer.beam import train as distributed
from trainer.core import metrics, seeding
from trainer.core.factors import WALSFactors
from trainer.core.objective import WALSConfig
from trainer.evaluation import new_visitors
from trainer.local import dataset as data
from trainer.local import train as local_train
from trainer.local import warm_start
from trainer.serving import export
from trainer.serving import model as model_lib

logger = logging.getLogger(__name__)
METRICS_FILE = "metrics.json"


def _summaries(writer, step: int, values: dict, prefix: str) -> None:
    with writer.as_default(step=step):
        for name, value in values.items():
            if isinstance(value, (int, float)) and np.isfinite(value):
                tf.summary.scalar(f"{prefix}/{name}", value)
    writer.flush()


def _scorer(factors: WALSFactors):
    """userIds int [b] -> their scores X[users] Yᵀ, ranked chunk by chunk of items
    (`metrics.factor_scorer`)."""
    return metrics.factor_scorer(factors.user_factors, factors.item_factors)


def per_iteration_evaluator(
    train, heldout, ks: tuple[int, ...], eval_users: int, seed: int, item_chunk: int = 0
) -> Callable[[WALSFactors], dict]:
    """factors -> `metrics.evaluate` of them on a fixed seeded sample of `eval_users` of the
    users with held-out items (all of them when eval_users is 0 or exceeds their number): the
    evaluation of the per-iteration history. Its "users_evaluated" says how many were scored;
    the same users every iteration, so the curve's steps are not sampling noise."""
    users = metrics.sample_users(heldout, eval_users, seed) if eval_users > 0 else None
    return lambda factors: metrics.evaluate(
        _scorer(factors), train, heldout, ks=ks, users=users, item_chunk=item_chunk
    )


def _train_distributed(
    args, config, dataset, beam_argv: list[str], out: str, warm
) -> distributed.DistributedResult:
    """Runs the Beam trainer; per-iteration evaluation needs the factors of every iteration,
    which the distributed run does not keep, so the history holds the losses only."""
    result = distributed.train(
        dataset,
        args.input_dir,
        config,
        args.output_dir,
        beam_argv,
        exchange=args.factor_exchange,
        block_rows=args.block_rows,
        loss_every=args.loss_every,
        fail_after=args.test_fail_after_sweep,
        warm_start=warm,
    )
    args.checkpoint_dir = result.checkpoint_dir
    if args.eval_every:
        logger.warning("--eval_every is ignored with --distributed: metrics.json has final ones")
    args.eval_every = 0
    return result


def train_and_evaluate(
    args: argparse.Namespace,
    config: WALSConfig,
    out: str,
    beam_argv: list[str] | None = None,
) -> dict:
    """Loads, trains, evaluates and writes everything under `out`; returns metrics.json.

    Args:
        args: `trainer.task`'s checked flags (loss_every and eval_every resolved to numbers).
        config: the WALS hyperparameters of those flags.
        out: the staging directory to fill.
        beam_argv: Beam pipeline options, for --distributed.
    """
    dataset = data.load_dataset(args.input_dir)
    train, heldout = dataset.train, dataset.heldout
    writer = tf.summary.create_file_writer(f"{out}/tensorboard")
    history = []
    chunk = args.score_item_chunk
    evaluate = per_iteration_evaluator(
        train, heldout, args.eval_ks, args.eval_users, args.seed, chunk
    )

    # Wall seconds of each iteration after the first (which also holds the set-up and the
    # kernels' compilation), the callback's own work (evaluation) left out.
    iteration_seconds = {}
    last_end = [None]

    def on_iteration(iteration: int, factors, loss: dict | None) -> None:
        if last_end[0] is not None and not args.distributed:
            iteration_seconds[iteration] = time.monotonic() - last_end[0]
        record = {"iteration": iteration}
        if loss is not None:
            record.update({f"loss/{k}": float(v) for k, v in loss.items() if k != "iteration"})
        if args.eval_every and iteration % args.eval_every == 0 and heldout.nnz:
            record.update({f"eval/{k}": v for k, v in evaluate(factors).items()})
        history.append(record)
        _summaries(writer, iteration, {k: v for k, v in record.items() if k != "iteration"}, "wals")
        last_end[0] = time.monotonic()

    warm = None
    if args.warm_start_from:
        try:
            warm = warm_start.from_model(args.warm_start_from, dataset.users, dataset.items, config)
        except (FileNotFoundError, ValueError) as error:
            raise cli.UsageError(f"--warm_start_from {args.warm_start_from}: {error}") from None
    start = time.monotonic()
    if args.distributed:
        trained = _train_distributed(args, config, dataset, beam_argv, out, warm)
        factors = trained.factors
        iteration_seconds.update(trained.iteration_seconds)
        for loss in factors.history:
            on_iteration(loss["iteration"], factors, loss)
    else:
        factors = local_train.fit(
            train,
            config,
            callback=on_iteration,
            show_progress=not args.no_progress,
            user_keys=seeding.id_keys(dataset.users),
            item_keys=seeding.id_keys(dataset.items),
            compute_loss=args.loss_every > 0,
            loss_every=max(args.loss_every, 1),
            initial=warm.factors if warm else None,
        )
    train_seconds = time.monotonic() - start

    result = {
        "train_seconds": round(train_seconds, 3),
        "seconds_per_iteration": round(train_seconds / max(config.num_iters, 1), 4),
        "iteration_seconds": [
            {"iteration": t, "seconds": round(s, 4)} for t, s in sorted(iteration_seconds.items())
        ],
        "nusers": train.shape[0],
        "nitems": train.shape[1],
        "train_interactions": train.nnz,
        "eval_interactions": heldout.nnz,
    }
    result["history"] = history
    result["config"] = dataclasses.asdict(config)
    if warm is not None:
        result["warm_start"] = {
            "from": warm.source,
            "matched_users": warm.matched_users,
            "matched_items": warm.matched_items,
        }

    trained = model_lib.WALSModel(
        user_factors=factors.user_factors.astype(np.float32),
        item_factors=factors.item_factors.astype(np.float32),
        seen_indptr=train.indptr,
        seen_indices=train.indices.astype(np.int32),
        seen_values=train.values.astype(np.float32),
        item_counts=train.col_counts().astype(np.int64),
        users=dataset.users,
        items=dataset.items,
        config={
            **dataclasses.asdict(config),
            "scaling": dataset.summary["scaling"],
            "scale_stats": dataset.summary.get("scale_stats") or {},
            "input_dir": args.input_dir,
        },
    )
    model_lib.save(trained, out)
    if heldout.nnz:
        if args.distributed:
            # Beam combiners over blocks of users, reading the model just saved.
            evaluated = beam_evaluate.evaluate_model_distributed(
                out, args.input_dir, beam_argv, ks=args.eval_ks, item_chunk=chunk
            )
        else:
            rows = heldout.row_ids()
            predicted = np.einsum(
                "ij,ij->i", factors.user_factors[rows], factors.item_factors[heldout.indices]
            )
            evaluated = {
                "wals": {
                    "rmse": metrics.rmse(predicted, heldout.values),
                    **metrics.evaluate(
                        _scorer(factors), train, heldout, ks=args.eval_ks, item_chunk=chunk
                    ),
                },
                "popularity": metrics.evaluate_popularity(
                    train, heldout, ks=args.eval_ks, item_chunk=chunk
                ),
            }
        result.update(evaluated)
        _summaries(writer, config.num_iters, result["popularity"], "popularity")
    if new_visitors.has_heldout(args.input_dir):  # held-out visitors: fold in and score
        if args.distributed:
            new = new_visitors.evaluate_distributed(
                out, args.input_dir, beam_argv, args.eval_ks, item_chunk=chunk
            )
        else:
            new = new_visitors.evaluate_model(trained, args.input_dir, args.eval_ks, chunk)
        result["new_visitors"] = new
        for name in ("wals", "popularity"):
            _summaries(writer, config.num_iters, new[name], f"new_visitors/{name}")
    export.export_saved_model(trained, f"{out}/export", k=args.export_k)
    with FileSystems.create(f"{out}/{METRICS_FILE}") as handle:
        handle.write(json.dumps(result, indent=2).encode("utf-8"))
    return result


def format_metrics(result: dict) -> str:
    """A table of the final WALS and popularity metrics."""
    if "wals" not in result:
        return "no held-out interactions: nothing to evaluate"
    names = [name for name in result["wals"] if name in result["popularity"]]
    lines = [f"{'metric':<16} {'WALS':>10} {'popularity':>12} {'ratio':>8}"]
    for name in names:
        ours, base = result["wals"][name], result["popularity"][name]
        if isinstance(ours, int):
            lines.append(f"{name:<16} {ours:>10,} {base:>12,}")
            continue
        ratio = f"{ours / base:8.2f}" if base > 0 else f"{'':>8}"
        lines.append(f"{name:<16} {ours:>10.4f} {base:>12.4f} {ratio}")
    lines.append(f"{'rmse (eval)':<16} {result['wals']['rmse']:>10.4f}")
    if "new_visitors" in result:
        lines.append(new_visitors.format_metrics(result))
    return "\n".join(lines)


def headline(result: dict) -> str:
    """One line of metrics.json: WALS's Recall@K at every K, next to popularity's.

    E.g. "Recall@10 0.2512 (popularity 0.1020), Recall@20 0.3310 (popularity 0.1490)".
    """
    if "wals" not in result:
        return "no held-out interactions: nothing to evaluate"
    parts = [
        f"Recall@{name.split('@', 1)[1]} {ours:.4f} (popularity {result['popularity'][name]:.4f})"
        for name, ours in result["wals"].items()
        if name.startswith("recall@") and name in result["popularity"]
    ]
    return ", ".join(parts)
