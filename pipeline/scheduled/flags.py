"""The flags of `python -m pipeline.run`, its constants, and how the other flags are shared out.

The run's own flags are `build_parser`'s; every other flag goes to trainer.task (its
hyperparameters), to pipeline.preprocess (its flags) or, as Beam pipeline options, to every Beam
stage (`split_flags`, `job_flags`). `check_locations` refuses a --root or --input that the Beam
stages' workers or TensorFlow cannot use.
"""

from __future__ import annotations

import argparse

from apache_beam.options.pipeline_options import PipelineOptions

from common import locations
from pipeline import options as preprocess_options
from pipeline.object_locks import LEASE_SECONDS

STAGES = ("preprocess", "train", "gate", "predict", "export", "publish")
BEAM_STAGES = ("preprocess", "train", "predict")
EXIT_REJECTED = 1
EXIT_LOCKED = 75  # EX_TEMPFAIL: try again later
# Iterations of a warm-started nightly run, from `python -m benchmarks.warm_start` (README,
# "Warm start"): started from the day before's model, the trainer comes within 1% of the
# Recall@20 of a cold run with the default 15 iterations after 1 iteration (6 of 6 day pairs, two
# data sizes) and reaches it exactly within 3 in 5 of 6 (the sixth stays 0.3% below); a cold run
# needs 3-4 iterations to come within 1%. 3 is a fifth of the cold run's cost.
WARM_NUM_ITERS = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.run",
        description="One dated run: preprocess, train, gate, predict, export, publish. Every "
        "other flag goes to trainer.task (its hyperparameters), to pipeline.preprocess (its "
        "flags) or, as Beam pipeline options, to every Beam stage.",
    )
    parser.add_argument("--date", required=True, help="the run's date, YYYY-MM-DD")
    parser.add_argument(
        "--input",
        required=True,
        help="the input file pattern; {date} (YYYY-MM-DD) and {date_nodash} (YYYYMMDD) are "
        "replaced by the date, e.g. 'gs://b/ga360/ga_sessions_{date_nodash}*.json.gz'",
    )
    parser.add_argument("--root", required=True, help="where runs/ and published live")
    parser.add_argument(
        "--window_days",
        type=int,
        default=1,
        help="read the exports of the last N days, DATE included (default 1); --input must "
        "then hold {date} or {date_nodash}; missing earlier days are skipped with a warning",
    )
    parser.add_argument("--force", action="store_true", help="redo every stage")
    parser.add_argument(
        "--stages",
        default=",".join(STAGES),
        help="comma-separated stages to run (default all); earlier stages must be complete. "
        "The Airflow DAG runs one stage per task",
    )
    warm = parser.add_mutually_exclusive_group()
    warm.add_argument(
        "--warm_start",
        dest="warm_start",
        action="store_true",
        default=None,
        help="start from the published model's factors (default: on when a model is published)",
    )
    warm.add_argument("--no_warm_start", dest="warm_start", action="store_false")
    parser.add_argument(
        "--num_iters",
        type=int,
        default=None,
        help=f"training iterations (default {WARM_NUM_ITERS} when warm-started, measured; "
        "else trainer.task's default)",
    )
    parser.add_argument("--gate_k", type=int, default=20, help="K of the gate (default 20)")
    parser.add_argument(
        "--gate_min_lift",
        type=float,
        default=1.1,
        help="the floor: candidate Recall@K >= this x popularity's (default 1.1)",
    )
    parser.add_argument(
        "--gate_tolerance",
        type=float,
        default=0.05,
        help="largest relative drop of Recall@K and NDCG@K below the published model's "
        "(default 0.05, i.e. 5%%)",
    )
    parser.add_argument(
        "--predict_k", type=int, default=10, help="recommendations per visitor (default 10)"
    )
    parser.add_argument(
        "--lock_wait",
        type=float,
        default=0.0,
        help="seconds to wait when another launch of the date is running (default 0: exit "
        f"with status {EXIT_LOCKED} at once)",
    )
    parser.add_argument(
        "--lock_lease_seconds",
        type=float,
        default=LEASE_SECONDS,
        help="gs:// roots: a launch renews its lock every quarter of this; a lock left unrenewed "
        f"this long is stale and taken over (default {LEASE_SECONDS:g})",
    )
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="train and predict with Beam (trainer.task --distributed, batch_predict "
        "--distributed) on the runner the Beam options name",
    )
    return parser


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def split_flags(argv: list[str], parser: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """Splits argv into the flags `parser` defines (with their values) and the rest."""
    actions = {s: a for a in parser._actions for s in a.option_strings}
    mine, rest = [], []
    i = 0
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0]
        action = actions.get(name)
        if action is None:
            rest.append(token)
        elif "=" in token or not _takes_value(action):
            mine.append(token)
        else:
            mine.extend(argv[i : i + 2])
            i += 1
        i += 1
    return mine, rest


def preprocess_parser() -> argparse.ArgumentParser:
    """A parser of pipeline.preprocess's own flags (`PreprocessOptions`), for `split_flags`."""
    parser = argparse.ArgumentParser(add_help=False)
    preprocess_options.PreprocessOptions._add_argparse_args(parser)
    return parser


def job_flags(beam_argv: list[str], stage: str, several: bool) -> list[str]:
    """Beam flags for one stage; --job_name gets the stage as a suffix when several run."""
    out = []
    for token in beam_argv:
        if several and token.startswith("--job_name="):
            token = f"{token}-{stage}"
        out.append(token)
    if several and "--job_name" in out:
        i = out.index("--job_name")
        if i + 1 < len(out):
            out[i + 1] = f"{out[i + 1]}-{stage}"
    return out


def check_locations(args: argparse.Namespace, beam_argv: list[str]) -> None:
    """Refuses --root, --input and --temp_location that the run cannot use (`common.locations`).

    The preprocess stage always runs on the runner of `beam_argv` (the trainer and the
    prediction too with --distributed), and TensorFlow writes under --root (the dataset's
    transform_fn/, the model, the SavedModel), so --root must be on TensorFlow's filesystems
    and, like --input, reachable by the workers.

    Raises:
        common.cli.UsageError: naming the flag.
    """
    locations.check_locations(
        PipelineOptions(beam_argv),
        [
            locations.Location("--root", args.root, tensorflow=True),
            locations.Location("--input", args.input),
        ],
    )
