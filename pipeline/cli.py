"""Command-line plumbing shared by the entry points: flag parsing and checks before a run."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from apache_beam.options.pipeline_options import PipelineOptions


class UsageError(ValueError):
    """A bad flag or input location, found before any work starts."""


def unknown_flags(argv: list[str]) -> list[str]:
    """Flags in argv that no registered `PipelineOptions` subclass defines (e.g. typos)."""
    options = PipelineOptions(argv)
    known = set(options.get_all_options(drop_default=False))
    everything = options.get_all_options(drop_default=False, retain_unknown_options=True)
    return sorted(f"--{name}" for name in everything if name not in known)


def parse_options(argv: list[str] | None, view: type[PipelineOptions]) -> PipelineOptions:
    """Parses argv into PipelineOptions, refusing flags that nothing defines.

    Raises:
        UsageError: a flag is unknown; the message names it.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    unknown = unknown_flags(argv)
    if unknown:
        raise UsageError(f"unknown flag(s): {', '.join(unknown)} (see --help)")
    options = PipelineOptions(argv)
    options.view_as(view)
    return options


def print_help(prog: str, description: str, view: type[PipelineOptions]) -> None:
    """Prints the flags of a PipelineOptions view (Beam's own --help lists none of them)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    view._add_argparse_args(parser)
    parser.print_help()
    print(
        "\nEvery other flag is a Beam pipeline option: --runner, --project, --region, "
        "--temp_location,\n--setup_file, --direct_num_workers, --direct_running_mode, "
        "--flink_master, ..."
    )


def main_with_usage_errors(
    run, argv: list[str] | None = None, print_usage: Callable[[], None] | None = None
) -> int:
    """Runs `run(argv)`, turning UsageError into a one-line message and exit status 2.

    With -h/--help in argv, calls `print_usage` instead (when given; else `run` handles it).
    """
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # TensorFlow and Beam's own INFO chatter drowns the pipeline's; their warnings stay.
    for noisy in ("tensorflow", "apache_beam", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if argv is None:
        argv = sys.argv[1:]
    if print_usage is not None and ("-h" in argv or "--help" in argv):
        print_usage()
        return 0
    try:
        run(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
