"""The model's arrays in contiguous parts of rows, as scratch files: the pieces that
`trainer.beam.model_writer` regroups on the workers and streams into the final .npy files.

Part p of a side holds its rows [p · part_rows, min((p + 1) · part_rows, n_rows)). Each part is
one raw little-endian file per array, C order, no header:

    <scratch>/user_factors/part-NNNNN.bin   float32 [rows, k]
    <scratch>/item_factors/part-NNNNN.bin   float32 [rows, k]
    <scratch>/seen_counts/part-NNNNN.bin    int64 [rows], each user's train cells
    <scratch>/seen_indices/part-NNNNN.bin   int32 [cells], the items of those cells, by user,
                                            ascending within a user
    <scratch>/seen_values/part-NNNNN.bin    float32 [cells], their ratings
    <scratch>/item_counts/part-NNNNN.bin    int64 [rows], train users per item

The same part always gets the same bytes, and each file is written to a temporary name and moved
into place (`common.atomic`), so a retried or speculative bundle rewrites a part harmlessly.
`write_npy` streams parts into a final .npy file (`npy_header`: the header `numpy.save` writes),
and `check_vocabulary` streams a vocabulary file. Everything here is plain NumPy and file I/O;
the Beam stages that call it are in `model_writer`.
"""

from __future__ import annotations

import io

import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from common import atomic
from transforms.dataset_info import DatasetError

# The target size of a part: a worker holds about one part of one array at a time.
PART_BYTES = 32 << 20
# Cells of a seen part copied at a time (`seen_part`): about 13 bytes a cell of work arrays.
_SEEN_CHUNK_CELLS = 1 << 16

USER_FACTORS = "user_factors"
ITEM_FACTORS = "item_factors"
SEEN_COUNTS = "seen_counts"
SEEN_INDICES = "seen_indices"
SEEN_VALUES = "seen_values"
ITEM_COUNTS = "item_counts"
DTYPES = {
    USER_FACTORS: np.dtype("<f4"),
    ITEM_FACTORS: np.dtype("<f4"),
    SEEN_COUNTS: np.dtype("<i8"),
    SEEN_INDICES: np.dtype("<i4"),
    SEEN_VALUES: np.dtype("<f4"),
    ITEM_COUNTS: np.dtype("<i8"),
}


