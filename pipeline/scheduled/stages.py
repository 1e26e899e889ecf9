"""One date's run: its paths under ROOT/runs/DATE/, its run.json record, and its stages.

Each stage method runs the project's own entry point in this process and returns the facts
run.json records for it; `Run.execute` decides which stages run (see `pipeline.scheduled`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time

from apache_beam.io.filesystems import FileSystems

from common import cli, staging
from common.atomic import is_local, is_temporary, write_text_atomically
from pipeline import locks, runstate
from pipeline.scheduled.flags import (
    BEAM_STAGES,
    EXIT_REJECTED,
    STAGES,
    WARM_NUM_ITERS,
    job_flags,
    preprocess_parser,
    split_flags,
)
from pipeline.scheduled.inputs import resolve_input
from transforms import features

logger = logging.getLogger(__name__)

PUBLISH_TRIES = 3  # reads of `published` when another launch replaces it in between


class RejectedError(RuntimeError):
    """The gate rejected the candidate; the run is kept on disk with the reasons."""


class Run:
    """One date's run: its paths, its run.json record and the stages (see the module doc)."""

    def __init__(self, args: argparse.Namespace, extra: list[str], argv: list[str]):
        from trainer import task  # TensorFlow: only once the flags are known to be good

        self.args = args
        self.argv = argv
        self.root = args.root.rstrip("/")
        self.dir = runstate.run_dir(self.root, args.date)
        self.trainer_argv, rest = split_flags(extra, task.build_parser())
        self.preprocess_argv, self.beam_argv = split_flags(rest, preprocess_parser())
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
        self.lock: locks.Held | None = None  # the date's lock, once `launch` holds it

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
        if self.lock is not None:
            self.lock.check()  # a launch whose gs:// lock was taken over writes nothing more
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
            k = model_lib.read_config(model_dir)["latent_factors"]
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
        from trainer.evaluation import gate

        published = runstate.published_date(self.root)
        baseline = None
        if published is not None and published != self.args.date:
            baseline = f"{runstate.run_dir(self.root, published)}/train"
        config = gate.GateConfig(
            self.args.gate_k, self.args.gate_min_lift, self.args.gate_tolerance
        )
        beam_argv = self.stage_beam_argv("gate") if self.args.distributed else None
        decision = gate.evaluate(
            self.path("train"), self.path("preprocessed"), baseline, config, beam_argv
        )
        decision["published_run"] = published if baseline else None
        write_text_atomically(self.path("gate.json"), json.dumps(decision, indent=2))
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
        from trainer.serving import export, export_copy, version_dir

        # replace: an export of this date that run.json does not record (--force, a retrained
        # model, a launch killed before run.json was saved); an interrupted one is redone.
        # The train stage's own export (train/export, same k and serving model) is copied, not
        # written again; without it the model's files are streamed chunk by chunk: this process
        # never holds the model.
        export.export_saved_model(
            self.path("train"),
            self.serving,
            k=self.trainer_args.export_k,
            replace=True,
            serving_model=self.trainer_args.serving_model,
            copy_from=self.path("train/export"),
        )
        facts = version_dir.read_facts(self.serving) or {}
        return {"saved_model": self.serving, "copied_from": facts.get(export_copy.COPIED_FROM)}

    def publish(self) -> dict:
        """Compares against `published` and replaces it, if it is still the version read."""
        from trainer.evaluation import gate

        date = self.args.date
        lease = self.args.lock_lease_seconds
        with runstate.publish_lock(self.root, lease_seconds=lease):
            for attempt in range(PUBLISH_TRIES):
                current = runstate.read_published(self.root)
                previous = current.date
                gated = self.record.get("gate", {}).get("published_run")
                if previous is not None and previous > date:
                    logger.warning(
                        "not publishing %s: the newer run %s is published", date, previous
                    )
                    return {"published": False, "reason": f"the newer run {previous} is published"}
                if previous not in (gated, date) and previous is not None:
                    # Another date was published since the gate ran: judge against that one.
                    facts = self.gate()
                    self.record["stages"]["gate"].update(facts)
                    if facts["decision"] != gate.PASS:
                        raise RejectedError("; ".join(facts["reasons"]))
                if self.lock is not None:
                    self.lock.check()
                try:
                    pointer = runstate.publish(self.root, date, current)
                    break
                except runstate.PointerMovedError as error:
                    if attempt + 1 == PUBLISH_TRIES:
                        raise
                    logger.warning("%s; reading it again", error)
        logger.info("published %s (was %s)", pointer, previous)
        return {"published": True, "pointer": pointer, "previous": previous}

    def remove_leftovers(self) -> None:
        """Removes what killed launches of this date left half-written (staging directories,
        temporary files); holding the date's lock, nothing else can be writing them."""
        if not is_local(self.dir):
            for directory in (self.dir, self.path("serving")):
                for name in staging.child_names(directory):
                    if is_temporary(name):
                        path = f"{directory}/{name}"
                        logger.warning("removing %s, left by an interrupted launch", path)
                        staging.delete_tree(path)
            return
        for directory in (self.dir, self.path("serving")):
            if not os.path.isdir(directory):
                continue
            for name in os.listdir(directory):
                if is_temporary(name):
                    path = os.path.join(directory, name)
                    logger.warning("removing %s, left by an interrupted launch", path)
                    if os.path.isdir(path):
                        shutil.rmtree(path)
                    else:
                        os.remove(path)

    def stage_beam_argv(self, stage: str) -> list[str]:
        several = len([s for s in self.stages if s in BEAM_STAGES]) > 1
        return job_flags(self.beam_argv, stage, several)

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
