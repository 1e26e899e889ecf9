"""The files of the distributed trainer's checkpoint directory, one writer and one reader each.

Where each file sits in the directory, and what a relaunch does with them, is in
`trainer.beam.checkpoints`. The words used here, each with one meaning:

    entry       what a marker says about one factor block file: {block, file, bytes, sha256};
                a reader checks the file's bytes against it
    ratings     a block's observed ratings (CSR), `rows/<side>/block-NNNNN.npz`
    requests    with the join exchange, the fixed rows each solving block needs from one
                fixed block

Every file is written to a temporary sibling first and moved into place
(`common.atomic.write_bytes_atomically`), so a retried or killed writer never leaves a
half-written file under a final name.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
from apache_beam.io.filesystems import FileSystems

from common import atomic
from trainer.beam import layout as blocks_lib
from trainer.core.sides import Side
from trainer.core.sparse import CsrMatrix


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names it and says why."""


def write_file(path: str, data: bytes) -> None:
    """`data` becomes the file `path`, atomically; a local directory is created as needed."""
    atomic.write_bytes_atomically(path, data)


def read_file(path: str) -> bytes:
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        return handle.read()


def half_dir(checkpoint_dir: str, iteration: int, side: Side) -> str:
    """The directory of one half-sweep's factor blocks and marker: `iter-NNNN/<side>`."""
    return f"{checkpoint_dir}/iter-{iteration:04d}/{Side(side).label}"


def file_entry(block_id: int, name: str, data: bytes, digest: str | None = None) -> dict:
    """A written file's entry {block, file, bytes, sha256}, what readers check it against."""
    digest = digest or hashlib.sha256(data).hexdigest()
    return {"block": int(block_id), "file": name, "bytes": len(data), "sha256": digest}


def _read_checked(path: str, entry: dict) -> bytes:
    """The bytes of `path`, checked against the SHA-256 of its `entry`.

    Raises:
        CheckpointError: the file is missing or unreadable, or its bytes are not the ones
            written.
    """
    try:
        data = read_file(path)
    except OSError as error:  # Beam's FileSystems raise BeamIOError, an IOError
        raise CheckpointError(f"cannot read checkpoint file {path}: {error}") from None
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CheckpointError(f"corrupt checkpoint file {path}: its SHA-256 does not match")
    return data


# --- a warm start's matched rows ---------------------------------------------------------------


def _warm_start_path(checkpoint_dir: str, side: Side) -> str:
    return f"{checkpoint_dir}/warm-start/{Side(side).label}.json"


def write_warm_matches(checkpoint_dir: str, side: Side, matched: int) -> None:
    """How many rows of `side` a warm start took from the earlier model: {"matched": n}."""
    write_file(_warm_start_path(checkpoint_dir, side), json.dumps({"matched": matched}).encode())


def read_warm_matches(checkpoint_dir: str, side: Side) -> int | None:
    """The count `write_warm_matches` wrote, or None when there is none."""
    path = _warm_start_path(checkpoint_dir, side)
    if not FileSystems.exists(path):
        return None
    return int(json.loads(read_file(path).decode("utf-8"))["matched"])


# --- a block's ratings ---------------------------------------------------------------------------


def _ratings_path(checkpoint_dir: str, side: Side, block_id: int) -> str:
    return f"{checkpoint_dir}/rows/{Side(side).label}/block-{block_id:05d}.npz"


def write_ratings(checkpoint_dir: str, side: Side, block_id: int, ratings: CsrMatrix) -> None:
    """A block's ratings: CSR arrays [b, n_fixed], columns global. Deterministic bytes, so a
    retried or relaunched writer finds the file already there (the run's fingerprint vouches
    for the data) and leaves it."""
    path = _ratings_path(checkpoint_dir, side, block_id)
    if FileSystems.exists(path):
        return
    buffer = io.BytesIO()
    np.savez(
        buffer,
        indptr=ratings.indptr,
        indices=np.asarray(ratings.indices, np.int64),
        values=ratings.values,
        shape=np.asarray(ratings.shape, np.int64),
    )
    write_file(path, buffer.getvalue())


def read_ratings(checkpoint_dir: str, side: Side, block_id: int) -> CsrMatrix:
    """The ratings `write_ratings` wrote for a block.

    Raises:
        CheckpointError: the file is missing or unreadable.
    """
    path = _ratings_path(checkpoint_dir, side, block_id)
    try:
        with np.load(io.BytesIO(read_file(path)), allow_pickle=False) as archive:
            shape = tuple(int(n) for n in archive["shape"])
            return CsrMatrix(archive["indptr"], archive["indices"], archive["values"], shape)
    except Exception as error:  # a missing file, zipfile, KeyError, a bad CSR: all unusable
        raise CheckpointError(f"cannot read the block ratings {path}: {error}") from None


