"""Checkpoints of the distributed trainer: what survives a crash, and how a relaunch resumes.

Layout, under `<output_dir>.checkpoints/` (outside the staged output, so a failed run keeps it):

    run.json                       the fingerprint of (data, hyperparameters, block_rows)
    keys/users.u64, keys/items.u64 uint64 little-endian, the `trainer.core.seeding.id_keys` of each
                                   row's original ID, in block order (each block reads one range)
    init/users.f32, init/items.f32 with a warm start: the initial factors, float32 [n, k], in
                                   block order
    rows/users/block-NNNNN.npz     a block's ratings (row_ids, CSR arrays), written once per
                                   launch: sweeps move only factors, and a worker that has not
                                   cached a block's problem reads its rows from here
    requests/users/block-NNNNN.npz with the join exchange: the item rows that the user blocks
                                   need from item block NNNNN (and requests/items/... the
                                   user rows the item blocks need), written once per launch
    iter-NNNN/users/block-NNNNN-<sha>.npz
                                   a block's (row_ids, factors) after that half-sweep, named by
                                   its content (iter-0000: the initial factors); the sweeps
                                   read each other's factors from these files
    iter-NNNN/users/_COMPLETE         JSON naming every block file with its size and SHA-256;
                                      written last, so its presence means the half is complete
    iter-NNNN/items/...
    loss-NNNN.json                 the loss after iteration NNNN

A relaunch resumes from the newest iteration whose two halves are complete. A checkpoint made
for other data or other hyperparameters, a marker naming a missing or truncated file, or a
block whose bytes do not match its SHA-256 is reported by name, never silently used.
Every write goes to a temporary name first and is renamed into place, so a retried or killed
writer never leaves a half-written file under a final name.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
import uuid

import numpy as np
from apache_beam.io.filesystems import FileSystems

from trainer.beam import layout as blocks_lib
from trainer.core import problem
from trainer.core.sparse import CsrMatrix

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
MARKER = "_COMPLETE"
_SIDE_NAMES = {problem.USERS: "users", problem.ITEMS: "items"}
_ITERATION = re.compile(r"iter-(\d{4,})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names it and says why."""


def checkpoint_dir_for(output_dir: str) -> str:
    return output_dir.rstrip("/") + ".checkpoints"


def _write_atomically(path: str, data: bytes) -> None:
    temporary = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with FileSystems.create(temporary) as handle:
        handle.write(data)
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([temporary], [path])


def _read(path: str) -> bytes:
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        return handle.read()


def _half_dir(checkpoint_dir: str, iteration: int, side: int) -> str:
    return f"{checkpoint_dir}/iter-{iteration:04d}/{_SIDE_NAMES[side]}"


