"""Trains WALS on a preprocessed dataset, evaluates it, and writes the model and its export.

    python -m trainer.task --input_dir runs/local/preprocessed --output_dir runs/local/model \
        [--latent_factors K] [--num_iters N] [--regularization λ] [--unobserved_weight W0]
        [--weighting SCHEME] [--solver cholesky|cg] [--overwrite] [...]

`--help` lists the flags and their defaults (the model's read from `WALSConfig`); this text
leaves the defaults out so that it cannot contradict them. This module checks the flags and
stages the output; `trainer.training` trains, evaluates and writes it.

Output under --output_dir (written to a temporary directory, then moved into place):
    model/          factors, vocabularies, seen items, config (`trainer.serving.model.load`)
    export/         TensorFlow SavedModel: serving_default (visitorId -> contentIds, scores,
                    known) and fold_in (contentIds, durations -> contentIds, scores);
                    with --serving_model fold_in, the item side and fold_in alone
    metrics.json    final metrics for WALS and the popularity baseline, per-iteration history
    tensorboard/    loss and metric curves (`tensorboard --logdir <output_dir>/tensorboard`)

The command logs one line of headline metrics; `python -m trainer.show <output_dir>` prints the
whole table.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import warnings

from apache_beam.options.pipeline_options import PipelineOptions

from common import cli, locations, staging
from trainer.beam import checkpoints
from trainer.beam import layout as blocks_lib
from trainer.beam import train as distributed
from trainer.core import objective
from trainer.core.chunked_topk import DEFAULT_SCORE_BYTES
from trainer.core.objective import WALSConfig
from trainer.core.xla import configure_xla
from trainer.local import dataset as data
from trainer.serving import export_size
from trainer.training import METRICS_FILE, headline, train_and_evaluate

# Re-exported: trainer.show and the tests read them from the entry point.
from trainer.training import format_metrics as format_metrics
from trainer.training import per_iteration_evaluator as per_iteration_evaluator

logger = logging.getLogger(__name__)
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


class _DeprecatedFlag(argparse.Action):
    """Stores a deprecated flag's value and warns (FutureWarning) that it goes away."""

    def __init__(self, *args, replacement: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.replacement = replacement

    def __call__(self, parser, namespace, values, option_string=None):
        warnings.warn(
            f"{option_string} is deprecated and will be removed in the next release; "
            f"use {self.replacement}",
            FutureWarning,
            stacklevel=2,
        )
        setattr(namespace, self.dest, values)


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
        choices=objective.WEIGHTINGS + ("log",),
        help=f"observed extra weight f (default {defaults.weighting}; 'log' is the old name of "
        "inverse_frequency)",
    )
    hp.add_argument(
        "--column_weight_scale",
        type=float,
        default=defaults.column_weight_scale,
        help=f"ω in column_frequency f = ω c_i^p (default {defaults.column_weight_scale})",
    )
    hp.add_argument(
        "--column_weight_exponent",
        type=float,
        default=defaults.column_weight_exponent,
        help="p in column_frequency f = ω c_i^p (+1 linear, -1 inverse item frequency; default "
        f"{defaults.column_weight_exponent})",
    )
    hp.add_argument(
        "--inverse_frequency_exponent",
        type=float,
        default=defaults.inverse_frequency_exponent,
        help=f"e in inverse_frequency f = c_i^(-e) (default {defaults.inverse_frequency_exponent})",
    )
    hp.add_argument(
        f"--{objective.LEGACY_SCALE}",
        type=float,
        action=_DeprecatedFlag,
        replacement="--column_weight_scale",
        default=None,
        help="deprecated alias of --column_weight_scale, removed in the next release",
    )
    hp.add_argument(
        f"--{objective.LEGACY_EXPONENT}",
        type=float,
        action=_DeprecatedFlag,
        replacement="--column_weight_exponent (column_frequency) or "
        "--inverse_frequency_exponent (inverse_frequency)",
        default=None,
        help="deprecated: sets the exponent of the chosen --weighting "
        "(--column_weight_exponent or --inverse_frequency_exponent); removed in the next release",
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
        "--serving_model",
        default=export_size.FULL,
        choices=export_size.SERVING_MODELS,
        help="the SavedModel under export/: full (serving_default for known visitors by "
        "visitorId, and fold_in) or fold_in (item factors, item vocabulary and fold_in only, "
        "serving_default = fold_in: no user table, for models whose user table does not "
        "belong in a server; default full)",
    )
    ev.add_argument(
        "--loss_every",
        type=int,
        default=None,
        help="compute the training loss every N iterations and after the last; 0: never "
        "(default: after the last iteration only, since the loss costs about as much as half "
        "an iteration; the history says which iterations have it)",
    )
    ev.add_argument("--no_progress", action="store_true", help="log instead of a progress bar")
    ev.add_argument(
        "--score_item_chunk",
        type=int,
        default=0,
        help="items scored at once per batch of users when ranking (evaluation, new visitors; "
        "locally and per Beam element), which bounds the scores' memory at users x chunk x 4 "
        f"bytes (default 0: as many as fit in {DEFAULT_SCORE_BYTES >> 20} MiB); the metrics do not "
        "depend on it",
    )
    hp.add_argument(
        "--warm_start_from",
        default=None,
        help="a trained model's --output_dir: visitors and content it knows (matched by "
        "original ID) start from its factors, new ones from the seeded initialisation",
    )
    dist = parser.add_argument_group(
        "distributed training (every other flag is a Beam pipeline option: --runner, "
        "--direct_num_workers, --project, --region, --temp_location, --flink_master, "
        "--workers_share_filesystem, ...)"
    )
    dist.add_argument(
        "--distributed",
        action="store_true",
        help="train with the Beam pipeline of trainer.beam.train on the runner the Beam flags "
        "name (DirectRunner by default); resumes from <output_dir>.checkpoints after a crash",
    )
    dist.add_argument(
        "--factor_exchange",
        default=distributed.BROADCAST,
        choices=distributed.EXCHANGES,
        help="how solving blocks get the fixed side's factors: broadcast (every worker reads the "
        "whole table) or join (each block receives only the rows it needs; default broadcast)",
    )
    dist.add_argument(
        "--block_rows",
        type=int,
        default=blocks_lib.DEFAULT_TRAIN_BLOCK_ROWS,
        help=f"rows per training block (default {blocks_lib.DEFAULT_TRAIN_BLOCK_ROWS})",
    )
    # Test-only fault injection: fail after writing the checkpoint of this half-sweep.
    dist.add_argument("--test_fail_after_sweep", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def config_from_args(args: argparse.Namespace) -> WALSConfig:
    """The `WALSConfig` of parsed flags; the deprecated --feature_wt_factor / --feature_wt_exp,
    when given, set the fields they meant under the chosen --weighting (and win)."""
    fields = {f.name for f in dataclasses.fields(WALSConfig)}
    values = {name: getattr(args, name) for name in fields if hasattr(args, name)}
    legacy = {
        name: getattr(args, name)
        for name in (objective.LEGACY_SCALE, objective.LEGACY_EXPONENT)
        if getattr(args, name, None) is not None
    }
    if legacy:
        weighting = values.get("weighting", WALSConfig.weighting)
        upgraded = objective.upgrade_legacy_fields({"weighting": weighting, **legacy})
        values.update((name, upgraded[name]) for name in upgraded if name != "weighting")
    return WALSConfig(**values)


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
    if args.score_item_chunk < 0:
        raise cli.UsageError(f"--score_item_chunk must be >= 0, got {args.score_item_chunk}")
    try:
        config = config_from_args(args)  # WALSConfig validates itself
    except ValueError as error:
        raise cli.UsageError(str(error)) from None
    if args.loss_every is None:  # after the last iteration only
        args.loss_every = max(config.num_iters, 1)
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
    # TensorFlow reads the dataset and writes the model; the distributed run's workers read
    # both, and write <output_dir>.checkpoints. The warm start is read here, by the launcher.
    locations.check_locations(
        PipelineOptions(beam_argv) if args.distributed else None,
        [
            locations.Location("--input_dir", args.input_dir, tensorflow=True),
            locations.Location("--output_dir", args.output_dir, tensorflow=True),
            locations.Location("--warm_start_from", args.warm_start_from, workers=False),
        ],
    )
    try:
        staging.check_writable(args.output_dir, args.overwrite, METRICS_FILE)
    except staging.OutputExistsError as error:
        raise cli.UsageError(str(error)) from None
    try:
        with staging.staged_output(args.output_dir, args.overwrite, METRICS_FILE) as out:
            result = train_and_evaluate(args, config, out, beam_argv)
    except data.DatasetError as error:
        raise cli.UsageError(f"--input_dir {args.input_dir}: {error}") from None
    except staging.OutputExistsError as error:  # output_dir changed while training ran
        raise cli.UsageError(str(error)) from None
    except checkpoints.CheckpointError as error:
        raise cli.UsageError(str(error)) from None
    if getattr(args, "checkpoint_dir", None):
        # Published: the checkpoints (ours, marked by their run.json) are no longer needed.
        checkpoints.remove(args.checkpoint_dir)
    logger.info("eval split: %s", headline(result))  # common.staging said "wrote <output_dir>"
    return result


def main(argv: list[str] | None = None) -> int:
    configure_xla()  # before the first XLA compile of this process
    return cli.main_with_usage_errors(run, argv)


if __name__ == "__main__":
    sys.exit(main())
