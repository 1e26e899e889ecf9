r"""The arrays an export reads, chunk by chunk, from a model in memory or from its directory.

    tables = export_tables.of(model_or_model_dir)     # a WALSModel, or a trained --output_dir
    for start, rows in tables.chunks("user_factors", chunk_rows=65536):
        ...                                           # float32 [<= chunk_rows, k], rows start..

One reader for both, so the local run (which holds its model) and the scheduled run's export
stage or a Beam worker (which hold none) write the same SavedModel: from a directory
(`trainer.serving.model`'s format, local or any Beam filesystem) each chunk is read from the
.npy file at its offset, and no whole array is ever read; vocabularies are copied in blocks.

Derived values, each in one streamed pass whose result does not depend on the chunk size:
    `gramian`: G = YᵀY in float64, Σ over fixed blocks of `GRAMIAN_ROWS` item rows (in order)
        of the block's YᵀY; one block (the whole table) up to GRAMIAN_ROWS items.
    `popular`: the k most popular itemIds (train counts as float32, descending, ties to the
        lower itemId) and their counts, merged chunk by chunk; `item_names` their contentIds.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator

import numpy as np
import tensorflow as tf
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from trainer.core import kernels, objective
from trainer.serving import model as model_lib
from trainer.serving import sliced_variables
from trainer.serving.model import WALSModel, vocabulary_to_bytes
from transforms import features, scaling

# Item rows per Gramian block: G's float64 sum runs over these blocks in order, whatever the
# chunk size the export reads with.
GRAMIAN_ROWS = 1 << 16
# Bytes per block when copying a vocabulary.
COPY_BYTES = 16 << 20
USER_VOCAB, ITEM_VOCAB = "vocab_users", "vocab_items"


class ExportTables(abc.ABC):
    """The arrays of `trainer.serving.model` by name (user_factors, item_factors, seen_indptr,
    seen_indices, item_counts) and the two vocabularies, read in chunks."""

    config: dict

    @abc.abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """The array's shape."""

    @abc.abstractmethod
    def chunks(self, name: str, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(start, rows start..start+len) of the array, in order, chunk_rows rows at most each
        (at least one chunk, empty for an empty array)."""

    @abc.abstractmethod
    def write_vocabulary(self, name: str, handle) -> int:
        r"""Writes USER_VOCAB's or ITEM_VOCAB's file (one ID a line, each ended by '\n') to a
        binary handle; returns its number of lines."""

    @abc.abstractmethod
    def item_names(self, ids: np.ndarray) -> list[str]:
        """The contentIds of the given itemIds, in their order."""

    @abc.abstractmethod
    def last(self, name: str) -> int:
        """The last element of a 1-D array (seen_indptr[-1]: the number of seen cells)."""

    def gramian(self) -> np.ndarray:
        """G = YᵀY, float64 [k, k] (see the module docstring)."""
        k = self.shape("item_factors")[1]
        total = np.zeros((k, k), np.float64)
        for _, rows in self.chunks("item_factors", GRAMIAN_ROWS):
            total += kernels.gramian(rows, tf.float64).numpy()
        return total

    def popular(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(itemIds int64 [k'], counts float32 [k']), k' = min(k, n_items), best first."""
        ids, counts = np.zeros(0, np.int64), np.zeros(0, np.float32)
        for start, rows in self.chunks("item_counts", max(k, GRAMIAN_ROWS)):
            ids = np.concatenate([ids, np.arange(start, start + len(rows), dtype=np.int64)])
            counts = np.concatenate([counts, np.asarray(rows, np.float32)])
            order = np.lexsort((ids, -counts))[:k]  # counts descending, then the lower id
            ids, counts = ids[order], counts[order]
        return ids, counts


class InMemory(ExportTables):
    """A `WALSModel` the caller holds (the local run's)."""

    def __init__(self, model: WALSModel):
        self.model = model
        self.config = model.config

    def shape(self, name):
        return tuple(np.shape(getattr(self.model, name)))

    def chunks(self, name, chunk_rows):
        array = getattr(self.model, name)
        for start in range(0, max(len(array), 1), chunk_rows):
            yield start, array[start : start + chunk_rows]

    def write_vocabulary(self, name, handle):
        ids = self.model.users if name == USER_VOCAB else self.model.items
        handle.write(vocabulary_to_bytes(ids))
        return len(ids)

    def item_names(self, ids):
        return [self.model.items[i] for i in ids]

    def last(self, name):
        return int(getattr(self.model, name)[-1])


class InDirectory(ExportTables):
    """A model directory written by `model.save` or `trainer.beam.model_writer`, read in
    chunks (`FileSystems`, so local or gs://); only config.json is read whole."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir.rstrip("/")
        self.config = model_lib.read_config(self.model_dir)
        self._headers: dict[str, tuple[tuple[int, ...], np.dtype, int]] = {}

    def _open(self, path: str):
        return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)

    def _header(self, name: str) -> tuple[tuple[int, ...], np.dtype, int]:
        """(shape, dtype, offset of the data) of an array's .npy file."""
        if name not in self._headers:
            path = model_lib.array_file(self.model_dir, name)
            with self._open(path) as handle:
                shape, fortran, dtype = model_lib.read_npy_header(handle, path)
                if fortran and len(shape) > 1:
                    raise ValueError(f"{path}: Fortran-ordered arrays are not supported")
                self._headers[name] = (tuple(shape), np.dtype(dtype), handle.tell())
        return self._headers[name]

    def shape(self, name):
        return self._header(name)[0]

    def chunks(self, name, chunk_rows):
        shape, dtype, offset = self._header(name)
        row_items = int(np.prod(shape[1:], dtype=np.int64))
        path = model_lib.array_file(self.model_dir, name)
        with self._open(path) as handle:
            handle.seek(offset)
            for start in range(0, max(shape[0], 1), chunk_rows):
                rows = min(chunk_rows, shape[0] - start)
                data = _read_exactly(handle, rows * row_items * dtype.itemsize, path)
                yield start, np.frombuffer(data, dtype).reshape((rows, *shape[1:]))

    def _vocabulary(self, name: str) -> str:
        return f"{self.model_dir}/{model_lib.MODEL_SUBDIR}/{name}.txt"

    def write_vocabulary(self, name, handle):
        lines, last = 0, b"\n"
        with self._open(self._vocabulary(name)) as source:
            while block := source.read(COPY_BYTES):
                handle.write(block)
                lines += block.count(b"\n")
                last = block[-1:]
        if last != b"\n":  # the last ID lacks its '\n' (model.save always writes it)
            handle.write(b"\n")
            lines += 1
        return lines

    def item_names(self, ids):
        wanted = {int(i): None for i in ids}
        left = len(wanted)
        with self._open(self._vocabulary(ITEM_VOCAB)) as source:
            for number, line in enumerate(source):
                if left == 0:  # the popular items are found: the rest of the file is not read
                    break
                if number in wanted:
                    wanted[number] = line.rstrip(b"\n").decode("utf-8")
                    left -= 1
        return [wanted[int(i)] for i in ids]

    def last(self, name):
        shape, dtype, offset = self._header(name)
        path = model_lib.array_file(self.model_dir, name)
        with self._open(path) as handle:
            handle.seek(offset + (shape[0] - 1) * dtype.itemsize)
            return int(np.frombuffer(_read_exactly(handle, dtype.itemsize, path), dtype)[0])


_BASE_CONFIG_KEYS = (
    "scaling",
    "scale_stats",
    "unobserved_weight",
    "regularization",
    "regularization_exp",
    "weighting",
)


def check(tables: ExportTables) -> tuple[int, int, int]:
    """(n_users, n_items, k) of the model's arrays, from their shapes; raises ValueError (or
    KeyError for config keys) unless the model can be exported."""
    users, items = tables.shape("user_factors"), tables.shape("item_factors")
    if len(users) != 2 or len(items) != 2 or users[1] != items[1]:
        raise ValueError(f"factors {users} and {items} are not [n_users, k] and [n_items, k]")
    (n_users, k), n_items = users, items[0]
    if n_users == 0 or n_items == 0:
        raise ValueError(f"cannot export a model with {n_users} users and {n_items} items")
    if n_items >= 2**31:
        raise ValueError(f"{n_items} items: seen items are exported as int32")
    indptr, counts = tables.shape("seen_indptr"), tables.shape("item_counts")
    if indptr != (n_users + 1,) or counts != (n_items,) or len(tables.shape("seen_indices")) != 1:
        raise ValueError(
            f"seen_indptr {indptr} or item_counts {counts} do not match {n_users} users and "
            f"{n_items} items"
        )
    if tables.last("seen_indptr") != tables.shape("seen_indices")[0]:
        raise ValueError("seen_indptr[-1] must equal the number of seen_indices")
    config = tables.config
    missing = [key for key in _BASE_CONFIG_KEYS if key not in config]
    if not missing:
        scheme = objective.canonical_weighting(config["weighting"])
        if scheme not in objective.WEIGHTING_FIELDS:
            raise ValueError(f"unknown weighting {config['weighting']!r}")
        # The weighting's parameters, under their names or those of earlier releases.
        upgraded = objective.upgrade_legacy_fields(config)
        missing = [key for key in objective.WEIGHTING_FIELDS[scheme] if key not in upgraded]
    if missing:
        raise KeyError(
            f"model config lacks {missing}; export needs the keys listed in trainer.serving.export"
        )
    if config["scaling"] not in scaling.STATS_BY_SCALING:
        raise ValueError(f"unknown scaling {config['scaling']!r}; expected {features.SCALINGS}")
    stats = config["scale_stats"]
    missing = [name for name in scaling.STATS_BY_SCALING[config["scaling"]] if name not in stats]
    if missing:
        raise KeyError(f"scale_stats lacks {missing} for scaling {config['scaling']!r}")
    return n_users, n_items, k


def contents(tables, shape: tuple[int, int, int], full: bool, chunk_bytes: int) -> dict:
    """attribute -> `sliced_variables.Table` of every table the serving graph declares."""
    n_users, n_items, factors = shape

    def table(source: str, shape: tuple[int, ...], dtype) -> sliced_variables.Table:
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
        rows = max(1, chunk_bytes // row_bytes)
        return sliced_variables.Table(shape, np.dtype(dtype), lambda: tables.chunks(source, rows))

    contents = {
        "item_factors": table("item_factors", (n_items, factors), np.float32),
        "popularity": table("item_counts", (n_items,), np.float32),
        "item_counts": table("item_counts", (n_items,), np.float64),
    }
    if full:
        nnz = tables.shape("seen_indices")[0]
        contents["user_factors"] = table("user_factors", (n_users, factors), np.float32)
        contents["seen_indptr"] = table("seen_indptr", (n_users + 1,), np.int64)
        contents["seen_indices"] = table("seen_indices", (nnz,), np.int32)
    return contents


def _read_exactly(handle, size: int, path: str) -> bytes:
    parts, left = [], size
    while left:
        block = handle.read(left)
        if not block:
            raise ValueError(f"{path} ends {left} bytes early")
        parts.append(block)
        left -= len(block)
    return b"".join(parts)


def of(model: WALSModel | str) -> ExportTables:
    """The tables of a model in memory, or of a model directory (a trainer's --output_dir)."""
    return InMemory(model) if isinstance(model, WALSModel) else InDirectory(model)
