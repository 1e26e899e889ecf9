"""scripts/ensure_venv.sh: the terminal shows what it does, pip's output goes to a log that is
printed only when an install fails. A fake virtualenv whose python plays pip stands in for pip."""

from __future__ import annotations

import os
import subprocess

import pytest

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
FAKE_PIP = """#!/usr/bin/env bash
echo "pip stdout: Collecting things"
echo "pip stderr: WARNING: a build warning" >&2
if [ -n "${FAIL:-}" ]; then echo "ERROR: no matching distribution" >&2; exit 1; fi
"""


def _source(
    tmp_path, fail: bool = False, pip_log: str | None = None
) -> subprocess.CompletedProcess:
    """Sources the script from a `set -euo pipefail` caller, as run_tests.sh does."""
    venv = tmp_path / "venv"
    if not venv.exists():
        (venv / "bin").mkdir(parents=True)
        (venv / "bin" / "python").write_text(FAKE_PIP)
        (venv / "bin" / "python").chmod(0o755)
        (tmp_path / "setup.py").write_text("# the stamp hashes this\n")
    caller = f'set -euo pipefail\nsource {SCRIPTS}/ensure_venv.sh test\necho "sourced"\n'
    env = {**os.environ, "VENV": str(venv), "FAIL": "1" if fail else ""}
    env.pop("PIP_LOG", None)
    if pip_log:
        env["PIP_LOG"] = str(tmp_path / pip_log)
    return subprocess.run(
        ["bash", "-c", caller], cwd=tmp_path, env=env, capture_output=True, text=True
    )


def test_a_good_install_shows_only_its_own_lines(tmp_path):
    done = _source(tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "sourced\n"
    assert done.stderr.splitlines() == [
        f"installing the project into {tmp_path / 'venv'} (extras: test); the first time takes "
        "a few minutes"
    ]
    log = (tmp_path / "venv" / "pip.log").read_text()
    assert "WARNING: a build warning" in log and "Collecting things" in log
    stamps = [name for name in os.listdir(tmp_path / "venv") if name.startswith(".installed-")]
    assert len(stamps) == 1 and stamps[0].endswith("-test")
    again = _source(tmp_path)
    assert (again.returncode, again.stdout, again.stderr) == (0, "sourced\n", "")  # up to date


@pytest.mark.parametrize("pip_log", [None, "logs/install.log"])  # run_local.sh sets PIP_LOG
def test_a_failed_install_prints_the_end_of_the_log_and_stops_the_caller(tmp_path, pip_log):
    done = _source(tmp_path, fail=True, pip_log=pip_log)
    assert done.returncode == 1
    assert done.stdout == ""  # the calling script stopped
    log = tmp_path / (pip_log or "venv/pip.log")
    assert f"pip install failed; the last lines of {log}:" in done.stderr
    assert "  | ERROR: no matching distribution" in done.stderr
    assert "  | pip stderr: WARNING: a build warning" in done.stderr
    assert "ERROR: no matching distribution" in log.read_text()
    assert not [n for n in os.listdir(tmp_path / "venv") if n.startswith(".installed-")]
