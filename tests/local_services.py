"""What the tests that start local services share: free ports, waiting for a service to listen,
stopping what they started, and tool virtualenvs cached across runs (Airflow, the GCS emulator's
tools).

    port = free_port()
    stop_process_groups(processes)                 # SIGTERM, then SIGKILL after 20 s
    wait_for_port(port, process, name, log)        # until it listens; else an error with log()
    home = cached_venv("gcs-venv", requirements)   # ~/.cache/ga-wals/gcs-venv-<hash>/
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import venv

import pytest

# Shared with benchmarks/scale.py, which cannot import from tests/.
from benchmarks.portable_services import free_port, stop_process_groups, wait_for_port

__all__ = ["cached_venv", "free_port", "stop_process_groups", "wait_for_port"]

CACHE = os.environ.get("GA_WALS_CACHE", os.path.expanduser("~/.cache/ga-wals"))
INSTALL_TIMEOUT_S = 420
# pip's words for an index it could not reach (as opposed to a bad pin, which must fail).
UNREACHABLE = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "No route to host",
    "ConnectTimeoutError",
    "Read timed out",
    "ProxyError",
)


def cached_venv(prefix: str, requirements: str) -> str:
    """The directory of a virtualenv holding `requirements`, created and filled when needed.

    It lives under `CACHE` as `<prefix>-<hash of the requirements file>`, so a new pin makes a
    new venv; an interrupted install is started again. Skips the test only when the package
    index cannot be reached; any other install failure fails it.
    """
    with open(requirements, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()[:12]
    home = os.path.join(CACHE, f"{prefix}-{digest}")
    done = os.path.join(home, ".installed")
    if os.path.exists(done):
        return home
    shutil.rmtree(home, ignore_errors=True)  # an earlier, interrupted install
    venv.EnvBuilder(with_pip=True, clear=True).create(home)
    result = subprocess.run(
        [os.path.join(home, "bin", "python"), "-m", "pip", "install", "--quiet"]
        + ["-r", requirements],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
    )
    if result.returncode != 0:
        output = result.stdout + result.stderr
        shutil.rmtree(home, ignore_errors=True)
        if any(sign in output for sign in UNREACHABLE):
            pytest.skip(f"the package index is unreachable: {output.strip()[-400:]}")
        pytest.fail(f"pip install -r {requirements} failed:\n{output[-3000:]}")
    with open(done, "w") as handle:
        handle.write(digest)
    return home
