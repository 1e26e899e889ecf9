"""`python -m pipeline.run`: checks the flags, takes the date's lock, runs, and maps the outcome
to the exit status (0 published or already published, 1 rejected or a stage failed, 2 a bad flag
or no input for the date, 75 another launch of the date holds its lock).
"""

from __future__ import annotations

import datetime
import signal
import sys
import traceback

from common import cli
from pipeline import runstate
from pipeline.scheduled.flags import EXIT_LOCKED, build_parser
from pipeline.scheduled.inputs import resolve_input
from pipeline.scheduled.stages import Run


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
    resolve_input(args.input, args.date, args.window_days, extra)  # before taking the lock
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
