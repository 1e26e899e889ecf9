"""Checkpoints of the distributed trainer: what survives a crash, and how a relaunch resumes.

Layout, under `<output_dir>.checkpoints/` (outside the staged output, so a failed run keeps
it):

    run.json                       the fingerprint of (data, hyperparameters, block_rows)
    warm-start/users.json          with a warm start: how many rows of each side the earlier
    warm-start/items.json          model gave their initial factors ({"matched": n})
    rows/users/block-NNNNN.npz     a block's ratings (CSR arrays), written once per launch:
                                   sweeps move only factors, and a worker that has not cached
                                   a block's problem reads its ratings from here
    requests/users/block-NNNNN.npz with the join exchange: the item rows that the user blocks
                                   need from item block NNNNN (and requests/items/... the
                                   user rows the item blocks need), written once per launch
    iter-NNNN/users/block-NNNNN-<sha>.npz
                                   a block's (row_ids, factors) after that half-sweep, named by
                                   its content (iter-0000: the initial factors, seeded on the
                                   workers from the vocabularies, `trainer.beam.seed_keys`); the
                                   sweeps read each other's factors from these files, and the
                                   final ones are regrouped into the model's arrays
                                   (`trainer.beam.model_writer`)
    iter-NNNN/users/_COMPLETE      the marker: JSON naming every block file with its size and
                                   SHA-256 (its entries); written last, so its presence means
                                   the half is complete (iter-0000 has markers only with
                                   --num_iters 0, whose model is the initial factors)
    iter-NNNN/items/...
    loss-NNNN.json                 the loss after iteration NNNN

A relaunch resumes from the newest iteration whose two halves are complete. A checkpoint made
for other data or other hyperparameters, a marker naming a missing or truncated file, or a
block whose bytes do not match its SHA-256 is reported by name, never silently used.
How each file is written and read is in `trainer.beam.checkpoint_files`; this module holds
what concerns the directory as a whole: claiming it, the markers, finding where to resume, and
the removal. The launcher reads only these small files (run.json, markers, losses), never a
factor block.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time

import numpy as np
from apache_beam.io.filesystems import FileSystems

from common import atomic
from trainer.beam import checkpoint_files as files
from trainer.beam.checkpoint_files import CheckpointError
from trainer.core.sides import SIDES, Side

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
MARKER = "_COMPLETE"
_ITERATION = re.compile(r"iter-(\d{4,})$")


def checkpoint_dir_for(output_dir: str) -> str:
    """`<output_dir>.checkpoints`: outside the staged output, so a failed run keeps it."""
    return output_dir.rstrip("/") + ".checkpoints"


def fingerprint(summary: dict, config: dict, block_rows: int) -> str:
    """SHA-256 of what determines the factors: the dataset's summary, the config, block_rows."""
    text = json.dumps({"data": summary, "config": config, "block_rows": block_rows}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_marker(
    checkpoint_dir: str, iteration: int, side: Side, run_fingerprint: str, entries: list[dict]
) -> None:
    """The half-sweep's completion marker `iter-NNNN/<side>/_COMPLETE`: JSON naming every
    block file with its size and SHA-256 (`entries`), written after all of them."""
    marker = {
        "iteration": iteration,
        "side": Side(side).label,
        "fingerprint": run_fingerprint,
        "written_at": time.time(),  # the writer's wall clock: iteration times, not identity
        "blocks": sorted(entries, key=lambda entry: entry["block"]),
    }
    path = f"{files.half_dir(checkpoint_dir, iteration, side)}/{MARKER}"
    files.write_file(path, json.dumps(marker, indent=1).encode("utf-8"))


def iteration_seconds(checkpoint_dir: str, first: int, last: int) -> dict[int, float]:
    """{t: wall seconds of iteration t} for t in (first, last]: the time between the markers
    of the item halves of iterations t − 1 and t, i.e. both half-sweeps of iteration t (the
    first iteration, with the start-up and the first compilation of both sides' kernels, is
    left out). Iterations whose markers are missing or carry no time are left out too."""
    written = {}
    for iteration in range(first, last + 1):
        marker = _read_marker(files.half_dir(checkpoint_dir, iteration, Side.ITEMS))
        if marker is not None and "written_at" in marker:
            written[iteration] = float(marker["written_at"])
    return {
        t: written[t] - written[t - 1]
        for t in range(first + 1, last + 1)
        if t in written and t - 1 in written
    }


def prepare(checkpoint_dir: str, run_fingerprint: str, description: dict) -> None:
    """Claims `checkpoint_dir` for this run, or checks that it already belongs to it.

    Raises:
        CheckpointError: it holds a checkpoint of other data or hyperparameters, or files that
            are not a checkpoint; nothing is deleted.
    """
    run_path = f"{checkpoint_dir}/{RUN_FILE}"
    if FileSystems.exists(run_path):
        previous = json.loads(files.read_file(run_path).decode("utf-8"))
        if previous.get("fingerprint") != run_fingerprint:
            differs = sorted(
                key
                for key in set(previous.get("description", {})) | set(description)
                if previous.get("description", {}).get(key) != description.get(key)
            )
            raise CheckpointError(
                f"{checkpoint_dir} holds a checkpoint of other data or hyperparameters "
                f"(differs in: {', '.join(differs) or 'the dataset'}); delete it to start over, "
                "or train into another --output_dir"
            )
        return
    found = FileSystems.match([f"{checkpoint_dir}/**"])[0].metadata_list
    if found:
        names = ", ".join(m.path for m in found[:3])
        raise CheckpointError(
            f"{checkpoint_dir} exists but is not a checkpoint of this project ({names}, ...); "
            "move it away"
        )
    text = json.dumps({"fingerprint": run_fingerprint, "description": description}, indent=1)
    files.write_file(run_path, text.encode("utf-8"))


def _read_marker(half_dir: str) -> dict | None:
    path = f"{half_dir}/{MARKER}"
    if not FileSystems.exists(path):
        return None
    try:
        marker = json.loads(files.read_file(path).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"corrupt checkpoint marker {path}: {error}") from None
    marker["_dir"] = half_dir
    return marker


def find_resume(
    checkpoint_dir: str,
    run_fingerprint: str,
    block_counts: dict[int, int],
    max_iteration: int,
) -> tuple[int, dict | None]:
    """The newest iteration with both halves complete, and their markers.

    Args:
        checkpoint_dir: the run's checkpoint directory.
        run_fingerprint: this run's fingerprint; a marker with another is an error.
        block_counts: {side: number of blocks} of this run's layout.
        max_iteration: ignore later iterations (a rerun with fewer --num_iters).

    Returns:
        (iteration, {side: marker}), or (0, None) when nothing is complete yet.

    Raises:
        CheckpointError: a complete-looking checkpoint that does not check out (another
            fingerprint, a missing or truncated block file); the message names it.
    """
    matches = FileSystems.match([f"{checkpoint_dir}/iter-*/*/{MARKER}"])[0].metadata_list
    iterations = set()
    for metadata in matches:
        parent = metadata.path.rsplit("/", 3)[-3]
        found = _ITERATION.match(parent)
        if found and int(found.group(1)) <= max_iteration:
            iterations.add(int(found.group(1)))
    for iteration in sorted(iterations, reverse=True):
        markers = {
            side: _read_marker(files.half_dir(checkpoint_dir, iteration, side)) for side in SIDES
        }
        if any(marker is None for marker in markers.values()):
            logger.warning(
                "checkpoint iteration %d is incomplete (its item half has no marker); "
                "resuming from an earlier one",
                iteration,
            )
            continue
        for side, marker in markers.items():
            _check(marker, run_fingerprint, block_counts[side])
        return iteration, markers
    return 0, None


def _check(marker: dict, run_fingerprint: str, n_blocks: int) -> None:
    where = marker["_dir"]
    if marker.get("fingerprint") != run_fingerprint:
        raise CheckpointError(f"checkpoint {where} was made for other data or hyperparameters")
    entries = marker.get("blocks", [])
    if sorted(entry["block"] for entry in entries) != list(range(n_blocks)):
        raise CheckpointError(f"checkpoint {where} does not hold all {n_blocks} blocks")
    sizes = {
        m.path.rsplit("/", 1)[-1]: m.size_in_bytes
        for m in FileSystems.match([f"{where}/block-*.npz"])[0].metadata_list
    }
    for entry in entries:
        size = sizes.get(entry["file"])
        if size is None:
            raise CheckpointError(f"checkpoint file {where}/{entry['file']} is missing")
        if size != entry["bytes"]:
            raise CheckpointError(
                f"corrupt checkpoint file {where}/{entry['file']}: {size} bytes, "
                f"{entry['bytes']} written"
            )


def read_marked_block(marker: dict, block_id: int) -> tuple[np.ndarray, np.ndarray]:
    """A block's (row_ids int64 [b], factors float32 [b, k]) from a marker read by
    `find_resume`, checked against the marker's SHA-256.

    Raises:
        CheckpointError: the block is not in the marker, or its bytes are not the ones written.
    """
    entries = {entry["block"]: entry for entry in marker["blocks"]}
    if block_id not in entries:
        raise CheckpointError(f"checkpoint {marker['_dir']} has no block {block_id}")
    entry = entries[block_id]
    return files.read_verified_block(f"{marker['_dir']}/{entry['file']}", entry)


def remove(checkpoint_dir: str) -> None:
    """Deletes a checkpoint directory this project wrote (it holds run.json); else nothing."""
    if not FileSystems.exists(f"{checkpoint_dir}/{RUN_FILE}"):
        return
    paths = [m.path for m in FileSystems.match([f"{checkpoint_dir}/**"])[0].metadata_list]
    if paths:
        FileSystems.delete(paths)
    if atomic.is_local(checkpoint_dir):
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
