"""One training run: fit WALS (locally or on Beam), evaluate, and write the model directory.
`trainer.task` checks the flags and stages the output; this module fills it.

Locally, the dataset, the factors and the model are loaded into this process. With
--distributed, this process (the launcher) holds nothing that grows with the data: it reads
summary.json and the checkpoint's small files, and Beam workers read the cells, the
vocabularies and the factors, write model/ and export/, and evaluate.

Under `out` (a staging directory that `trainer.task` publishes as --output_dir):
    model/          factors, vocabularies, seen items, config (`trainer.serving.model.save`;
                    with --distributed, the same files from `trainer.beam.model_writer`)
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
from trainer.beam import eval_pipeline, model_writer
from trainer.beam import train as distributed
from trainer.beam import warm_start as beam_warm_start
from trainer.core import metrics, seeding
from trainer.core.factors import WALSFactors
from trainer.core.objective import WALSConfig
from trainer.core.sides import ITEMS, USERS
from trainer.evaluation import new_visitors
from trainer.local import dataset as data
from trainer.local import train as local_train
from trainer.local import warm_start
from trainer.serving import export
from trainer.serving import model as model_lib
from transforms.dataset_info import read_dataset_info

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


def _model_config(config: WALSConfig, summary: dict, input_dir: str) -> dict:
    """The model's config.json: the hyperparameters, the rating scaling and its statistics."""
    return {
        **dataclasses.asdict(config),
        "scaling": summary["scaling"],
        "scale_stats": summary.get("scale_stats") or {},
        "input_dir": input_dir,
    }


class _History:
    """The per-iteration history of metrics.json, and TensorBoard's curves of it."""

    def __init__(self, writer):
        self.records: list[dict] = []
        self._writer = writer

    def add(self, iteration: int, loss: dict | None, evaluated: dict | None = None) -> None:
        record = {"iteration": iteration}
        if loss is not None:
            record.update({f"loss/{k}": float(v) for k, v in loss.items() if k != "iteration"})
        if evaluated:
            record.update({f"eval/{k}": v for k, v in evaluated.items()})
        self.records.append(record)
        values = {k: v for k, v in record.items() if k != "iteration"}
        _summaries(self._writer, iteration, values, "wals")


def _result(config, train_seconds: float, iteration_seconds: dict, sizes: tuple, history) -> dict:
    """metrics.json's timings, sizes ((nusers, nitems, train cells, eval cells)), history and
    config."""
    nusers, nitems, train_interactions, eval_interactions = sizes
    return {
        "train_seconds": round(train_seconds, 3),
        "seconds_per_iteration": round(train_seconds / max(config.num_iters, 1), 4),
        "iteration_seconds": [
            {"iteration": t, "seconds": round(s, 4)} for t, s in sorted(iteration_seconds.items())
        ],
        "nusers": nusers,
        "nitems": nitems,
        "train_interactions": train_interactions,
        "eval_interactions": eval_interactions,
        "history": history.records,
        "config": dataclasses.asdict(config),
    }


def train_and_evaluate(
    args: argparse.Namespace,
    config: WALSConfig,
    out: str,
    beam_argv: list[str] | None = None,
) -> dict:
    """Trains, evaluates and writes everything under `out`; returns metrics.json.

    Without --distributed, everything is loaded into this process. With it, the launcher holds
    nothing that grows with the data (`_train_and_evaluate_distributed`).

    Args:
        args: `trainer.task`'s checked flags (loss_every and eval_every resolved to numbers).
        config: the WALS hyperparameters of those flags.
        out: the staging directory to fill.
        beam_argv: Beam pipeline options, for --distributed.
    """
    writer = tf.summary.create_file_writer(f"{out}/tensorboard")
    if args.distributed:
        result = _train_and_evaluate_distributed(args, config, out, beam_argv or [], writer)
    else:
        result = _train_and_evaluate_locally(args, config, out, writer)
    with FileSystems.create(f"{out}/{METRICS_FILE}") as handle:
        handle.write(json.dumps(result, indent=2).encode("utf-8"))
    return result


