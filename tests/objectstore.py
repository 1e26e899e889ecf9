"""A test-only Beam FileSystem for `memobj://bucket/key` that behaves like GCS.

Importing this module registers it (Beam finds FileSystem subclasses by `scheme()`). It keeps
objects in memory, shared by the whole process, so the DirectRunner's in-memory mode sees them.
It mirrors `apache_beam.io.gcp.gcsfilesystem.GCSFileSystem` with a fake `GcsIO`:

- Keys are flat: there are no directories, `mkdirs` does nothing, `has_dirs()` is False.
- `exists`, `size`, `metadata` and `rename` take exact keys. A "directory" is only a prefix, so
  `exists("memobj://b/dir")` is False and renaming it fails: there is no directory rename.
- `match` lists by prefix and filters with Beam's glob translation.
- `delete` of a path ending in "/" deletes every key under that prefix; `delete` of any other
  path matches that exact key, so a missing key (or a prefix given without "/") deletes nothing
  and raises nothing.
- An object appears when its write channel is closed, not before.

`STORE.log` records every mutation as ("put" | "delete", path), in order, so tests can check
the order of a publish; `STORE.fail_when` can make a mutation raise.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable

from apache_beam.io.filesystem import (
    BeamIOError,
    CompressedFile,
    CompressionTypes,
    FileMetadata,
    FileSystem,
)

SCHEME = "memobj"
PREFIX = f"{SCHEME}://"


class _Store:
    """The objects of every bucket: {"memobj://bucket/key": (bytes, mtime)}."""

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, float]] = {}
        self.log: list[tuple[str, str]] = []
        self.fail_when: Callable[[str, str], bool] | None = None
        self.lock = threading.RLock()

    def _mutating(self, operation: str, path: str) -> None:
        if self.fail_when is not None and self.fail_when(operation, path):
            raise OSError(f"injected failure: {operation} {path}")
        self.log.append((operation, path))

    def put(self, path: str, data: bytes) -> None:
        with self.lock:
            self._mutating("put", path)
            self.objects[path] = (bytes(data), time.time())

    def remove(self, path: str) -> None:
        with self.lock:
            self._mutating("delete", path)
            self.objects.pop(path, None)

    def keys(self, prefix: str = PREFIX) -> list[str]:
        with self.lock:
            return sorted(key for key in self.objects if key.startswith(prefix))

    def clear(self) -> None:
        with self.lock:
            self.objects.clear()
            self.log.clear()
            self.fail_when = None


STORE = _Store()


def _check(path: str) -> str:
    if not path.startswith(PREFIX) or "/" not in path[len(PREFIX) :].strip("/"):
        raise ValueError(f"{path!r} is not a {PREFIX}bucket/key path")
    return path


class _Reader(io.BytesIO):
    mode = "rb"  # CompressedFile asks


class _Writer(io.BytesIO):
    """A write channel whose object appears on close, as with GCS uploads."""

    mode = "wb"

    def __init__(self, path: str) -> None:
        super().__init__()
        self._path = path

    def close(self) -> None:
        if not self.closed:
            STORE.put(self._path, self.getvalue())
        super().close()


class MemoryObjectFileSystem(FileSystem):
    """`memobj://` objects in process memory, with GCS's semantics (see the module docstring)."""

    @classmethod
    def scheme(cls) -> str:
        return SCHEME

    def join(self, basepath: str, *paths: str) -> str:
        path = basepath
        for p in paths:
            path = path.rstrip("/") + "/" + p.lstrip("/")
        return path

    def split(self, path: str) -> tuple[str, str]:
        rest = path[len(PREFIX) :]
        if "/" not in rest:
            return path, ""
        head, tail = rest.rsplit("/", 1)
        return PREFIX + head, tail

    def mkdirs(self, path: str) -> None:
        pass

    def has_dirs(self) -> bool:
        return False

    def _list(self, dir_or_prefix: str):
        for key in STORE.keys(dir_or_prefix):
            data, updated = STORE.objects[key]
            yield FileMetadata(key, len(data), updated)

    def _path_open(self, path, mode, compression_type):
        compression_type = FileSystem._get_compression_type(path, compression_type)
        if mode == "wb":
            raw = _Writer(_check(path))
        else:
            with STORE.lock:
                if path not in STORE.objects:
                    raise FileNotFoundError(f"no such object: {path}")
                raw = _Reader(STORE.objects[path][0])
        if compression_type == CompressionTypes.UNCOMPRESSED:
            return raw
        return CompressedFile(raw, compression_type=compression_type)

    def create(
        self, path, mime_type="application/octet-stream", compression_type=CompressionTypes.AUTO
    ):
        return self._path_open(path, "wb", compression_type)

    def open(
        self, path, mime_type="application/octet-stream", compression_type=CompressionTypes.AUTO
    ):
        return self._path_open(path, "rb", compression_type)

    def _copy_one(self, source: str, destination: str) -> None:
        with STORE.lock:
            if source not in STORE.objects:
                raise FileNotFoundError(f"no such object: {source}")
            STORE.put(_check(destination), STORE.objects[source][0])

    def copy(self, source_file_names, destination_file_names):
        exceptions = {}
        for source, destination in zip(source_file_names, destination_file_names, strict=True):
            try:
                if source.endswith("/"):  # GcsIO.copytree: every key under the prefix
                    for key in STORE.keys(source):
                        self._copy_one(key, destination + key[len(source) :])
                else:
                    self._copy_one(source, destination)
            except Exception as error:
                exceptions[(source, destination)] = error
        if exceptions:
            raise BeamIOError("Copy operation failed", exceptions)

    def rename(self, source_file_names, destination_file_names):
        """Copy then delete, one exact key at a time (GCS has no rename, least of all of dirs)."""
        exceptions = {}
        for source, destination in zip(source_file_names, destination_file_names, strict=True):
            try:
                self._copy_one(source, destination)
                STORE.remove(source)
            except Exception as error:
                exceptions[(source, destination)] = error
        if exceptions:
            raise BeamIOError("Rename operation failed", exceptions)

    def exists(self, path: str) -> bool:
        return path in STORE.objects

    def _object(self, path: str) -> tuple[bytes, float]:
        try:
            return STORE.objects[path]
        except KeyError:
            raise BeamIOError(
                "Metadata operation failed", {path: FileNotFoundError(path)}
            ) from None

    def size(self, path: str) -> int:
        return len(self._object(path)[0])

    def last_updated(self, path: str) -> float:
        return self._object(path)[1]

    def checksum(self, path: str) -> str:
        return str(hash(self._object(path)[0]))

    def metadata(self, path: str) -> FileMetadata:
        data, updated = self._object(path)
        return FileMetadata(path, len(data), updated)

    def delete(self, paths):
        exceptions = {}
        for path in paths:
            try:
                if path.endswith("/"):
                    targets = STORE.keys(path)
                else:
                    targets = [m.path for m in self.match([path])[0].metadata_list]
                for target in targets:
                    STORE.remove(target)
            except Exception as error:
                exceptions[path] = error
        if exceptions:
            raise BeamIOError("Delete operation failed", exceptions)