# --- the join exchange's requests ----------------------------------------------------------------


def _requests_path(checkpoint_dir: str, solving_side: Side, fixed_block: int) -> str:
    return f"{checkpoint_dir}/requests/{Side(solving_side).label}/block-{fixed_block:05d}.npz"


def write_requests(
    checkpoint_dir: str,
    solving_side: Side,
    fixed_block: int,
    requests: list[tuple[int, np.ndarray]],
) -> dict:
    """What the blocks of `solving_side` need from one fixed block (the join exchange):
    [(solving block, fixed rows int64 [m] ascending)], stored by solving block. Returns the
    file's entry {block, file, bytes, sha256}."""
    requests = sorted(requests, key=lambda request: request[0])
    needed = [np.asarray(rows, np.int64) for _, rows in requests]
    buffer = io.BytesIO()
    np.savez(
        buffer,
        destinations=np.asarray([block for block, _ in requests], np.int64),
        offsets=np.cumsum([0] + [rows.size for rows in needed]).astype(np.int64),
        rows=np.concatenate(needed) if needed else np.zeros(0, np.int64),
    )
    data = buffer.getvalue()
    path = _requests_path(checkpoint_dir, solving_side, fixed_block)
    write_file(path, data)
    return file_entry(fixed_block, path.rsplit("/", 1)[-1], data)


def read_requests(
    checkpoint_dir: str, solving_side: Side, fixed_block: int, entry: dict
) -> list[tuple[int, np.ndarray]]:
    """The [(solving block, fixed rows)] `write_requests` stored, its SHA-256 checked.

    Raises:
        CheckpointError: the file is missing, or its bytes are not the ones written.
    """
    data = _read_checked(_requests_path(checkpoint_dir, solving_side, fixed_block), entry)
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        destinations, offsets, rows = archive["destinations"], archive["offsets"], archive["rows"]
    return [(int(block), rows[offsets[i] : offsets[i + 1]]) for i, block in enumerate(destinations)]


# --- factor blocks -------------------------------------------------------------------------------


def write_factor_block(
    checkpoint_dir: str,
    iteration: int,
    side: Side,
    block_id: int,
    row_ids: np.ndarray,
    factors: np.ndarray,
) -> dict:
    """Writes one block's factors (row_ids int64 [b], factors float32 [b, k]) of a half-sweep;
    returns the file's entry {block, file, bytes, sha256}.

    The file is named by its content, `block-NNNNN-<first 16 hex of its SHA-256>.npz`: two
    attempts of the same solve (a retried or speculative bundle) whose float round-off differs
    write two files, and each entry names its own, so no reader ever finds bytes other than
    the ones its entry vouches for.
    """
    data = blocks_lib.to_bytes(row_ids, factors)
    digest = hashlib.sha256(data).hexdigest()
    name = f"block-{block_id:05d}-{digest[:16]}.npz"
    write_file(f"{half_dir(checkpoint_dir, iteration, side)}/{name}", data)
    return file_entry(block_id, name, data, digest)


def read_factor_block(
    checkpoint_dir: str, iteration: int, side: Side, entry: dict
) -> tuple[np.ndarray, np.ndarray]:
    """The (row_ids int64 [b], factors float32 [b, k]) of the file `entry` describes in the
    half-sweep (iteration, side), checked against its SHA-256 (how the distributed trainer's
    sweeps pass factors to each other).

    Raises:
        CheckpointError: the file is missing, or its bytes are not the ones written.
    """
    return read_verified_block(
        f"{half_dir(checkpoint_dir, iteration, side)}/{entry['file']}", entry
    )


def read_verified_block(path: str, entry: dict) -> tuple[np.ndarray, np.ndarray]:
    """(row_ids, factors) of the factor block file `path`, checked against its `entry`."""
    data = _read_checked(path, entry)
    try:
        return blocks_lib.from_bytes(data)
    except ValueError as error:
        raise CheckpointError(f"corrupt checkpoint file {path}: {error}") from None


# --- losses --------------------------------------------------------------------------------------


def write_loss(checkpoint_dir: str, iteration: int, loss: dict) -> None:
    """The loss after `iteration`: `loss-NNNN.json`, {iteration, loss/...}."""
    write_file(
        f"{checkpoint_dir}/loss-{iteration:04d}.json",
        json.dumps({"iteration": iteration, **loss}).encode("utf-8"),
    )


def read_losses(checkpoint_dir: str) -> list[dict]:
    """Every recorded loss, by iteration."""
    matches = FileSystems.match([f"{checkpoint_dir}/loss-*.json"])[0].metadata_list
    losses = [json.loads(read_file(m.path).decode("utf-8")) for m in matches]
    return sorted(losses, key=lambda loss: loss["iteration"])
