"""Rows of the rating matrix grouped into blocks, shuffled as packed batches.

    {tag: PCollection[bytes]} ─ GroupRowsByBlock(layout) ─> (block_id, {tag: [SparseRow]})

The preprocessed TFRecords hold whole rows (`transforms.examples.sparse_example`: a key, its
column indices and ratings), in no useful order; the trainer, the evaluation and the gate need
them by block. Each input's records are parsed and keyed by `layout.block_of(key)`, and a DoFn
packs a bundle's rows per block (`pack_rows`: the keys, lengths, int32 or int64 indices and
float32 ratings of the rows as four arrays, pickled and zlib-compressed at level 1) and emits
one element per block it met when the bundle ends, or earlier once it holds about 12 MiB of
parsed rows (MAX_PACKED_CELLS). A CoGroupByKey with every block id (so empty blocks are kept)
brings a block's packs together, and `unpack_rows` turns them back into rows.

Why packed: a row travelling alone is a pickled tuple of two NumPy arrays, about 300 bytes of
framing for a few 12-byte cells (21.5 encoded bytes a cell on the 8S sample of
`benchmarks.scale`). Packed, the same rows are 5x smaller (4.3 MB against 17.2 MB of train
rows there, 0.55 MB against 7.1 MB of eval rows). That is 5x fewer bytes shuffled on Dataflow
or Flink, and 5x less for Beam's local portable runner to hand a stage in one message (README,
"What the local portable runner holds"). The rows and their order within a block are the same
whatever the bundles, so a block does not depend on how the input was split: `assemble` sorts
what it is given.
"""

from __future__ import annotations

import pickle
import zlib
from typing import NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from common import worker_threads
from transforms import examples
from transforms.dataset_info import DatasetError

# A bundle's buffered rows are packed and emitted once their weight reaches MAX_PACKED_CELLS,
# a row weighing its cells plus ROW_WEIGHT: parsed, a cell takes about 12 bytes and a row's
# Python framing (the tuple, two arrays) about 400 (tracemalloc on the 8S sample of
# `benchmarks.scale`), so the buffer holds at most about 12 bytes x MAX_PACKED_CELLS = 12 MiB.
MAX_PACKED_CELLS = 1 << 20
ROW_WEIGHT = 32
_INT32_MAX = np.iinfo(np.int32).max


class SparseRow(NamedTuple):
    """One row of a matrix: its index, column indices int64 [n] and ratings float32 [n]."""

    key: int
    indices: np.ndarray
    values: np.ndarray


def parse_row(serialized: bytes) -> SparseRow:
    """A `key/indices/values` Example -> SparseRow.

    Raises:
        DatasetError: the row has different numbers of indices and values.
    """
    key, indices, values = examples.parse_sparse_example(serialized)
    if indices.size != values.size:
        raise DatasetError(
            f"row {key} has different numbers of indices and values ({indices.size}, {values.size})"
        )
    return SparseRow(int(key), indices, values)


def pack_rows(rows: list[SparseRow]) -> bytes:
    """Rows -> zlib(pickle((keys int64 [r], lengths int64 [r], indices [n], values float32
    [n]))), the indices as int32 when they fit (any column index below 2**31)."""
    if rows:
        indices = np.concatenate([row.indices for row in rows])
        values = np.concatenate([row.values for row in rows]).astype(np.float32, copy=False)
    else:
        indices, values = np.zeros(0, np.int64), np.zeros(0, np.float32)
    if indices.size and 0 <= indices.min() and indices.max() <= _INT32_MAX:
        indices = indices.astype(np.int32)
    arrays = (
        np.array([row.key for row in rows], dtype=np.int64),
        np.array([row.indices.size for row in rows], dtype=np.int64),
        indices,
        values,
    )
    return zlib.compress(pickle.dumps(arrays, protocol=pickle.HIGHEST_PROTOCOL), 1)


