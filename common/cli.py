"""Command-line plumbing shared by the entry points: flag parsing, checks before a run, logging.

Logging: INFO and up go to stderr. When the environment variable GA_WALS_CONSOLE_FD names an open
file descriptor (run_local.sh sets it, with stderr sent to a log file), the user also sees there
what is meant for them: this project's records from INFO up and anyone's errors. TensorFlow's C++
start-up lines, Beam's and TF Transform's notices and Python warnings stay in the log.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from apache_beam.io.filesystems import FileSystems
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
    """Parses argv into PipelineOptions, refusing flags that nothing defines, and hands them to
    Beam's FileSystems (so that s3:// and hdfs:// paths are read with the run's flags).

    Raises:
        UsageError: a flag is unknown; the message names it.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    unknown = unknown_flags(argv)
    if unknown:
        raise UsageError(f"unknown flag(s): {', '.join(unknown)} (see --help)")
    options = PipelineOptions(argv)
    options.view_as(view)
    # Beam's filesystems read their own flags (--s3_endpoint_url, --hdfs_host, ...) from the
    # options FileSystems holds, which a Pipeline sets only once it is built; the entry points
    # check and size their input before that.
    FileSystems.set_options(options)
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
        "--flink_master, ...\n--workers_share_filesystem: the workers see this machine's files "
        "(local paths are then\naccepted on any runner)"
    )


CONSOLE_FD_ENV = "GA_WALS_CONSOLE_FD"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers of this project; "__main__" is the entry point run with `python -m`.
OWN_LOGGERS = ("__main__", "common", "pipeline", "transforms", "trainer")


def is_own_logger(name: str) -> bool:
    """True for the loggers of this project's modules (and of the `python -m` entry point)."""
    return name.split(".")[0] in OWN_LOGGERS


class _ForTheUser(logging.Filter):
    """Passes this project's records from INFO up and anyone's from ERROR up."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or (
            record.levelno >= logging.INFO and is_own_logger(record.name)
        )


class _ConsoleFormatter(logging.Formatter):
    """The message alone; warnings and errors say so ("WARNING: ...")."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return f"{record.levelname}: {message}" if record.levelno >= logging.WARNING else message


class _ConsoleHandler(logging.StreamHandler):
    """The handler writing to $GA_WALS_CONSOLE_FD (its own class, so it is added only once)."""


def configure_logging() -> None:
    """Sends INFO and up to stderr, and the user's share to $GA_WALS_CONSOLE_FD when it is set.

    TensorFlow's and Beam's own INFO chatter is dropped everywhere; their warnings stay in
    stderr. An unset, malformed or closed $GA_WALS_CONSOLE_FD leaves stderr as the only output.
    """
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    for noisy in ("tensorflow", "apache_beam", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    root = logging.getLogger()
    fd = os.environ.get(CONSOLE_FD_ENV, "")
    if not fd.isdigit() or any(isinstance(h, _ConsoleHandler) for h in root.handlers):
        return
    try:  # Left open for the life of the process, like sys.stderr.
        console = open(
            int(fd), "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False
        )
    except OSError:
        return
    handler = _ConsoleHandler(console)
    handler.addFilter(_ForTheUser())
    handler.setFormatter(_ConsoleFormatter())
    root.addHandler(handler)


def main_with_usage_errors(
    run, argv: list[str] | None = None, print_usage: Callable[[], None] | None = None
) -> int:
    """Runs `run(argv)`, turning UsageError into a one-line message and exit status 2.

    With -h/--help in argv, calls `print_usage` instead (when given; else `run` handles it).
    """
    configure_logging()
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
