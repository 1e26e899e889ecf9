"""Beam's portable job API on this machine: a job service and one EXTERNAL worker pool.

    with PortableRunner() as portable:
        preprocess.run([..., *portable.flags])

This is the setup closest to Dataflow and Flink that runs here: the launcher hands a pipeline
proto to a separate job-service process, which runs it on SDK workers that the worker pool
starts as separate processes; the workers share nothing with the launcher but the files, which
`flags` says with --workers_share_filesystem (without it, the entry points refuse local paths for
EXTERNAL workers: `common.locations`).

Pitfalls it guards against:
- gRPC servers bind a busy port without complaint, so a stale pool on the same port makes jobs
  hang until a 300 s deadline. Ports are picked free, and each service is checked to be ours
  (its process is alive and its port accepts connections) before use.
- The worker pool starts workers with `python`, so the venv's `bin` goes first on PATH; the pool
  and the service run from a scratch directory, so workers import the project as installed
  (the editable install), not from the launcher's working directory.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time

from local_services import free_port, stop_process_groups

_START_TIMEOUT_S = 60


def _wait_for_port(port: int, process: subprocess.Popen, name: str, log: str) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            with open(log, errors="replace") as handle:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{handle.read()}")
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
            if sock.connect_ex(("localhost", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{name} did not listen on port {port} within {_START_TIMEOUT_S} s")


class PortableRunner:
    """Starts a job service and a worker pool on free ports; stops both on exit.

    Attributes:
        flags: the Beam flags that submit a pipeline to them.
    """

    def __init__(self) -> None:
        self._processes: list[subprocess.Popen] = []
        self._scratch = tempfile.TemporaryDirectory(prefix="ga-wals-portable-")
        self.flags: list[str] = []

    def _start(self, name: str, args: list[str], port: int) -> None:
        bin_dir = os.path.dirname(sys.executable)
        env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
        env.pop("PYTHONPATH", None)
        log = os.path.join(self._scratch.name, f"{name}.log")
        with open(log, "wb") as handle:
            process = subprocess.Popen(
                [sys.executable, "-m", *args],
                cwd=self._scratch.name,
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._processes.append(process)
        _wait_for_port(port, process, name, log)

    def __enter__(self) -> PortableRunner:
        job_port, pool_port = free_port(), free_port()
        while pool_port == job_port:
            pool_port = free_port()
        try:
            self._start(
                "job_service",
                ["apache_beam.runners.portability.local_job_service_main", "--port", str(job_port)],
                job_port,
            )
            self._start(
                "worker_pool",
                ["apache_beam.runners.worker.worker_pool_main", "--service_port", str(pool_port)],
                pool_port,
            )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.flags = [
            "--runner",
            "PortableRunner",
            f"--job_endpoint=localhost:{job_port}",
            "--environment_type",
            "EXTERNAL",
            f"--environment_config=localhost:{pool_port}",
            # The pool's workers run on this machine: local (absolute) paths are theirs too.
            "--workers_share_filesystem",
        ]
        return self

    def pids(self) -> list[int]:
        """The job service's and the worker pool's process IDs."""
        return [process.pid for process in self._processes]

    def __exit__(self, *exc) -> None:
        stop_process_groups(self._processes)
        self._processes.clear()
        self._scratch.cleanup()
