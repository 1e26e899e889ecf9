"""s3:// on this machine: moto's standalone server, for Beam's S3 filesystem.

    with S3Emulator() as s3:
        s3.create_bucket("ga-wals")             # -> "s3://ga-wals"
        s3.put("ga-wals", "a/b.txt", b"...")
        s3.flags                                # Beam's S3 options that reach the server
        s3.list_objects("ga-wals")              # every key, sorted

moto's server (`python -m moto.server`) runs in a venv of its own (its pins need not agree with
the project's), made from tests/requirements-s3.txt and cached under ~/.cache/ga-wals keyed by its
hash, as the GCS emulator's tools are (`local_services.cached_venv`; the first install takes
under a minute, and skips the test only when the package index cannot be reached). It listens on
a free port of 127.0.0.1, keeps everything in memory and is stopped on exit.

Beam reaches it through its S3 options, `flags` (an endpoint and fake static credentials); the
test itself talks to it with boto3, which the project's test extra installs (apache-beam[aws]).
Nothing is set in os.environ: a run that forgets the flags goes to AWS, and fails there.
"""

from __future__ import annotations

import os
import subprocess
import tempfile

from local_services import cached_venv, free_port, stop_process_groups, wait_for_port

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIREMENTS = os.path.join(HERE, "requirements-s3.txt")
START_TIMEOUT_S = 60
KEY_ID, SECRET, REGION = "ga-wals-test", "ga-wals-secret", "us-east-1"


class S3Emulator:
    """Starts moto's server; stops it on exit.

    Attributes:
        url: the server's address, `http://127.0.0.1:PORT`.
        flags: Beam's S3 options for it (`--s3_endpoint_url` and fake credentials).
    """

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self._scratch = tempfile.TemporaryDirectory(prefix="ga-wals-s3-")
        self.url = ""
        self.flags: list[str] = []

    def __enter__(self) -> S3Emulator:
        home = cached_venv("s3-venv", REQUIREMENTS)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        with open(os.path.join(self._scratch.name, "moto.log"), "wb") as log:
            self._process = subprocess.Popen(
                [os.path.join(home, "bin", "python"), "-m", "moto.server"]
                + ["-H", "127.0.0.1", "-p", str(port)],
                cwd=self._scratch.name,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_for_port(port, self._process, "moto", self.log, START_TIMEOUT_S)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.flags = [
            f"--s3_endpoint_url={self.url}",
            f"--s3_access_key_id={KEY_ID}",
            f"--s3_secret_access_key={SECRET}",
            f"--s3_region_name={REGION}",
        ]
        return self

    def log(self) -> str:
        """What the server printed."""
        with open(os.path.join(self._scratch.name, "moto.log"), errors="replace") as handle:
            return handle.read()

    def __exit__(self, *exc) -> None:
        if self._process is not None:
            stop_process_groups([self._process])
            self._process = None
        self._scratch.cleanup()

    # The S3 API, straight to the server.
    def client(self):
        """A boto3 S3 client of the server."""
        import boto3

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=KEY_ID,
            aws_secret_access_key=SECRET,
            region_name=REGION,
        )

    def create_bucket(self, name: str) -> str:
        """Creates bucket `name` (3 to 63 characters); returns `s3://name`."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def put(self, bucket: str, key: str, data: bytes) -> str:
        """Writes one object; returns its `s3://` path."""
        self.client().put_object(Bucket=bucket, Key=key, Body=data)
        return f"s3://{bucket}/{key}"

    def list_objects(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key in `bucket` under `prefix`, sorted."""
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))
