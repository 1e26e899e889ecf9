"""Beam's portable job API on this machine: a job service and one EXTERNAL worker pool.

    with PortableRunner() as portable:
        preprocess.run([..., *portable.flags])

This is the setup closest to Dataflow and Flink that runs here: the launcher hands a pipeline
proto to a separate job-service process, which runs it on SDK workers that the worker pool
starts as separate processes (its children); the workers share nothing with the launcher but
the files. The portable-runner tests (`tests/portable.py`) and `benchmarks.scale` use it.

Pitfalls it guards against:
- gRPC servers bind a busy port without complaint, so a stale pool on the same port makes jobs
  hang until a 300 s deadline. Ports are picked free, and each service is checked to be ours
  (its process is alive and its port accepts connections) before use.
- The worker pool starts workers with `python`, so the venv's `bin` goes first on PATH; the pool
  and the service run from a scratch directory, so workers import the project as installed
  (the editable install), not from the launcher's working directory, unless `pythonpath`
  names a checkout for them to import instead.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

_START_TIMEOUT_S = 60


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port of `host` that nothing listens on now (the OS picks it)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def stop_process_groups(processes: list[subprocess.Popen], grace_s: float = 20) -> None:
    """Ends each process's group (started with start_new_session=True): SIGTERM, then SIGKILL
    for whatever still runs after `grace_s`; waits for every one."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 15)
    for process in processes:
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 9)
            process.wait()


def read_log(path: str) -> str:
    """The text a service wrote to its log file (undecodable bytes replaced)."""
    with open(path, errors="replace") as handle:
        return handle.read()


def wait_for_port(
    port: int,
    process: subprocess.Popen,
    name: str,
    log: Callable[[], str],
    timeout_s: float = _START_TIMEOUT_S,
    host: str = "127.0.0.1",
) -> None:
    """Returns once `host`:`port` accepts TCP connections while `process` runs.

    Raises:
        RuntimeError: `process` exited first, or nothing listened within `timeout_s`; the
            message holds `name` and `log()` (what the process printed).
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{log()}")
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{name} did not listen on port {port} within {timeout_s} s:\n{log()}")


class PortableRunner:
    """Starts a job service and a worker pool on free ports; stops both on exit.

    Args:
        pythonpath: a directory the services and their workers import the project from (its
            checkout); None: the installed project.
        job_service_module: the module run as the job service (`python -m`, with --port);
            `benchmarks.logged_job_service` logs the stage of each bundle.

    Attributes:
        flags: the Beam flags that submit a pipeline to them.
        job_service_pid, worker_pool_pid: their process IDs (the pool's children are the SDK
            workers), set on entry.
        job_service_log: the job service's stdout and stderr (a file removed on exit).
    """

    def __init__(
        self,
        pythonpath: str | None = None,
        job_service_module: str = "apache_beam.runners.portability.local_job_service_main",
    ) -> None:
        self._processes: list[subprocess.Popen] = []
        self._scratch = tempfile.TemporaryDirectory(prefix="ga-wals-portable-")
        self._pythonpath = pythonpath
        self._job_service_module = job_service_module
        self.job_service_log = os.path.join(self._scratch.name, "job_service.log")
        self.flags: list[str] = []
        self.job_service_pid: int | None = None
        self.worker_pool_pid: int | None = None

    def _start(self, name: str, args: list[str], port: int) -> int:
        bin_dir = os.path.dirname(sys.executable)
        env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
        env.pop("PYTHONPATH", None)
        if self._pythonpath:
            env["PYTHONPATH"] = self._pythonpath
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
        wait_for_port(port, process, name, lambda: read_log(log))
        return process.pid

    def __enter__(self) -> PortableRunner:
        job_port, pool_port = free_port(), free_port()
        while pool_port == job_port:
            pool_port = free_port()
        try:
            self.job_service_pid = self._start(
                "job_service",
                [self._job_service_module, "--port", str(job_port)],
                job_port,
            )
            self.worker_pool_pid = self._start(
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