def part_rows_for(row_bytes: int, part_bytes: int | None = None) -> int:
    """Rows per part so that a part of rows of `row_bytes` holds about `part_bytes`
    (`PART_BYTES` by default), at least 1."""
    return max(1, (PART_BYTES if part_bytes is None else part_bytes) // max(row_bytes, 1))


def n_parts(n_rows: int, part_rows: int) -> int:
    return -(-n_rows // part_rows)


def part_bounds(part: int, part_rows: int, n_rows: int) -> tuple[int, int]:
    """[start, stop) of a part's rows."""
    start = part * part_rows
    return start, min(start + part_rows, n_rows)


def part_path(scratch: str, array: str, part: int) -> str:
    return f"{scratch}/{array}/part-{part:05d}.bin"


def write_part(scratch: str, array: str, part: int, values: np.ndarray) -> None:
    """A part of `array` as raw bytes of its dtype (`DTYPES`), atomically."""
    data = np.ascontiguousarray(values, dtype=DTYPES[array]).tobytes()
    atomic.write_bytes_atomically(part_path(scratch, array, part), data)


def read_part(scratch: str, array: str, part: int) -> np.ndarray:
    """A part `write_part` wrote, 1-D in `DTYPES[array]` (reshape factors to [rows, k])."""
    path = part_path(scratch, array, part)
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return np.frombuffer(handle.read(), dtype=DTYPES[array])


def split_rows(rows: np.ndarray, part_rows: int):
    """Positions of `rows` grouped by part: yields (part, positions int64 [m]), rows' order kept
    within a part."""
    parts = np.asarray(rows, np.int64) // part_rows
    if not parts.size:
        return
    order = np.argsort(parts, kind="stable")
    parts = parts[order]
    starts = np.flatnonzero(np.r_[True, parts[1:] != parts[:-1]])
    ends = np.r_[starts[1:], parts.size]
    for first, end in zip(starts.tolist(), ends.tolist()):
        yield int(parts[first]), order[first:end]


def factor_part(
    part: int, pieces: list[tuple[np.ndarray, np.ndarray]], part_rows: int, n_rows: int, k: int
) -> np.ndarray:
    """float32 [rows, k], a part's factors from its pieces (rows int64 [m], factors [m, k]).

    Raises:
        ValueError: a row of the part missing, twice, or outside it.
    """
    start, stop = part_bounds(part, part_rows, n_rows)
    table = np.zeros((stop - start, k), dtype=np.float32)
    filled = np.zeros(stop - start, dtype=np.int64)
    for rows, factors in pieces:
        local = np.asarray(rows, np.int64) - start
        if local.size and (local.min() < 0 or local.max() >= stop - start):
            raise ValueError(f"factor part {part} got rows outside [{start}, {stop})")
        table[local] = factors
        np.add.at(filled, local, 1)
    if not np.all(filled == 1):
        raise ValueError(
            f"factor part {part}: {int(np.sum(filled == 0))} rows missing, "
            f"{int(np.sum(filled > 1))} twice"
        )
    return table


def seen_part(
    part: int,
    records: list[tuple[int, np.ndarray, np.ndarray]],
    part_rows: int,
    shape: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A part of the train matrix's rows from its `items_for_user` records (user, items int64
    [n], ratings float32 [n]), in any order: (cells per user int64 [rows], items int32 [cells],
    ratings float32 [cells]), each user's items ascending (`CsrMatrix.from_triples`' order, as
    `trainer.local.dataset.read_sparse` builds the matrix).

    Raises:
        DatasetError: a record's user outside the part, a user twice, an item outside
            [0, n_items), indices and values of different lengths, a non-finite rating, or a
            cell twice (the checks `read_sparse` makes).
    """
    n_users, n_items = shape
    start, stop = part_bounds(part, part_rows, n_users)
    users = np.array([user for user, _, _ in records], dtype=np.int64)
    outside = users[(users < 0) | (users >= n_users)]
    if outside.size:
        raise DatasetError(
            f"items_for_user: key {outside[0]} outside the vocabulary of size {n_users}"
        )
    if users.size and (users.min() < start or users.max() >= stop):
        raise ValueError(f"seen part {part} got users outside [{start}, {stop})")
    if np.unique(users).size != users.size:
        raise DatasetError("items_for_user: a key appears in more than one record")
    for user, indices, values in records:
        if len(indices) != len(values):
            raise DatasetError(
                f"items_for_user: user {user} has different numbers of indices and values"
            )
    lengths = np.array([len(indices) for _, indices, _ in records], dtype=np.int64)
    counts = np.zeros(stop - start, dtype=np.int64)
    counts[users - start] = lengths
    # The rows in user order, a chunk of rows at a time, into the part's two outputs: a part
    # takes its records plus 8 bytes a cell and one chunk's work arrays (not the 70 bytes a cell
    # of one sort over every cell's keys). Rows come with their items ascending
    # (`transforms.examples.sparse_example`); a row that does not is sorted on its own.
    order = np.argsort(users, kind="stable")
    bounds = np.zeros(order.size + 1, dtype=np.int64)
    np.cumsum(lengths[order], out=bounds[1:])
    items = np.empty(int(bounds[-1]), dtype=np.int32)
    ratings = np.empty(items.size, dtype=np.float32)
    non_finite, first = 0, 0
    while first < order.size:
        last = int(np.searchsorted(bounds, bounds[first] + _SEEN_CHUNK_CELLS, side="right")) - 1
        last = min(max(last, first + 1), order.size)
        positions, low, high = order[first:last].tolist(), bounds[first], bounds[last]
        starts = bounds[first:last] - low
        first = last
        if high == low:
            continue
        cols = np.concatenate([np.asarray(records[p][1], np.int64) for p in positions])
        values = np.concatenate([np.asarray(records[p][2], np.float32) for p in positions])
        if cols.min() < 0 or cols.max() >= n_items:
            bad = cols.max() if cols.max() >= n_items else cols.min()
            raise DatasetError(
                f"items_for_user: index {bad} outside the vocabulary of size {n_items}"
            )
        _sort_rows(cols, values, starts)
        items[low:high] = cols
        ratings[low:high] = values
        non_finite += int(np.count_nonzero(~np.isfinite(values)))
    if non_finite:
        raise DatasetError(f"items_for_user: {non_finite} non-finite ratings")
    return counts, items, ratings


def _sort_rows(cols: np.ndarray, values: np.ndarray, starts: np.ndarray) -> None:
    """Sorts, in place, the items (and their ratings) of each row that are not strictly
    ascending; rows start at `starts` (ascending, equal for empty rows).

    Raises:
        DatasetError: a row holds an item twice.
    """
    ascending = np.ones(cols.size, dtype=bool)
    np.greater(cols[1:], cols[:-1], out=ascending[1:])
    ascending[starts[starts < cols.size]] = True  # a row's first item follows no item of its own
    if ascending.all():
        return
    ends = np.append(starts[1:], cols.size)
    for row in np.unique(np.searchsorted(starts, np.flatnonzero(~ascending), "right") - 1):
        begin, end = starts[row], ends[row]
        row_order = np.argsort(cols[begin:end], kind="stable")
        cols[begin:end] = cols[begin:end][row_order]
        values[begin:end] = values[begin:end][row_order]
        if np.any(cols[begin + 1 : end] == cols[begin : end - 1]):
            raise DatasetError("items_for_user: a cell appears twice")


def item_count_pieces(items: np.ndarray, part_rows: int):
    """A part of the train matrix's items (int [cells]) -> (item part, (items int64 [m],
    counts int64 [m])) for each item part they touch: the part's terms of c_i, the train
    users of item i."""
    unique, counts = np.unique(np.asarray(items), return_counts=True)  # no int64 copy of all
    unique = unique.astype(np.int64)
    for part, positions in split_rows(unique, part_rows):
        yield part, (unique[positions], counts[positions].astype(np.int64))


def count_part(
    part: int, pieces: list[tuple[np.ndarray, np.ndarray]], part_rows: int, n_items: int
) -> np.ndarray:
    """int64 [rows], c_i of a part's items: the sum of its pieces (items, counts)."""
    start, stop = part_bounds(part, part_rows, n_items)
    total = np.zeros(stop - start, dtype=np.int64)
    for items, counts in pieces:
        np.add.at(total, np.asarray(items, np.int64) - start, counts)
    return total


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The .npy header `numpy.save` writes for a C-ordered array of this dtype and shape
    (format 1.0, or 2.0 when the header does not fit 1.0's)."""
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
        "fortran_order": False,
        "shape": tuple(int(n) for n in shape),
    }
    buffer = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buffer, header)
    except ValueError:
        buffer = io.BytesIO()
        np.lib.format.write_array_header_2_0(buffer, header)
    return buffer.getvalue()


