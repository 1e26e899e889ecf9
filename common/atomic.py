"""`write_atomically`: the one "write to a temporary name, then move into place" for a file, on
any filesystem (a local disk, or any Beam filesystem: gs://, s3://, hdfs://).

    with write_atomically("gs://bucket/run/metrics.json") as handle:   # a binary handle
        handle.write(data)
    write_bytes_atomically(path, data)                                  # the same, in one call

Readers see the old file or the new one, never a part: the bytes go to a hidden sibling
`.<name>.incomplete-XXXXXXXX` (`TEMPORARY_INFIX`), which is moved onto `path` only when the
block exits cleanly; on an exception it is removed and `path` is left as it was. Locally the
move is `os.replace` after an fsync (atomic on POSIX); on object stores it is a copy and a
delete of the temporary object, and a reader may briefly see no object between the old one's
deletion and the new one's copy, never a partial one.

`write_bytes_atomically` on an object store (a filesystem without directories: gs://, s3://)
uploads the bytes straight to `path`: there one upload is already atomic (the object appears
when its upload completes, replacing the old one), and with the bytes in memory nothing can
close the upload half-written, so there is no temporary object and no moment without one.

Whole directories (a dataset, a model) are published by `common.staging.staged_output`, whose
temporary names hold the same infix: `is_temporary` is the one rule for recognising what an
interrupted writer left behind.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import BinaryIO

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

# Every temporary name this project writes holds this infix; `is_temporary` recognises them.
TEMPORARY_INFIX = ".incomplete-"


def is_local(path: str) -> bool:
    """Whether `path` is on the local disk (no URL scheme)."""
    return "://" not in path


def temporary_sibling(path: str) -> str:
    """A fresh hidden temporary name next to `path`: `<dir>/.<name>.incomplete-XXXXXXXX`."""
    path = path.rstrip("/")
    directory, _, name = path.rpartition("/")
    prefix = f"{directory}/" if directory or path.startswith("/") else ""
    return f"{prefix}.{name}{TEMPORARY_INFIX}{uuid.uuid4().hex[:8]}"


def temporary_name(path: str, purpose: str = "") -> str:
    """A fresh visible temporary name next to `path`: `<path>.incomplete-[<purpose>-]XXXXXXXX`.

    For directories that a user may come across while a run works (a staging directory, an old
    output set aside); `is_temporary` recognises them like the hidden files.
    """
    tag = f"{purpose}-" if purpose else ""
    return f"{path.rstrip('/')}{TEMPORARY_INFIX}{tag}{uuid.uuid4().hex[:8]}"


def is_temporary(name: str) -> bool:
    """Whether a file or directory name is one of this project's temporary names."""
    return TEMPORARY_INFIX in name


def _fsync_directory(directory: str) -> None:
    with contextlib.suppress(OSError):  # makes the rename itself durable where supported
        fd = os.open(directory or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(Exception):
        if is_local(path):
            os.remove(path)
        elif FileSystems.exists(path):
            FileSystems.delete([path])


@contextlib.contextmanager
def write_atomically(path: str) -> Iterator[BinaryIO]:
    """Yields a binary handle whose bytes replace `path` when the block exits cleanly.

    Args:
        path: the file to write, local or on any Beam filesystem; a missing local directory is
            created (object stores have none), as Beam's `FileSystems.create` does.

    Raises:
        Whatever the write raises; `path` is then untouched and the temporary file removed.
    """
    temporary = temporary_sibling(path)
    if is_local(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        if is_local(path):
            with open(temporary, "xb") as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
            _fsync_directory(os.path.dirname(path))
            return
        with FileSystems.create(
            temporary, compression_type=CompressionTypes.UNCOMPRESSED
        ) as handle:
            yield handle
        if FileSystems.exists(path):
            FileSystems.delete([path])
        FileSystems.rename([temporary], [path])
    except BaseException:
        _remove_quietly(temporary)
        raise


def _uploads_atomically(path: str) -> bool:
    """Whether `path` is on an object store, where one upload replaces an object atomically."""
    return not is_local(path) and not FileSystems.get_filesystem(path).has_dirs()


def write_bytes_atomically(path: str, data: bytes) -> None:
    """`write_atomically` for bytes already in memory (one direct upload on object stores)."""
    if _uploads_atomically(path):
        with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            handle.write(data)
        return
    with write_atomically(path) as handle:
        handle.write(data)


def write_text_atomically(path: str, text: str) -> None:
    """`write_atomically` for UTF-8 text already in memory."""
    write_bytes_atomically(path, text.encode("utf-8"))
