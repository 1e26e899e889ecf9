"""One scheduled run: preprocess, train, gate, predict, export and publish one date's data.

    python -m pipeline.run --date 2026-11-22 --input 'gs://b/ga360/ga_sessions_{date_nodash}*' \\
        --root /srv/ga-wals [any trainer.task flag] [--distributed] [Beam pipeline options]

Everything goes under ROOT/runs/DATE/ (layout in `pipeline.runstate`):

    preprocessed/        pipeline.preprocess --output_dir     (complete: summary.json)
    train/               trainer.task --output_dir            (complete: metrics.json)
    gate.json            trainer.evaluation.gate's decision              (written atomically)
    predictions.tsv      trainer.batch_predict --output       (a directory with --distributed)
    serving/YYYYMMDD/    the SavedModel, a TensorFlow Serving version directory
    run.json             status, timings, counts, metrics and the gate's decision

and a passing run points ROOT/published at runs/DATE. Each stage runs the project's own entry
point in this process (`pipeline.preprocess.run`, `trainer.task.run`, ...), so a failure stops
the run with that entry point's own exception. A stage is skipped when run.json says it is done
and its output is there; once one stage runs, every later one runs too; --force redoes all.

Exit status: 0 published (or already published), 1 rejected by the gate or a stage failed,
2 a bad flag or no input for the date, 75 another launch of the date holds its lock.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import shutil
import signal
import sys
import time
import traceback

if __name__ == "__main__" and not __package__:
    # Run as a script (`python pipeline/run.py`, as Airflow's Beam operator does): import the
    # package from the repository rather than this file's folder, whose modules would shadow.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from apache_beam.io.filesystems import FileSystems  # noqa: E402

from common import cli
from pipeline import options as preprocess_options  # noqa: E402
from pipeline import runstate  # noqa: E402
from transforms import features  # noqa: E402

logger = logging.getLogger(__name__)

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


class RejectedError(RuntimeError):
    """The gate rejected the candidate; the run is kept on disk with the reasons."""


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


def _preprocess_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    preprocess_options.PreprocessOptions._add_argparse_args(parser)
    return parser


def _dates(date: str, window_days: int) -> list[str]:
    day = datetime.date.fromisoformat(date)
    return [(day - datetime.timedelta(days=n)).isoformat() for n in range(window_days)][::-1]


def resolve_input(pattern: str, date: str, window_days: int) -> list[str]:
    """The input patterns of the run: one per day of the window that has files.

    Raises:
        cli.UsageError: the run's own date has no input (nothing is run or published), or a
            window without a date placeholder.
    """
    dated = "{date}" in pattern or "{date_nodash}" in pattern
    if window_days > 1 and not dated:
        raise cli.UsageError("--window_days needs {date} or {date_nodash} in --input")
    found = []
    for day in _dates(date, window_days):
        path = pattern.replace("{date}", day).replace("{date_nodash}", day.replace("-", ""))
        try:
            matched = FileSystems.match([path])[0].metadata_list
        except Exception as error:  # a bad pattern, or an unreachable filesystem
            raise cli.UsageError(f"cannot read --input {path}: {error}") from None
        if matched:
            found.append(path)
        elif day == date:
            raise cli.UsageError(
                f"no input for {date}: {path} matches no files; nothing was run or published"
            )
        else:
            logger.warning("no input for %s (%s) in the window; skipping that day", day, path)
    return found


def _job_flags(beam_argv: list[str], stage: str, several: bool) -> list[str]:
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


class Run:
    """One date's run: its paths, its run.json record and the stages (see the module doc)."""

    def __init__(self, args: argparse.Namespace, extra: list[str], argv: list[str]):
        from trainer import task  # TensorFlow: only once the flags are known to be good

        self.args = args
        self.argv = argv
        self.root = args.root.rstrip("/")
        self.dir = runstate.run_dir(self.root, args.date)
        self.trainer_argv, rest = split_flags(extra, task.build_parser())
        self.preprocess_argv, self.beam_argv = split_flags(rest, _preprocess_parser())
        unknown = cli.unknown_flags(self.beam_argv)
        if unknown:
            raise cli.UsageError(f"unknown flag(s): {', '.join(unknown)} (see --help)")
        for flag in ("--input_dir", "--output_dir", "--overwrite", "--warm_start_from"):
            if any(t.split("=")[0] == flag for t in self.trainer_argv + self.preprocess_argv):
                raise cli.UsageError(f"{flag} is set by pipeline.run; leave it out")
        self.trainer_args, _ = task.build_parser().parse_known_args(
            [*self.trainer_argv, "--input_dir", "-", "--output_dir", "-"]
        )
        try:
            task.config_from_args(self.trainer_args).validate()
        except ValueError as error:
            raise cli.UsageError(str(error)) from None
        self.record: dict = {}

    # Paths.
    def path(self, name: str) -> str:
        return f"{self.dir}/{name}"

    @property
    def predictions(self) -> str:
        return self.path("predictions" if self.args.distributed else "predictions.tsv")

    @property
    def serving(self) -> str:
        return self.path(f"serving/{self.args.date.replace('-', '')}")

    def complete(self, stage: str) -> bool:
        """Whether run.json says the stage is done and its output is there."""
        if self.record.get("stages", {}).get(stage, {}).get("status") != runstate.DONE:
            return False
        marker = {
            "preprocess": self.path(f"preprocessed/{features.SUMMARY_FILE}"),
            "train": self.path("train/metrics.json"),
            "gate": self.path("gate.json"),
            "predict": f"{self.predictions}/predictions.json"
            if self.args.distributed
            else self.predictions,
            "export": f"{self.serving}/saved_model.pb",
        }.get(stage)
        if marker is None:  # publish
            return runstate.published(self.root) == f"{runstate.RUNS_DIR}/{self.args.date}"
        return FileSystems.exists(marker)

    def save(self) -> None:
        runstate.write_run(self.root, self.args.date, self.record)

    # Stages: each returns the facts run.json records for it.
    def preprocess(self) -> dict:
        from pipeline import preprocess

        summary = preprocess.run(
            [
                "--input",
                ",".join(self.record["input"]),
                "--output_dir",
                self.path("preprocessed"),
                "--overwrite",
                *self.preprocess_argv,
                *self.stage_beam_argv("preprocess"),
            ]
        )
        keys = ("nusers", "nitems", "train_interactions", "eval_interactions")
        counters = summary.get("counters", {})
        return {
            "counts": {k: summary[k] for k in keys}
            | {k: counters.get(k, 0) for k in ("lines_read", "lines_rejected")}
        }

    def warm_start_from(self) -> str | None:
        """The published run's model dir when warm-starting, else None."""
        published = runstate.published_date(self.root)
        if self.args.warm_start is False or published is None or published == self.args.date:
            if self.args.warm_start and published is None:
                logger.warning("--warm_start: nothing is published yet; starting cold")
            return None
        from trainer.serving import model as model_lib

        model_dir = f"{runstate.run_dir(self.root, published)}/train"
        try:
            k = model_lib.load(model_dir).item_factors.shape[1]
        except FileNotFoundError:
            logger.warning("the published run %s has no model; starting cold", published)
            return None
        if k != self.trainer_args.latent_factors:
            logger.warning(
                "not warm-starting: the published model has %d latent factors, this run %d",
                k,
                self.trainer_args.latent_factors,
            )
            return None
        return model_dir

    def train(self) -> dict:
        from trainer import task

        warm = self.warm_start_from()
        num_iters = self.args.num_iters
        if num_iters is None:
            num_iters = WARM_NUM_ITERS if warm else self.trainer_args.num_iters
        argv = [
            "--input_dir",
            self.path("preprocessed"),
            "--output_dir",
            self.path("train"),
            "--overwrite",
            "--no_progress",
            *self.trainer_argv,
            "--num_iters",
            str(num_iters),
        ]
        if warm:
            argv += ["--warm_start_from", warm]
        if self.args.distributed:
            argv += ["--distributed", *self.stage_beam_argv("train")]
        result = task.run(argv)
        return {
            "warm_start_from": warm,
            "num_iters": num_iters,
            "train_seconds": result.get("train_seconds"),
            "metrics": {side: result[side] for side in ("wals", "popularity") if side in result},
        }

    def gate(self) -> dict:
        import json

        from trainer.evaluation import gate

        published = runstate.published_date(self.root)
        baseline = None
        if published is not None and published != self.args.date:
            baseline = f"{runstate.run_dir(self.root, published)}/train"
        config = gate.GateConfig(
            self.args.gate_k, self.args.gate_min_lift, self.args.gate_tolerance
        )
        decision = gate.evaluate(self.path("train"), self.path("preprocessed"), baseline, config)
        decision["published_run"] = published if baseline else None
        runstate.write_atomically(self.path("gate.json"), json.dumps(decision, indent=2))
        self.record["gate"] = decision
        return {"decision": decision["decision"], "reasons": decision["reasons"]}

    def predict(self) -> dict:
        from trainer import batch_predict

        argv = [
            "--model_dir",
            self.path("train"),
            "--output",
            self.predictions,
            "--k",
            str(self.args.predict_k),
            "--no_progress",
        ]
        if self.args.distributed:
            argv += ["--distributed", *self.stage_beam_argv("predict")]
        return {"lines": batch_predict.run(argv)}

    def export(self) -> dict:
        from trainer.serving import export
        from trainer.serving import model as model_lib

        if runstate.is_local(self.serving) and os.path.isdir(self.serving):
            shutil.rmtree(self.serving)  # ours: an earlier, interrupted export of this run
        elif FileSystems.exists(self.serving):
            FileSystems.delete([self.serving + "/"])
        k = self.trainer_args.export_k
        export.export_saved_model(model_lib.load(self.path("train")), self.serving, k=k)
        return {"saved_model": self.serving}

    def publish(self) -> dict:
        from trainer.evaluation import gate

        date = self.args.date
        with runstate.publish_lock(self.root):
            previous = runstate.published_date(self.root)
            gated = self.record.get("gate", {}).get("published_run")
            if previous is not None and previous > date:
                logger.warning("not publishing %s: the newer run %s is published", date, previous)
                return {"published": False, "reason": f"the newer run {previous} is published"}
            if previous not in (gated, date) and previous is not None:
                # Another date was published since the gate ran: judge against that one.
                facts = self.gate()
                self.record["stages"]["gate"].update(facts)
                if facts["decision"] != gate.PASS:
                    raise RejectedError("; ".join(facts["reasons"]))
            pointer = runstate.publish(self.root, date)
        logger.info("published %s (was %s)", pointer, previous)
        return {"published": True, "pointer": pointer, "previous": previous}

    def remove_leftovers(self) -> None:
        """Removes what killed launches of this date left half-written (staging directories,
        temporary files); holding the date's lock, nothing else can be writing them."""
        if not runstate.is_local(self.dir):
            return
        for directory in (self.dir, self.path("serving")):
            if not os.path.isdir(directory):
                continue
            for name in os.listdir(directory):
                if any(mark in name for mark in (".incomplete", ".tmp-", ".replaced-")):
                    path = os.path.join(directory, name)
                    logger.warning("removing %s, left by an interrupted launch", path)
                    if os.path.isdir(path):
                        shutil.rmtree(path)
                    else:
                        os.remove(path)

    def stage_beam_argv(self, stage: str) -> list[str]:
        several = len([s for s in self.stages if s in BEAM_STAGES]) > 1
        return _job_flags(self.beam_argv, stage, several)

    # The run.
    def execute(self) -> int:
        args = self.args
        self.stages = [s for s in args.stages.split(",") if s]
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise cli.UsageError(f"--stages: unknown stage(s) {bad}; expected some of {STAGES}")
        old = runstate.read_run(self.root, args.date) or {}
        first = min(STAGES.index(s) for s in self.stages) if self.stages else len(STAGES)
        stages = old.get("stages", {})
        if args.force:  # redo the stages asked for; those before them are their inputs
            stages = {name: entry for name, entry in stages.items() if name in STAGES[:first]}
        self.record = {
            "date": args.date,
            "root": self.root,
            "status": runstate.RUNNING,
            "started": runstate.now(),
            "finished": None,
            "attempts": old.get("attempts", 0) + 1,
            "argv": self.argv,
            "input": resolve_input(args.input, args.date, args.window_days),
            "stages": stages,
            "gate": old.get("gate") if "gate" in stages else None,
            "error": None,
        }
        for stage in STAGES[:first]:
            if not self.complete(stage):
                raise cli.UsageError(
                    f"--stages {args.stages}: the earlier stage {stage} of {args.date} is "
                    "not complete"
                )
            if stage == "gate" and self.record["stages"]["gate"]["decision"] != "pass":
                return self._rejected()  # a rejected model is never predicted nor published
        self.save()
        self.remove_leftovers()
        redo = args.force
        for stage in [s for s in STAGES if s in self.stages]:
            if self.complete(stage) and not redo:
                logger.info("stage %s of %s: done before, skipped", stage, args.date)
            else:
                redo = True
                try:
                    self._run_stage(stage)
                except RejectedError:
                    return self._rejected()
            if stage == "gate" and self.record["stages"]["gate"]["decision"] != "pass":
                return self._rejected()
        published = self.record["stages"].get("publish", {}).get("published")
        if "publish" in self.stages:
            self.record["status"] = runstate.PUBLISHED if published else runstate.PASSED
        else:
            self.record["status"] = runstate.PENDING  # --stages: the later ones are to come
        self.record["finished"] = runstate.now()
        self.save()
        return 0

    def _run_stage(self, stage: str) -> None:
        # The later stages' results were built on this stage's old output: forget them.
        for later in STAGES[STAGES.index(stage) + 1 :]:
            self.record["stages"].pop(later, None)
        if STAGES.index(stage) <= STAGES.index("gate"):
            self.record["gate"] = None
        entry = {"status": runstate.RUNNING, "started": runstate.now()}
        self.record["stages"][stage] = entry
        self.save()
        start = time.monotonic()
        logger.info("stage %s of %s: running", stage, self.args.date)
        try:
            facts = getattr(self, stage)()
        except BaseException as error:
            entry.update(status=runstate.FAILED, seconds=round(time.monotonic() - start, 3))
            entry["finished"] = runstate.now()
            self.record["status"] = (
                runstate.REJECTED if isinstance(error, RejectedError) else runstate.FAILED
            )
            self.record["error"] = f"{stage}: {type(error).__name__}: {error}"
            self.record["finished"] = runstate.now()
            self.save()
            raise
        entry.update(facts)
        entry.update(status=runstate.DONE, finished=runstate.now())
        entry["seconds"] = round(time.monotonic() - start, 3)
        self.save()

    def _rejected(self) -> int:
        reasons = self.record["stages"]["gate"]["reasons"]
        self.record["status"] = runstate.REJECTED
        self.record["error"] = "gate: " + "; ".join(reasons)
        self.record["finished"] = runstate.now()
        self.save()
        logger.error(
            "the gate rejected the run of %s; %s stays published:\n  %s",
            self.args.date,
            runstate.published(self.root),
            "\n  ".join(reasons),
        )
        return EXIT_REJECTED


