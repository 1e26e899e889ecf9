"""Write to a temporary location, then move into place: a crashed run never leaves output that
looks finished.

    with staged_output(output_dir, overwrite=False) as staging:
        ...write everything under `staging`...
    # Now `output_dir` holds it all; on an exception, `staging` is deleted and `output_dir` is
    # untouched.

Local directories move with one atomic rename. On object stores (gs://, s3://), where there are
no directories to rename, files are renamed one by one and `marker` (e.g. summary.json) is
renamed last, so its presence means the output is complete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator

from apache_beam.io.filesystems import FileSystems

logger = logging.getLogger(__name__)


def _is_local(path: str) -> bool:
    return "://" not in path


def _exists_nonempty(path: str) -> bool:
    if _is_local(path):
        return os.path.isdir(path) and bool(os.listdir(path)) or os.path.isfile(path)
    return bool(FileSystems.match([path.rstrip("/") + "/**"])[0].metadata_list)


def check_writable(output_dir: str, overwrite: bool) -> None:
    """Raises FileExistsError if output_dir holds something and overwrite is off."""
    if not overwrite and _exists_nonempty(output_dir):
        raise FileExistsError(
            f"output directory {output_dir} is not empty; pass --overwrite to replace it"
        )


def _publish_local(staging: str, output_dir: str) -> None:
    old = None
    if os.path.exists(output_dir):
        old = f"{output_dir}.replaced-{uuid.uuid4().hex[:8]}"
        os.rename(output_dir, old)
    os.rename(staging, output_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)


def _publish_remote(staging: str, output_dir: str, marker: str | None) -> None:
    output_dir = output_dir.rstrip("/")
    if _exists_nonempty(output_dir):
        FileSystems.delete([output_dir + "/"])
    sources = [m.path for m in FileSystems.match([staging + "/**"])[0].metadata_list]
    sources.sort(key=lambda path: marker is not None and path.endswith("/" + marker))
    destinations = [output_dir + path[len(staging) :] for path in sources]
    for source, destination in zip(sources, destinations):
        FileSystems.rename([source], [destination])
    FileSystems.delete([staging + "/"])


def _delete(path: str) -> None:
    with contextlib.suppress(Exception):
        if _is_local(path):
            shutil.rmtree(path, ignore_errors=True)
        elif FileSystems.exists(path + "/"):
            FileSystems.delete([path + "/"])


@contextlib.contextmanager
def staged_output(
    output_dir: str, overwrite: bool = False, marker: str | None = None
) -> Iterator[str]:
    """Yields a fresh staging directory next to output_dir; publishes it on success.

    Args:
        output_dir: the final location (local path or any Beam filesystem URL).
        overwrite: replace an existing non-empty output_dir.
        marker: file name (relative to the directory) to move last on object stores.
    """
    output_dir = output_dir.rstrip("/") or output_dir
    check_writable(output_dir, overwrite)
    staging = f"{output_dir}.incomplete-{uuid.uuid4().hex[:8]}"
    if _is_local(staging):
        os.makedirs(staging)
    try:
        yield staging
    except BaseException:
        logger.error("run failed; removing its partial output %s", staging)
        _delete(staging)
        raise
    if _is_local(output_dir):
        _publish_local(staging, output_dir)
    else:
        _publish_remote(staging, output_dir, marker)
    logger.info("wrote %s", output_dir)
