"""common.cli's logging: what run_local.sh shows the user, and what it keeps in the step's log."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import logging, os, warnings
    from common import cli

    cli.configure_logging()
    cli.configure_logging()  # A second call must not show everything twice.
    logging.getLogger("__main__").info("entry point progress")
    logging.getLogger("trainer.local.train").info("iteration 1/2")
    logging.getLogger("common.staging").warning("left /data: not ours")
    logging.getLogger("absl").warning("TFT prefers record batches")
    logging.getLogger().info("Missing pipeline option (runner).")
    logging.getLogger("apache_beam.runners").error("a worker died")
    warnings.warn("a library's deprecation")
    os.write(2, b"E0000 cuda_platform.cc:52] failed call to cuInit\\n")
    """
)


def run(with_console: bool) -> tuple[str, str]:
    """(console, stderr) of SCRIPT; the console is a pipe named by GA_WALS_CONSOLE_FD."""
    read_end, write_end = os.pipe()
    env = {**os.environ, "GA_WALS_CONSOLE_FD": str(write_end) if with_console else ""}
    try:
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT],
            env=env,
            pass_fds=(write_end,),
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
    finally:
        os.close(write_end)
    with os.fdopen(read_end, encoding="utf-8") as console:
        return console.read(), done.stderr


def test_console_shows_our_progress_and_warnings_and_anyones_errors():
    console, stderr = run(with_console=True)
    assert console.splitlines() == [
        "entry point progress",
        "iteration 1/2",
        "WARNING: left /data: not ours",
        "ERROR: a worker died",
    ]
    # The log keeps everything, third-party warnings and the C++ line included.
    for text in (
        "INFO trainer.local.train: iteration 1/2",
        "WARNING absl: TFT prefers record batches",
        "a library's deprecation",
        "failed call to cuInit",
    ):
        assert text in stderr


def test_without_a_console_everything_goes_to_stderr():
    console, stderr = run(with_console=False)
    assert console == ""
    assert "INFO __main__: entry point progress" in stderr
    assert "WARNING common.staging: left /data: not ours" in stderr