def unpack_arrays(packed: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The arrays `pack_rows` packed: keys int64 [r], lengths int64 [r], indices int64 [n] (the
    rows' column indices one row after the other), values float32 [n]."""
    keys, lengths, indices, values = pickle.loads(zlib.decompress(packed))
    return keys, lengths, indices.astype(np.int64, copy=False), values


def unpack_rows(packed: bytes) -> list[SparseRow]:
    """The rows `pack_rows` packed, in the same order (indices int64)."""
    keys, lengths, indices, values = unpack_arrays(packed)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [
        SparseRow(int(key), indices[start:stop], values[start:stop])
        for key, start, stop in zip(keys.tolist(), bounds[:-1].tolist(), bounds[1:].tolist())
    ]


class _PackRowsFn(beam.DoFn):
    """Serialized rows -> (block_id, pack_rows(the bundle's rows of the block)).

    Buffers a bundle's rows per block and emits them when the bundle ends, or earlier once
    their weight (cells + ROW_WEIGHT a row) reaches MAX_PACKED_CELLS; the buffer is the
    bundle's, so a retried bundle emits the same packs again (retry-safe). Counts "rows_packed"
    and "packed_bytes" (Beam metrics, namespace `metrics_namespace`).
    """

    def __init__(self, layout, metrics_namespace: str):
        self._layout = layout
        self._rows = Metrics.counter(metrics_namespace, "rows_packed")
        self._bytes = Metrics.counter(metrics_namespace, "packed_bytes")
        self._buffer: dict[int, list[SparseRow]] = {}
        self._weight = 0

    def setup(self):
        worker_threads.apply_in_worker()  # the first stage of its jobs to hold large elements

    def start_bundle(self):
        self._buffer, self._weight = {}, 0

    def process(self, serialized: bytes):
        row = parse_row(serialized)
        self._buffer.setdefault(int(self._layout.block_of(row.key)), []).append(row)
        self._weight += row.indices.size + ROW_WEIGHT
        if self._weight >= MAX_PACKED_CELLS:
            yield from self._flush()

    def finish_bundle(self):
        for element in self._flush():
            yield GlobalWindows.windowed_value(element)

    def _flush(self):
        buffer, self._buffer, self._weight = self._buffer, {}, 0
        for block_id, rows in sorted(buffer.items()):
            packed = pack_rows(rows)
            self._rows.inc(len(rows))
            self._bytes.inc(len(packed))
            yield block_id, packed


class PackRows(beam.PTransform):
    """PCollection[bytes] (serialized `key/indices/values` Examples) -> PCollection[tuple[int,
    bytes]]: (block_id, `pack_rows` of some of the block's rows), blocks by `layout.block_of`.

    The output is what `GroupRowsByBlock` shuffles; a CombineFn can read the rows before the
    shuffle (e.g. to count items) with `unpack_rows`.
    """

    def __init__(self, layout, metrics_namespace: str = "rows"):
        super().__init__()
        self._layout, self._namespace = layout, metrics_namespace

    def expand(self, records):
        return records | "Pack" >> beam.ParDo(_PackRowsFn(self._layout, self._namespace))


def _unpack_group(element, tags: tuple[str, ...]):
    block_id, grouped = element
    return block_id, {
        tag: [row for packed in grouped[tag] for row in unpack_rows(packed)] for tag in tags
    }


class GroupRowsByBlock(beam.PTransform):
    """{tag: PCollection[tuple[int, bytes]]} (`PackRows` outputs) -> PCollection[tuple[int,
    dict[str, list[SparseRow]]]]: (block_id, {tag: the block's rows of that input}) for every
    block in range(n_blocks), including blocks without rows (empty lists).

    Args:
        n_blocks: the blocks of the layout the inputs were packed by.
    """

    def __init__(self, n_blocks: int):
        super().__init__()
        self._n_blocks = n_blocks

    def expand(self, packed_by_tag):
        tags = tuple(packed_by_tag)
        if "ids" in tags:
            raise ValueError('"ids" is GroupRowsByBlock\'s own tag')
        root = next(iter(packed_by_tag.values())).pipeline
        block_ids = (
            root
            | "BlockIds" >> beam.Create(range(self._n_blocks))
            | "KeyBlockIds" >> beam.Map(lambda block_id: (block_id, None))
        )
        return (
            {**packed_by_tag, "ids": block_ids}
            | "Group" >> beam.CoGroupByKey()
            | "Unpack" >> beam.Map(_unpack_group, tags)
        )