def run(argv: list[str] | None = None) -> int:
    """Parses flags and runs the date's stages; returns the exit status (0, 1).

    Raises:
        cli.UsageError: a bad flag, or no input for the date; nothing was run.
        runstate.LockedError: another launch of the date holds its lock.
        Exception: a stage failed; run.json names it, and `published` is unchanged.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = build_parser().parse_known_args(argv)
    try:
        datetime.date.fromisoformat(args.date)
    except ValueError:
        raise cli.UsageError(f"--date must be YYYY-MM-DD, got {args.date!r}") from None
    if args.window_days < 1:
        raise cli.UsageError(f"--window_days must be >= 1, got {args.window_days}")
    if args.num_iters is not None and args.num_iters < 0:
        raise cli.UsageError(f"--num_iters must be >= 0, got {args.num_iters}")
    from trainer.evaluation import gate

    try:
        gate.GateConfig(args.gate_k, args.gate_min_lift, args.gate_tolerance).validate()
    except ValueError as error:
        raise cli.UsageError(str(error)) from None
    resolve_input(args.input, args.date, args.window_days)  # before taking the lock
    this = Run(args, extra, argv)
    with runstate.date_lock(this.root, args.date, args.lock_wait):
        return this.execute()


def main(argv: list[str] | None = None) -> int:
    """The command line: runs, and maps the outcome to the exit status of the module doc."""
    cli.configure_logging()
    # A scheduler stops a task with SIGTERM: unwind, so that run.json records the stage as
    # failed and its staging directory is removed (SIGKILL is safe too, only less tidy).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return run(argv)
    except cli.UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except runstate.LockedError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_LOCKED
    except Exception:
        traceback.print_exc()
        print("error: the run failed; its run.json names the stage", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
