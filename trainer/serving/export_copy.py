"""An export of the same model that already exists, copied into a staging directory instead of
streaming the model again (`trainer.serving.export.export_saved_model(copy_from=...)`).

    why = export_copy.why_not(source, target, facts)   # None: source stands in for an export
    if why is None:
        export_copy.copy_files(source, staging)          # every file but the marker

The scheduled run's train stage already writes the SavedModel under `train/export`
(`trainer.task`), 37 GB full and 2.9 GB fold-in only at the README's worked example; its
`export` stage copies that into the date's serving version directory when the two would be the
same SavedModel, and streams the model otherwise.

The same SavedModel: the source is a complete export of this project (`version_dir.inspect`:
its marker, `saved_model.pb`, every file the marker lists and nothing else) whose marker's facts (k,
serving_model, users, items, latent_factors and the export's `format`,
`trainer.serving.export.FORMAT`) equal those of the export asked for, a "copied_from" fact
aside. The facts are those of the model being exported (its shape, read from its files), so a
source exported from another model of another shape, with another k or serving model, or by a
release of another format (markers from before `format`, too) is never copied.

Copies: on the local disk each file is hard-linked (no bytes written; SavedModel files are never
modified in place, and removing a version only unlinks its names), or copied where linking fails
(another device, a filesystem without links); elsewhere Beam's `FileSystems.copy`, which on
gs:// is a server-side copy per object, no bytes through this process.
"""

from __future__ import annotations

import logging
import os
import shutil

from apache_beam.io.filesystems import FileSystems

from common.atomic import is_local
from trainer.serving import version_dir

logger = logging.getLogger(__name__)

COPIED_FROM = "copied_from"  # the marker fact naming the export a copy was made of


def _scheme(path: str) -> str:
    return "" if is_local(path) else path.split("://", 1)[0]


def why_not(source: str, target: str, facts: dict) -> str | None:
    """Why `source` may not be copied for an export with these facts to `target`, or None.

    Args:
        source: a SavedModel directory (local, or any tf.io.gfile filesystem).
        target: the directory the copy goes to (its staging sibling or itself).
        facts: the facts the export to target would write into its marker.

    Returns:
        None when source is a complete export of this project with the same facts (its
        COPIED_FROM aside) on the same filesystem as target; else a reason, for the log.
    """
    if _scheme(source) != _scheme(target):
        return f"it is on another filesystem than {target}"
    try:
        existing = version_dir.inspect(source)
    except Exception as error:  # an unreadable source is streamed around, never fatal
        return f"it could not be read ({type(error).__name__}: {error})"
    if existing.problem is not None:
        return existing.problem
    if not existing.files:
        return "it is not there"
    if not existing.complete:
        return f"it is not complete (no {version_dir.SAVED_MODEL})"
    marker = version_dir.read_marker(source) or {}
    missing = set(marker.get("files", ())) - set(existing.files)
    if missing:
        return f"it lacks files its marker lists: {', '.join(sorted(missing))}"
    written = marker.get("export") if isinstance(marker.get("export"), dict) else {}
    theirs = {key: value for key, value in written.items() if key != COPIED_FROM}
    if theirs != facts:
        keys = sorted(
            key for key in facts.keys() | theirs.keys() if theirs.get(key) != facts.get(key)
        )
        differ = ", ".join(f"{key} {theirs.get(key)!r} (wanted {facts.get(key)!r})" for key in keys)
        return f"its export facts differ: {differ}"
    return None


def _copy_file(source: str, target: str) -> None:
    """One file: a hard link (or a copy) on the local disk, `FileSystems.copy` elsewhere."""
    if not is_local(target):
        FileSystems.copy([source], [target])
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        os.link(source, target)
    except OSError as error:  # another device, or no hard links here: copy the bytes
        logger.debug("cannot link %s (%s); copying it", source, error)
        shutil.copyfile(source, target)


def copy_files(source: str, target: str) -> list[str]:
    """Copies every file of the export at source but its marker into the directory target
    (which `version_dir.write_marker` then marks as the copy's owner); returns their relative
    names, sorted. Run `why_not` first."""
    names = [name for name in version_dir.inspect(source).files if name != version_dir.MARKER]
    for name in names:
        _copy_file(f"{source}/{name}", f"{target}/{name}")
    return names
