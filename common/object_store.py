"""Conditional writes of small gs:// objects: create-if-absent, replace-if-unchanged, and delete.

An object's *generation* is the number GCS gives each version of it; a write or delete
conditioned on `if_generation_match=G` happens only while the object's generation is still G,
and G = 0 means "only if there is no object". These are the compare-and-swap of an object store,
on which the scheduled run builds its locks and its `published` pointer (`pipeline.runstate`).

    version = read("gs://b/root/published")        # Version(data, generation, updated) | None
    generation = write_if("gs://b/root/published", b"runs/2026-11-22\\n", version.generation)
    if generation is None: ...                      # someone replaced it since: re-read

Only gs:// has them here (`has_preconditions`); Beam's FileSystems have no conditional write.
The client is the one Beam's gcsio makes (`gcsio.create_storage_client` with default pipeline
options): the same credentials, and `STORAGE_EMULATOR_HOST` sends it to an emulator.

Each write is one simple (multipart, not resumable) upload: the objects are small, and the GCS
emulator used in tests (fake-gcs-server 1.54) honours preconditions on simple uploads only. It
ignores them on delete (real GCS honours them), which is why a stale lock is taken over by a
conditional replace, never by a conditional delete (`pipeline.object_locks`).

A write whose response is lost is retried by google-cloud-storage (conditional writes are
idempotent); the retry then fails its precondition against the write's own result, so on a
precondition failure `write_if` reads the object back, and returns its generation when it holds
exactly the bytes written. Callers make each write's bytes unique (a lock holds its owner's id
and a timestamp), or else do not mind whose identical write it was (the pointer).
"""

from __future__ import annotations

import dataclasses
import os
import threading

SCHEME = "gs://"
_clients: dict = {}
_clients_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Version:
    """One version of an object: its bytes, its generation (> 0) and its update time.

    Attributes:
        data: the object's bytes.
        generation: the GCS generation of this version.
        updated: when the store wrote this version, in seconds since the epoch (the store's
            clock, not the writer's).
    """

    data: bytes
    generation: int
    updated: float


def has_preconditions(path: str) -> bool:
    """Whether `path` is on a store with conditional writes here (gs://)."""
    return path.startswith(SCHEME)


def _split(path: str) -> tuple[str, str]:
    if not has_preconditions(path):
        raise ValueError(f"not a gs:// path: {path!r}")
    bucket, _, name = path[len(SCHEME) :].partition("/")
    if not bucket or not name:
        raise ValueError(f"a gs:// object needs a bucket and a name: {path!r}")
    return bucket, name


def client():
    """A google.cloud.storage.Client made as Beam's gcsio makes its own; one per process and
    `STORAGE_EMULATOR_HOST` (read when a client is made: tests start emulators)."""
    key = os.environ.get("STORAGE_EMULATOR_HOST")
    with _clients_lock:
        if key not in _clients:
            from apache_beam.io.gcp import gcsio
            from apache_beam.options.pipeline_options import PipelineOptions

            _clients[key] = gcsio.create_storage_client(PipelineOptions())
        return _clients[key]


def _blob(path: str):
    bucket, name = _split(path)
    return client().bucket(bucket).blob(name)


def read(path: str) -> Version | None:
    """The object's current version, or None when there is none.

    The bytes are read with `if_generation_match` of the generation the metadata named, so data
    and generation always belong together (a version replaced in between is read again).
    """
    from google.api_core import exceptions

    bucket, name = _split(path)
    while True:
        blob = client().bucket(bucket).get_blob(name)
        if blob is None:
            return None
        try:
            data = blob.download_as_bytes(if_generation_match=blob.generation)
        except (exceptions.PreconditionFailed, exceptions.NotFound):
            continue  # replaced or deleted since the metadata was read
        return Version(data, int(blob.generation), blob.updated.timestamp())


def write_if(path: str, data: bytes, generation: int) -> int | None:
    """Writes `data` to `path` only if the object's generation is `generation` (0: absent).

    Returns:
        The new generation, or None when the precondition failed (the object exists, or was
        replaced or deleted since `generation` was read).
    """
    from google.api_core import exceptions

    blob = _blob(path)
    try:
        blob.upload_from_string(
            data, content_type="application/octet-stream", if_generation_match=generation
        )
    except exceptions.PreconditionFailed:
        current = read(path)  # our own write, its response lost and retried? (module doc)
        return current.generation if current is not None and current.data == data else None
    return int(blob.generation)


def delete_if(path: str, generation: int) -> bool:
    """Deletes the object only if its generation is `generation`; whether it was deleted.

    False when it is gone already or has another generation. (Real GCS enforces the condition;
    the fake-gcs-server emulator ignores it on delete: the module doc.)
    """
    from google.api_core import exceptions

    try:
        _blob(path).delete(if_generation_match=generation)
    except (exceptions.PreconditionFailed, exceptions.NotFound):
        return False
    return True