def write_npy(path: str, dtype: np.dtype, shape: tuple[int, ...], chunks) -> None:
    """Streams `chunks` (arrays in row order) into the .npy file `path` of the given full shape,
    atomically; memory is one chunk.

    Raises:
        ValueError: the chunks hold another number of values than the shape; `path` is then
            left as it was.
    """
    expected, written = int(np.prod(shape, dtype=np.int64)), 0
    with atomic.write_atomically(path) as handle:
        handle.write(npy_header(dtype, shape))
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk, dtype=dtype)
            written += chunk.size
            handle.write(chunk.tobytes())
        if written != expected:
            raise ValueError(f"{path}: {written} values streamed for the shape {shape}")


def check_vocabulary(path: str) -> bool:
    r"""Streams a vocabulary file, checking that `model.vocabulary_from_bytes` and
    `vocabulary_to_bytes` give its bytes back: valid UTF-8, no '\r'. Returns whether it is
    empty or ends with '\n' (then those are exactly its bytes).

    Raises:
        DatasetError: a line that is not UTF-8.
        ValueError: an ID holding '\r' (as `vocabulary_to_bytes` raises).
    """
    ends = True
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        for number, line in enumerate(handle):
            if b"\r" in line:
                value = line.decode("utf-8", "replace").removesuffix("\n")
                raise ValueError(
                    f"ID {value!r} holds a line break; a vocabulary file cannot hold it"
                )
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                raise DatasetError(f"the vocabulary {path}: line {number} is not UTF-8") from None
            ends = line.endswith(b"\n")
    return ends