def _train_and_evaluate_locally(args, config: WALSConfig, out: str, writer) -> dict:
    """The in-memory run: the dataset, the factors and the model all in this process."""
    dataset = data.load_dataset(args.input_dir)
    train, heldout = dataset.train, dataset.heldout
    history = _History(writer)
    chunk = args.score_item_chunk
    evaluate = per_iteration_evaluator(
        train, heldout, args.eval_ks, args.eval_users, args.seed, chunk
    )

    # Wall seconds of each iteration after the first (which also holds the set-up and the
    # kernels' compilation), the callback's own work (evaluation) left out.
    iteration_seconds = {}
    last_end = [None]

    def on_iteration(iteration: int, factors, loss: dict | None) -> None:
        if last_end[0] is not None:
            iteration_seconds[iteration] = time.monotonic() - last_end[0]
        evaluated = None
        if args.eval_every and iteration % args.eval_every == 0 and heldout.nnz:
            evaluated = evaluate(factors)
        history.add(iteration, loss, evaluated)
        last_end[0] = time.monotonic()

    warm = None
    if args.warm_start_from:
        try:
            warm = warm_start.from_model(args.warm_start_from, dataset.users, dataset.items, config)
        except (FileNotFoundError, ValueError) as error:
            raise cli.UsageError(f"--warm_start_from {args.warm_start_from}: {error}") from None
    start = time.monotonic()
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
    sizes = (train.shape[0], train.shape[1], train.nnz, heldout.nnz)
    result = _result(config, train_seconds, iteration_seconds, sizes, history)
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
        config=_model_config(config, dataset.summary, args.input_dir),
    )
    model_lib.save(trained, out)
    if heldout.nnz:
        rows = heldout.row_ids()
        predicted = np.einsum(
            "ij,ij->i", factors.user_factors[rows], factors.item_factors[heldout.indices]
        )
        result["wals"] = {
            "rmse": metrics.rmse(predicted, heldout.values),
            **metrics.evaluate(_scorer(factors), train, heldout, ks=args.eval_ks, item_chunk=chunk),
        }
        result["popularity"] = metrics.evaluate_popularity(
            train, heldout, ks=args.eval_ks, item_chunk=chunk
        )
        _summaries(writer, config.num_iters, result["popularity"], "popularity")
    if new_visitors.has_heldout(args.input_dir):  # held-out visitors: fold in and score
        result["new_visitors"] = new_visitors.evaluate_model(
            trained, args.input_dir, args.eval_ks, chunk
        )
        _new_visitor_summaries(writer, config.num_iters, result["new_visitors"])
    export.export_saved_model(
        trained, f"{out}/export", k=args.export_k, serving_model=args.serving_model
    )
    return result


def _new_visitor_summaries(writer, step: int, new: dict) -> None:
    for name in ("wals", "popularity"):
        _summaries(writer, step, new[name], f"new_visitors/{name}")


def _train_and_evaluate_distributed(
    args, config: WALSConfig, out: str, beam_argv: list[str], writer
) -> dict:
    """The Beam run, whose launcher reads summary.json (`transforms.dataset_info`) and the
    checkpoint's small files only: the workers seed the factors from the vocabularies, train,
    write `out`/model/ and export it (`trainer.beam.train`, `trainer.beam.model_writer`), then
    evaluate the model from its files (`trainer.beam.eval_pipeline`, `new_visitors`). This process
    writes config.json and metrics.json.

    Per-iteration evaluation needs the factors of every iteration, which the distributed run
    does not keep, so the history holds the losses only. train_seconds includes writing and
    exporting the model, which the training pipeline does after the last iteration.
    """
    info = read_dataset_info(args.input_dir)
    warm = None
    if args.warm_start_from:
        try:
            digest = beam_warm_start.describe(args.warm_start_from, config.latent_factors)
        except (FileNotFoundError, ValueError) as error:
            raise cli.UsageError(f"--warm_start_from {args.warm_start_from}: {error}") from None
        warm = (args.warm_start_from, digest)
    if args.eval_every:
        logger.warning("--eval_every is ignored with --distributed: metrics.json has final ones")
    args.eval_every = 0
    model_lib.write_config(out, _model_config(config, info.summary, args.input_dir))
    model = model_writer.ModelSpec(
        model_dir=out,
        input_dir=info.directory,
        shape=info.shape,
        k=config.latent_factors,
        vocabularies=info.vocabularies,
        train_interactions=info.train_interactions,
        export_k=args.export_k,
        serving_model=args.serving_model,
    )
    start = time.monotonic()
    trained = distributed.train(
        info,
        config,
        args.output_dir,
        beam_argv,
        model=model,
        exchange=args.factor_exchange,
        block_rows=args.block_rows,
        loss_every=args.loss_every,
        fail_after=args.test_fail_after_sweep,
        warm_start=warm,
    )
    train_seconds = time.monotonic() - start
    args.checkpoint_dir = trained.checkpoint_dir
    history = _History(writer)
    for loss in trained.history:
        history.add(loss["iteration"], loss)
    sizes = (*info.shape, info.train_interactions, info.eval_interactions)
    result = _result(config, train_seconds, trained.iteration_seconds, sizes, history)
    if warm is not None:
        result["warm_start"] = {
            "from": args.warm_start_from,
            "matched_users": trained.warm_matched[USERS],
            "matched_items": trained.warm_matched[ITEMS],
        }
    if info.eval_interactions:  # Beam combiners over blocks of users, reading the model's files
        result.update(
            eval_pipeline.evaluate_model_distributed(
                out, args.input_dir, beam_argv, ks=args.eval_ks, item_chunk=args.score_item_chunk
            )
        )
        _summaries(writer, config.num_iters, result["popularity"], "popularity")
    if new_visitors.has_heldout(args.input_dir):  # held-out visitors: fold in and score
        new = new_visitors.evaluate_distributed(
            out, args.input_dir, beam_argv, args.eval_ks, item_chunk=args.score_item_chunk
        )
        result["new_visitors"] = new
        _new_visitor_summaries(writer, config.num_iters, new)
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
