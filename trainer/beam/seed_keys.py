r"""The rows' seed keys, computed on a worker from the dataset's vocabulary file.

Each row's initial factors are a function of the key of its original ID
(`trainer.core.seeding.id_keys`: the first 8 bytes of BLAKE2b of the ID's UTF-8 bytes). The ID
of row r is line r of the vocabulary (TF Transform's `vocab_users` / `vocab_items`), so the keys
are computed where the file is read, on one worker that streams it:

    root | SeedKeys(path, layout)
        -> PCollection[tuple[int, tuple[np.ndarray, np.ndarray]]]
           (block_id, (rows int64 [m] ascending, keys uint64 [m])), a few elements per block

The stream splits lines on b"\n" only (as `trainer.serving.model.vocabulary_from_bytes`), so
an ID may hold any other character. Its memory is O(`FLUSH_ROWS` · 16 bytes), whatever the
vocabulary's size. It also checks the file against summary.json: a vocabulary with another
number of lines than the summary's size, or a line that is not UTF-8, fails the pipeline with
`DatasetError` naming the file.

`block_keys` puts a block's keys back in its rows' order (`BlockLayout.rows_of`), for
`trainer.beam.side_state.InitialFactors`, which joins them with the block's rows.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from trainer.beam.layout import BlockLayout
from trainer.core import seeding
from transforms.dataset_info import DatasetError

# Lines hashed at once (one `seeding.id_keys` call over their decoded IDs).
_HASH_LINES = 1 << 16
# Rows buffered before they are dealt into blocks: each block's share of a flush is one
# element, so larger flushes make fewer, larger elements (at most 16 bytes a row held).
FLUSH_ROWS = 1 << 22


class _StreamKeys(beam.DoFn):
    """A vocabulary file's path -> (block_id, (rows int64 [m], keys uint64 [m])), every row of
    the file in some element."""

    def __init__(self, layout: BlockLayout):
        self._layout = layout

    def process(self, path: str):
        layout = self._layout
        # Each block gets about 512 rows per flush (fewer when the file is short).
        flush = min(max(_HASH_LINES, 512 * layout.n_blocks), FLUSH_ROWS)
        keys, lines, count, buffered = [], [], 0, 0
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            for line in handle:  # binary: split on b"\n" only
                lines.append(line.removesuffix(b"\n"))
                if len(lines) == _HASH_LINES:
                    keys.append(_keys(lines, path, count + buffered))
                    buffered, lines = buffered + len(keys[-1]), []
                    if buffered >= flush:
                        yield from self._deal(count, np.concatenate(keys))
                        count, keys, buffered = count + buffered, [], 0
        if lines:
            keys.append(_keys(lines, path, count + buffered))
            buffered += len(keys[-1])
        if buffered:
            yield from self._deal(count, np.concatenate(keys))
            count += buffered
        if count != layout.n_rows:
            raise DatasetError(
                f"the vocabulary {path} holds {count} IDs but summary.json says {layout.n_rows}"
            )

    def _deal(self, start: int, keys: np.ndarray):
        """The consecutive rows [start, start + len(keys)) dealt into their blocks."""
        rows = np.arange(start, start + keys.size, dtype=np.int64)
        if rows[-1] >= self._layout.n_rows:  # the count check names the file at the end
            keep = rows < self._layout.n_rows
            rows, keys = rows[keep], keys[keep]
            if not rows.size:
                return
        blocks = np.asarray(self._layout.block_of(rows), dtype=np.int64)
        order = np.argsort(blocks, kind="stable")  # rows ascend within each block
        blocks = blocks[order]
        starts = np.flatnonzero(np.r_[True, blocks[1:] != blocks[:-1]])
        ends = np.r_[starts[1:], blocks.size]
        for first, end in zip(starts.tolist(), ends.tolist()):
            part = order[first:end]
            yield int(blocks[first]), (rows[part], keys[part])


def _keys(lines: list[bytes], path: str, first_row: int) -> np.ndarray:
    """uint64 [n], `seeding.id_keys` of the IDs on these lines."""
    try:
        ids = [line.decode("utf-8") for line in lines]
    except UnicodeDecodeError:
        bad = next(n for n, line in enumerate(lines) if not _is_utf8(line))
        raise DatasetError(f"the vocabulary {path}: line {first_row + bad} is not UTF-8") from None
    return seeding.id_keys(ids)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class SeedKeys(beam.PTransform):
    r"""The pipeline root -> PCollection[tuple[int, tuple[np.ndarray, np.ndarray]]]: (block_id,
    (rows int64 [m] ascending, keys uint64 [m])) for every row of the vocabulary at `path`,
    dealt into the blocks of `layout` (whose n_rows is summary.json's size).

    Args:
        path: a vocabulary file, one ID per '\n'-ended line, line number = row.
        layout: the trainer's block layout of that side.
    """

    def __init__(self, path: str, layout: BlockLayout):
        super().__init__()
        self._path = path
        self._layout = layout

    def expand(self, root):
        return (
            root
            | "Vocabulary" >> beam.Create([self._path])
            | "StreamKeys" >> beam.ParDo(_StreamKeys(self._layout))
        )


def block_keys(
    block_id: int, row_ids: np.ndarray, batches: list[tuple[np.ndarray, np.ndarray]]
) -> np.ndarray:
    """uint64 [b], the keys of a block's rows in `row_ids` order, from its `SeedKeys` elements.

    Raises:
        DatasetError: the elements do not hold exactly the block's rows.
    """
    if not batches:
        rows, keys = np.zeros(0, np.int64), np.zeros(0, np.uint64)
    else:
        rows = np.concatenate([np.asarray(r, np.int64) for r, _ in batches])
        keys = np.concatenate([np.asarray(k, np.uint64) for _, k in batches])
    order = np.argsort(rows, kind="stable")
    if not np.array_equal(rows[order], row_ids):
        raise DatasetError(
            f"block {block_id}: the vocabulary gives {rows.size} keys for its {len(row_ids)} rows"
        )
    return keys[order]