def fingerprint(summary: dict, config: dict, block_rows: int) -> str:
    """SHA-256 of what determines the factors: the dataset's summary, the config, block_rows."""
    text = json.dumps({"data": summary, "config": config, "block_rows": block_rows}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _write_rows(path: str, values: np.ndarray, layout: blocks_lib.BlockLayout) -> None:
    """One value (or row of values) per row, in the layout's block order."""
    ordered = np.ascontiguousarray(np.asarray(values)[layout.file_order()])
    _write_atomically(path, ordered.tobytes())


def _read_rows(path: str, layout: blocks_lib.BlockLayout, block_id: int, row_bytes: int) -> bytes:
    """The bytes of a block's rows, one contiguous range of a file written by `_write_rows`."""
    start, stop = layout.file_range(block_id)
    if stop == start:
        return b""
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        handle.seek(start * row_bytes)
        data = handle.read((stop - start) * row_bytes)
    if len(data) != (stop - start) * row_bytes:
        raise CheckpointError(f"{path} is shorter than the vocabulary")
    return data


def write_keys(
    checkpoint_dir: str, side: int, keys: np.ndarray, layout: blocks_lib.BlockLayout
) -> None:
    """The rows' ID keys (uint64), in block order."""
    path = f"{checkpoint_dir}/keys/{_SIDE_NAMES[side]}.u64"
    _write_rows(path, np.asarray(keys, dtype="<u8"), layout)


def read_keys(
    checkpoint_dir: str, side: int, layout: blocks_lib.BlockLayout, block_id: int
) -> np.ndarray:
    """uint64 [b], the keys of a block's rows (in `layout.rows_of(block_id)` order)."""
    path = f"{checkpoint_dir}/keys/{_SIDE_NAMES[side]}.u64"
    return np.frombuffer(_read_rows(path, layout, block_id, 8), dtype="<u8").astype(np.uint64)


def write_initial(
    checkpoint_dir: str, side: int, factors: np.ndarray, layout: blocks_lib.BlockLayout
) -> None:
    """A warm start's initial factors of one side: float32 little-endian [n, k], block order."""
    path = f"{checkpoint_dir}/init/{_SIDE_NAMES[side]}.f32"
    _write_rows(path, np.asarray(factors, dtype="<f4"), layout)


def read_initial(
    checkpoint_dir: str, side: int, layout: blocks_lib.BlockLayout, block_id: int, k: int
) -> np.ndarray:
    """float32 [b, k], the warm start's factors of a block's rows."""
    path = f"{checkpoint_dir}/init/{_SIDE_NAMES[side]}.f32"
    data = _read_rows(path, layout, block_id, 4 * k)
    return np.frombuffer(data, dtype="<f4").reshape(-1, k).astype(np.float32)


def _rows_path(checkpoint_dir: str, side: int, block_id: int) -> str:
    return f"{checkpoint_dir}/rows/{_SIDE_NAMES[side]}/block-{block_id:05d}.npz"


def write_rows_block(checkpoint_dir: str, side: int, block_id: int, rows: CsrMatrix) -> None:
    """A block's ratings: CSR arrays, columns global. Deterministic bytes, so a retried or
    relaunched writer finds the file already there (the run's fingerprint vouches for the data)
    and leaves it."""
    path = _rows_path(checkpoint_dir, side, block_id)
    if FileSystems.exists(path):
        return
    buffer = io.BytesIO()
    np.savez(
        buffer,
        indptr=rows.indptr,
        indices=np.asarray(rows.indices, np.int64),
        values=rows.values,
        shape=np.asarray(rows.shape, np.int64),
    )
    _write_atomically(path, buffer.getvalue())


def read_rows_block(checkpoint_dir: str, side: int, block_id: int) -> CsrMatrix:
    """The ratings `write_rows_block` wrote for a block.

    Raises:
        CheckpointError: the file is missing or unreadable.
    """
    path = _rows_path(checkpoint_dir, side, block_id)
    try:
        with np.load(io.BytesIO(_read(path)), allow_pickle=False) as archive:
            shape = tuple(int(n) for n in archive["shape"])
            return CsrMatrix(archive["indptr"], archive["indices"], archive["values"], shape)
    except Exception as error:  # a missing file, zipfile, KeyError, a bad CSR: all unusable
        raise CheckpointError(f"cannot read the block rows {path}: {error}") from None


def _requests_path(checkpoint_dir: str, solving_side: int, fixed_block: int) -> str:
    return f"{checkpoint_dir}/requests/{_SIDE_NAMES[solving_side]}/block-{fixed_block:05d}.npz"


def write_requests(
    checkpoint_dir: str,
    solving_side: int,
    fixed_block: int,
    requests: list[tuple[int, np.ndarray]],
) -> dict:
    """What the blocks of `solving_side` need from one fixed block (the join exchange):
    [(solving block, fixed rows int64 [m] ascending)], stored by solving block. Returns its
    record {block, file, bytes, sha256}."""
    requests = sorted(requests, key=lambda request: request[0])
    rows = [np.asarray(needed, np.int64) for _, needed in requests]
    buffer = io.BytesIO()
    np.savez(
        buffer,
        destinations=np.asarray([block for block, _ in requests], np.int64),
        offsets=np.cumsum([0] + [needed.size for needed in rows]).astype(np.int64),
        rows=np.concatenate(rows) if rows else np.zeros(0, np.int64),
    )
    data = buffer.getvalue()
    path = _requests_path(checkpoint_dir, solving_side, fixed_block)
    _write_atomically(path, data)
    return _record(fixed_block, path.rsplit("/", 1)[-1], data)


def _record(block_id: int, name: str, data: bytes, digest: str | None = None) -> dict:
    """A written file's record {block, file, bytes, sha256}, what readers check it against."""
    digest = digest or hashlib.sha256(data).hexdigest()
    return {"block": int(block_id), "file": name, "bytes": len(data), "sha256": digest}


def _read_checked(path: str, record: dict) -> bytes:
    """The bytes of `path`, checked against the SHA-256 of its `record`.

    Raises:
        CheckpointError: the file is missing or unreadable, or its bytes are not the ones
            written.
    """
    try:
        data = _read(path)
    except OSError as error:  # Beam's FileSystems raise BeamIOError, an IOError
        raise CheckpointError(f"cannot read checkpoint file {path}: {error}") from None
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise CheckpointError(f"corrupt checkpoint file {path}: its SHA-256 does not match")
    return data


def read_requests(
    checkpoint_dir: str, solving_side: int, fixed_block: int, record: dict
) -> list[tuple[int, np.ndarray]]:
    """The [(solving block, fixed rows)] `write_requests` stored, its SHA-256 checked.

    Raises:
        CheckpointError: the file is missing, or its bytes are not the ones written.
    """
    data = _read_checked(_requests_path(checkpoint_dir, solving_side, fixed_block), record)
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        destinations, offsets, rows = archive["destinations"], archive["offsets"], archive["rows"]
    return [(int(block), rows[offsets[i] : offsets[i + 1]]) for i, block in enumerate(destinations)]


def write_block(
    checkpoint_dir: str,
    iteration: int,
    side: int,
    block_id: int,
    row_ids: np.ndarray,
    factors: np.ndarray,
) -> dict:
    """Writes one block's factors; returns its marker record {block, file, bytes, sha256}.

    The file is named by its content, `block-NNNNN-<first 16 hex of its SHA-256>.npz`: two
    attempts of the same solve (a retried or speculative bundle) whose float round-off differs
    write two files, and each record names its own, so no reader ever finds bytes other than
    the ones its record vouches for.
    """
    data = blocks_lib.to_bytes(row_ids, factors)
    digest = hashlib.sha256(data).hexdigest()
    name = f"block-{block_id:05d}-{digest[:16]}.npz"
    _write_atomically(f"{_half_dir(checkpoint_dir, iteration, side)}/{name}", data)
    return _record(block_id, name, data, digest)


def write_marker(
    checkpoint_dir: str, iteration: int, side: int, run_fingerprint: str, records: list[dict]
) -> None:
    marker = {
        "iteration": iteration,
        "side": _SIDE_NAMES[side],
        "fingerprint": run_fingerprint,
        "written_at": time.time(),  # the writer's wall clock: iteration times, not identity
        "blocks": sorted(records, key=lambda record: record["block"]),
    }
    path = f"{_half_dir(checkpoint_dir, iteration, side)}/{MARKER}"
    _write_atomically(path, json.dumps(marker, indent=1).encode("utf-8"))


def iteration_seconds(checkpoint_dir: str, first: int, last: int) -> dict[int, float]:
    """{t: wall seconds of iteration t} for t in (first, last]: the time between the markers
    of the item halves of iterations t − 1 and t, i.e. both half-sweeps of iteration t (the
    first iteration, with the start-up and the first compilation of both sides' kernels, is
    left out). Iterations whose markers are missing or carry no time are left out too."""
    written = {}
    for iteration in range(first, last + 1):
        marker = _read_marker(_half_dir(checkpoint_dir, iteration, problem.ITEMS))
        if marker is not None and "written_at" in marker:
            written[iteration] = float(marker["written_at"])
    return {
        t: written[t] - written[t - 1]
        for t in range(first + 1, last + 1)
        if t in written and t - 1 in written
    }


def read_block(checkpoint_dir: str, marker: dict, block_id: int) -> tuple[np.ndarray, np.ndarray]:
    """A block's (row_ids, factors) from a marker read by `find_resume`, checked against the
    marker's SHA-256.

    Raises:
        CheckpointError: the block is not in the marker, or its bytes are not the ones written.
    """
    records = {record["block"]: record for record in marker["blocks"]}
    if block_id not in records:
        raise CheckpointError(f"checkpoint {marker['_dir']} has no block {block_id}")
    return _read_verified(f"{marker['_dir']}/{records[block_id]['file']}", records[block_id])


def read_record(
    checkpoint_dir: str, iteration: int, side: int, record: dict
) -> tuple[np.ndarray, np.ndarray]:
    """The (row_ids, factors) of the file `write_block` described by `record`, checked against
    its SHA-256 (how the distributed trainer's sweeps pass factors to each other).

    Raises:
        CheckpointError: the file is missing, or its bytes are not the ones written.
    """
    return _read_verified(f"{_half_dir(checkpoint_dir, iteration, side)}/{record['file']}", record)


def _read_verified(path: str, record: dict) -> tuple[np.ndarray, np.ndarray]:
    data = _read_checked(path, record)
    try:
        return blocks_lib.from_bytes(data)
    except ValueError as error:
        raise CheckpointError(f"corrupt checkpoint file {path}: {error}") from None


def write_loss(checkpoint_dir: str, iteration: int, loss: dict) -> None:
    _write_atomically(
        f"{checkpoint_dir}/loss-{iteration:04d}.json",
        json.dumps({"iteration": iteration, **loss}).encode("utf-8"),
    )


def read_losses(checkpoint_dir: str) -> list[dict]:
    """Every recorded loss, by iteration."""
    matches = FileSystems.match([f"{checkpoint_dir}/loss-*.json"])[0].metadata_list
    losses = [json.loads(_read(m.path).decode("utf-8")) for m in matches]
    return sorted(losses, key=lambda loss: loss["iteration"])


def prepare(checkpoint_dir: str, run_fingerprint: str, description: dict) -> None:
    """Claims `checkpoint_dir` for this run, or checks that it already belongs to it.

    Raises:
        CheckpointError: it holds a checkpoint of other data or hyperparameters, or files that
            are not a checkpoint; nothing is deleted.
    """
    run_path = f"{checkpoint_dir}/{RUN_FILE}"
    if FileSystems.exists(run_path):
        previous = json.loads(_read(run_path).decode("utf-8"))
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
    _write_atomically(
        run_path,
        json.dumps({"fingerprint": run_fingerprint, "description": description}, indent=1).encode(
            "utf-8"
        ),
    )


def _read_marker(half_dir: str) -> dict | None:
    path = f"{half_dir}/{MARKER}"
    if not FileSystems.exists(path):
        return None
    try:
        marker = json.loads(_read(path).decode("utf-8"))
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
            side: _read_marker(_half_dir(checkpoint_dir, iteration, side)) for side in problem.SIDES
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
    records = marker.get("blocks", [])
    if sorted(record["block"] for record in records) != list(range(n_blocks)):
        raise CheckpointError(f"checkpoint {where} does not hold all {n_blocks} blocks")
    sizes = {
        m.path.rsplit("/", 1)[-1]: m.size_in_bytes
        for m in FileSystems.match([f"{where}/block-*.npz"])[0].metadata_list
    }
    for record in records:
        size = sizes.get(record["file"])
        if size is None:
            raise CheckpointError(f"checkpoint file {where}/{record['file']} is missing")
        if size != record["bytes"]:
            raise CheckpointError(
                f"corrupt checkpoint file {where}/{record['file']}: {size} bytes, "
                f"{record['bytes']} written"
            )


def read_factors(markers: dict, shape: tuple[int, int], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole (X, Y) from a complete iteration's markers (the launcher's final read)."""
    tables = []
    for side, n in zip(problem.SIDES, shape):
        table = np.zeros((n, k), dtype=np.float32)
        for record in markers[side]["blocks"]:
            row_ids, factors = read_block("", markers[side], record["block"])
            table[row_ids] = factors
        tables.append(table)
    return tables[0], tables[1]


def remove(checkpoint_dir: str) -> None:
    """Deletes a checkpoint directory this project wrote (it holds run.json); else nothing."""
    if not FileSystems.exists(f"{checkpoint_dir}/{RUN_FILE}"):
        return
    paths = [m.path for m in FileSystems.match([f"{checkpoint_dir}/**"])[0].metadata_list]
    if paths:
        FileSystems.delete(paths)
    if "://" not in checkpoint_dir:
        import shutil

        shutil.rmtree(checkpoint_dir, ignore_errors=True)
