"""Trains WALS on a preprocessed dataset, evaluates it, and writes the model and its export.

    python -m trainer.task --input_dir runs/local/preprocessed --output_dir runs/local/model \
        [--latent_factors K] [--num_iters N] [--regularization λ] [--unobserved_weight W0]
        [--weighting SCHEME] [--solver cholesky|cg] [--overwrite] [...]

`--help` lists the flags and their defaults (the model's read from `trainer.local.train.WALSConfig`);
this text leaves the defaults out so that it cannot contradict them.

Output under --output_dir (written to a temporary directory, then moved into place):
    model/          factors, vocabularies, seen items, config (`trainer.serving.model.load`)
    export/         TensorFlow SavedModel: serving_default (visitorId -> contentIds, scores,
                    known) and fold_in (contentIds, durations -> contentIds, scores)
    metrics.json    final metrics for WALS and the popularity baseline, per-iteration history
    tensorboard/    loss and metric curves (`tensorboard --logdir <output_dir>/tensorboard`)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable

import numpy as np
import tensorflow as tf
from apache_beam.io.filesystems import FileSystems

from common import cli, staging
from trainer.beam import checkpoints
from trainer.beam import evaluate as beam_evaluate
from trainer.beam import layout as blocks
from trainer.beam import sweep as beam_wals
from trainer.beam import train as distributed
from trainer.core import metrics, seeding, weights
from trainer.core.config import WALSConfig
from trainer.core.factors import WALSFactors
from trainer.evaluation import new_visitors
from trainer.local import dataset as data
from trainer.local import train as wals
from trainer.local import warm_start
from trainer.serving import export
from trainer.serving import model as model_lib

logger = logging.getLogger(__name__)
METRICS_FILE = "metrics.json"
# Users of the per-iteration evaluation: ranking every item for every user costs the product
# X Yᵀ and a top-K per user, about 10 training iterations at 100K users x 20K items (65 µs a
# user there), so the history follows a fixed sample; benchmarks/eval_speed.py measures it.
EVAL_USERS = 1_000


def _ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text}"
        ) from None
    if not ks or min(ks) <= 0:
        raise argparse.ArgumentTypeError(f"every k must be > 0: {text}")
    return ks


def build_parser() -> argparse.ArgumentParser:
    defaults = WALSConfig()
    parser = argparse.ArgumentParser(
        prog="python -m trainer.task", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--input_dir", required=True, help="a pipeline.preprocess --output_dir")
    parser.add_argument("--output_dir", required=True, help="where the model goes")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a model this project wrote in output_dir (never other files)",
    )
    hp = parser.add_argument_group("model")
    hp.add_argument(
        "--latent_factors",
        type=int,
        default=defaults.latent_factors,
        help=f"k, the factor dimension (default {defaults.latent_factors})",
    )
    hp.add_argument(
        "--num_iters",
        type=int,
        default=defaults.num_iters,
        help=f"alternating sweeps (default {defaults.num_iters})",
    )
    hp.add_argument(
        "--regularization",
        type=float,
        default=defaults.regularization,
        help=f"λ (default {defaults.regularization})",
    )
    hp.add_argument(
        "--regularization_exp",
        type=float,
        default=defaults.regularization_exp,
        help="ν: λ_u = λ (n_u + w0 N_items)^ν (default "
        f"{defaults.regularization_exp}; 0 = plain λ)",
    )
    hp.add_argument(
        "--unobserved_weight",
        type=float,
        default=defaults.unobserved_weight,
        help=f"w0, the weight of every unobserved cell (default {defaults.unobserved_weight})",
    )
    hp.add_argument(
        "--weighting",
        default=defaults.weighting,
        choices=weights.WEIGHTINGS + ("log",),
        help=f"observed extra weight f (default {defaults.weighting}; 'log' is the old name of "
        "inverse_frequency)",
    )
    hp.add_argument(
        "--feature_wt_factor",
        type=float,
        default=defaults.feature_wt_factor,
        help=f"ω in column_frequency f = ω c_i^p (default {defaults.feature_wt_factor})",
    )
    hp.add_argument(
        "--feature_wt_exp",
        type=float,
        default=defaults.feature_wt_exp,
        help=f"p in column_frequency, e in log (default {defaults.feature_wt_exp})",
    )
    hp.add_argument(
        "--confidence_alpha",
        type=float,
        default=defaults.confidence_alpha,
        help=f"α in confidence f = α r (default {defaults.confidence_alpha})",
    )
    hp.add_argument(
        "--binary_target",
        action="store_true",
        default=defaults.binary_target,
        help="fit 1 on observed cells instead of r (Hu-Koren-Volinsky preference); r then "
        f"only weighs cells, e.g. with --weighting confidence (default {defaults.binary_target})",
    )
    hp.add_argument(
        "--no_binary_target",
        dest="binary_target",
        action="store_false",
        help="fit the rating r on observed cells (a graded target)",
    )
    hp.add_argument(
        "--solver",
        default=defaults.solver,
        choices=("cholesky", "cg"),
        help=f"exact Cholesky or warm-started conjugate gradient (default {defaults.solver})",
    )
    hp.add_argument(
        "--cg_steps",
        type=int,
        default=defaults.cg_steps,
        help=f"CG steps per solve (default {defaults.cg_steps})",
    )
    hp.add_argument(
        "--init_stddev",
        type=float,
        default=defaults.init_stddev,
        help=f"σ: factors start N(0, σ/√k) (default {defaults.init_stddev})",
    )
    hp.add_argument("--seed", type=int, default=defaults.seed, help="random seed")
    ev = parser.add_argument_group("evaluation and export")
    ev.add_argument(
        "--eval_ks",
        type=_ks,
        default=(10, 20, 50),
        help="cut-offs for Recall/NDCG/MAP@K (default 10,20,50)",
    )
    ev.add_argument(
        "--eval_every",
        type=int,
        default=None,
        help="evaluate on the eval split every N iterations for the history "
        "(default 1; 0 = only at the end; with --distributed only at the end)",
    )
    ev.add_argument(
        "--eval_users",
        type=int,
        default=EVAL_USERS,
        help="users scored by the per-iteration evaluation, a seeded sample of those with "
        f"held-out items (default {EVAL_USERS:,}; 0 = all); the final evaluation scores all",
    )
    ev.add_argument(
        "--export_k",
        type=int,
        default=10,
        help="how many items the SavedModel returns (default 10)",
    )
    ev.add_argument(
        "--loss_every",
        type=int,
        default=1,
        help="compute the training loss every N iterations and after the last; 0: never "
        "(default 1; the history says which iterations have it)",
    )
    ev.add_argument("--no_progress", action="store_true", help="log instead of a progress bar")
    hp.add_argument(
        "--warm_start_from",
        default=None,
        help="a trained model's --output_dir: visitors and content it knows (matched by "
        "original ID) start from its factors, new ones from the seeded initialisation",
    )
    dist = parser.add_argument_group(
        "distributed training (every other flag is a Beam pipeline option: --runner, "
        "--direct_num_workers, --project, --region, --temp_location, --flink_master, ...)"
    )
    dist.add_argument(
        "--distributed",
        action="store_true",
        help="train with the Beam pipeline of trainer.beam.sweep on the runner the Beam flags "
        "name (DirectRunner by default); resumes from <output_dir>.checkpoints after a crash",
    )
    dist.add_argument(
        "--factor_exchange",
        default=beam_wals.BROADCAST,
        choices=beam_wals.EXCHANGES,
        help="how solving blocks get the fixed side's factors: broadcast (every worker reads the "
        "whole table) or join (each block receives only the rows it needs; default broadcast)",
    )
    dist.add_argument(
        "--block_rows",
        type=int,
        default=blocks.DEFAULT_TRAIN_BLOCK_ROWS,
        help=f"rows per training block (default {blocks.DEFAULT_TRAIN_BLOCK_ROWS})",
    )
    # Test-only fault injection: fail after writing the checkpoint of this half-sweep.
    dist.add_argument("--test_fail_after_sweep", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def config_from_args(args: argparse.Namespace) -> WALSConfig:
    fields = {f.name for f in dataclasses.fields(WALSConfig)}
    return WALSConfig(**{name: getattr(args, name) for name in fields if hasattr(args, name)})


def _summaries(writer, step: int, values: dict, prefix: str) -> None:
    with writer.as_default(step=step):
        for name, value in values.items():
            if isinstance(value, (int, float)) and np.isfinite(value):
                tf.summary.scalar(f"{prefix}/{name}", value)
    writer.flush()


def _scorer(factors: WALSFactors):
    """userIds int [b] -> scores float32 [b, n_items] = X[users] Yᵀ (`metrics.factor_scorer`)."""
    return metrics.factor_scorer(factors.user_factors, factors.item_factors)


def per_iteration_evaluator(
    train, heldout, ks: tuple[int, ...], eval_users: int, seed: int
) -> Callable[[WALSFactors], dict]:
    """factors -> `metrics.evaluate` of them on a fixed seeded sample of `eval_users` of the
    users with held-out items (all of them when eval_users is 0 or exceeds their number): the
    evaluation of the per-iteration history. Its "users_evaluated" says how many were scored;
    the same users every iteration, so the curve's steps are not sampling noise."""
    users = metrics.sample_users(heldout, eval_users, seed) if eval_users > 0 else None
    return lambda factors: metrics.evaluate(_scorer(factors), train, heldout, ks=ks, users=users)


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
    args: argparse.Namespace, out: str, beam_argv: list[str] | None = None
) -> dict:
    """Loads, trains, evaluates and writes everything under `out`; returns metrics.json."""
    config = config_from_args(args)
    dataset = data.load_dataset(args.input_dir)
    train, heldout = dataset.train, dataset.heldout
    writer = tf.summary.create_file_writer(f"{out}/tensorboard")
    history = []
    evaluate = per_iteration_evaluator(train, heldout, args.eval_ks, args.eval_users, args.seed)

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
        factors = wals.fit(
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
                out, args.input_dir, beam_argv, ks=args.eval_ks
            )
        else:
            rows = heldout.row_ids()
            predicted = np.einsum(
                "ij,ij->i", factors.user_factors[rows], factors.item_factors[heldout.indices]
            )
            evaluated = {
                "wals": {
                    "rmse": metrics.rmse(predicted, heldout.values),
                    **metrics.evaluate(_scorer(factors), train, heldout, ks=args.eval_ks),
                },
                "popularity": metrics.evaluate_popularity(train, heldout, ks=args.eval_ks),
            }
        result.update(evaluated)
        _summaries(writer, config.num_iters, result["popularity"], "popularity")
    if new_visitors.has_heldout(args.input_dir):  # held-out visitors: fold in and score
        if args.distributed:
            new = new_visitors.evaluate_distributed(out, args.input_dir, beam_argv, args.eval_ks)
        else:
            new = new_visitors.evaluate_model(trained, args.input_dir, args.eval_ks)
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


