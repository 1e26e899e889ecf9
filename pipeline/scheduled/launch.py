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
from pipeline.scheduled.flags import EXIT_LOCKED, build_parser, check_locations
from pipeline.scheduled.inputs import resolve_input
from pipeline.scheduled.stages import Run


def run(argv: list[str] | None = None) -> int:
    """Parses flags and runs the date's stages; returns the exit status (0, 1).

    Raises:
        cli.UsageError: a bad flag, a location the run cannot use, or no input for the date;
            nothing was run.
        runstate.LockedError: another launch of the date holds its lock (or, on gs://, took
            it over from this one: LockLostError).
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
    if not args.lock_lease_seconds > 0:
        raise cli.UsageError(f"--lock_lease_seconds must be > 0, got {args.lock_lease_seconds}")
    runstate.check_root(args.root)
    from trainer.evaluation import gate

    try:
        gate.GateConfig(args.gate_k, args.gate_min_lift, args.gate_tolerance).validate()
    except ValueError as error:
        raise cli.UsageError(str(error)) from None
    resolve_input(args.input, args.date, args.window_days, extra)  # before taking the lock
    this = Run(args, extra, argv)
    check_locations(args, this.beam_argv)
    lease = args.lock_lease_seconds
    with runstate.date_lock(this.root, args.date, args.lock_wait, lease_seconds=lease) as lock:
        this.lock = lock
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