def run(argv: list[str] | None = None) -> dict:
    """Parses flags, trains, and returns metrics.json's content.

    Raises:
        cli.UsageError: bad flags or an unusable input dir, before anything is written.
    """
    args, beam_argv = build_parser().parse_known_args(argv)
    if beam_argv and not args.distributed:
        raise cli.UsageError(f"unknown flag(s): {', '.join(beam_argv)} (see --help)")
    unknown = cli.unknown_flags(beam_argv)
    if unknown:
        raise cli.UsageError(f"unknown flag(s): {', '.join(unknown)} (see --help)")
    if args.block_rows < 1:
        raise cli.UsageError(f"--block_rows must be >= 1, got {args.block_rows}")
    try:
        config_from_args(args).validate()
    except ValueError as error:
        raise cli.UsageError(str(error)) from None
    if args.loss_every < 0:
        raise cli.UsageError(f"--loss_every must be >= 0, got {args.loss_every}")
    if args.eval_every is None:
        args.eval_every = 0 if args.distributed else 1
    if args.eval_every < 0:
        raise cli.UsageError(f"--eval_every must be >= 0, got {args.eval_every}")
    if args.eval_users < 0:
        raise cli.UsageError(f"--eval_users must be >= 0, got {args.eval_users}")
    if args.export_k <= 0:
        raise cli.UsageError(f"--export_k must be > 0, got {args.export_k}")
    try:
        staging.check_writable(args.output_dir, args.overwrite, METRICS_FILE)
    except staging.OutputExistsError as error:
        raise cli.UsageError(str(error)) from None
    try:
        with staging.staged_output(args.output_dir, args.overwrite, METRICS_FILE) as out:
            result = train_and_evaluate(args, out, beam_argv)
    except data.DatasetError as error:
        raise cli.UsageError(f"--input_dir {args.input_dir}: {error}") from None
    except staging.OutputExistsError as error:  # output_dir changed while training ran
        raise cli.UsageError(str(error)) from None
    except checkpoints.CheckpointError as error:
        raise cli.UsageError(str(error)) from None
    if getattr(args, "checkpoint_dir", None):
        # Published: the checkpoints (ours, marked by their run.json) are no longer needed.
        checkpoints.remove(args.checkpoint_dir)
    logger.info("wrote %s\n%s", args.output_dir, format_metrics(result))
    return result


def main(argv: list[str] | None = None) -> int:
    return cli.main_with_usage_errors(run, argv)


if __name__ == "__main__":
    sys.exit(main())
