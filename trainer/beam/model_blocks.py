r"""A saved model read in blocks of users on Beam workers, never whole.

    vocab_users.txt ─ SliceUserVocabulary ─> (block_id, visitorIds)     one element per block
        ─ LoadUserBlocks ─> UserBlock: factors X_b [b, k] and seen rows, read by each worker
          from the model's .npy files (only its slice: a seek, never the whole table)

Users are in contiguous blocks, block = userId // block_rows (`trainer.beam.layout`). The
distributed prediction (`trainer.beam.predict`), evaluation (`trainer.beam.eval_pipeline`) and the
new-visitor evaluation read the model's files through `read_npy_rows` and `load_vocabulary`.
"""

from __future__ import annotations

import dataclasses

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from trainer.core.sparse import CsrMatrix
from trainer.serving import model as model_lib

_METRICS = "batch_predict"


def model_file(model_dir: str, name: str) -> str:
    """The path of one of a model's files (`trainer.serving.model`), e.g. "user_factors.npy"."""
    return f"{model_dir.rstrip('/')}/{model_lib.MODEL_SUBDIR}/{name}"


@dataclasses.dataclass(frozen=True)
class UserBlock:
    """A block of users with what predicting for them needs.

    Attributes:
        block_id: rows [block_id · block_rows, ...) of the user side.
        start: the first userId of the block.
        visitor_ids: list[str] [b], the users' own IDs.
        factors: float32 [b, k], the users' factors X_b.
        seen: CsrMatrix (b, n_items), the users' training items.
    """

    block_id: int
    start: int
    visitor_ids: list[str]
    factors: np.ndarray
    seen: CsrMatrix


def read_npy_rows(path: str, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows [start, stop) of a C-ordered .npy file on any Beam filesystem, reading only them.

    Raises:
        ValueError: a Fortran-ordered or object array, or rows outside the array.
    """
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        shape, fortran_order, dtype = model_lib.read_npy_header(handle, path)
        if fortran_order or dtype.hasobject:
            raise ValueError(f"{path}: not a C-ordered numeric array")
        stop = shape[0] if stop is None else stop
        if not 0 <= start <= stop <= shape[0]:
            raise ValueError(f"{path}: rows [{start}, {stop}) outside [0, {shape[0]})")
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        handle.seek(handle.tell() + start * row_bytes)
        data = handle.read((stop - start) * row_bytes)
    return np.frombuffer(data, dtype=dtype).reshape((stop - start, *shape[1:])).copy()


def npy_rows(path: str) -> int:
    """The number of rows of a .npy file, from its header."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return model_lib.read_npy_header(handle, path)[0][0]


def load_vocabulary(path: str) -> list[str]:
    """A vocabulary file's IDs (`model.vocabulary_from_bytes`), line number = index."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return model_lib.vocabulary_from_bytes(handle.read())


class _SliceVocabulary(beam.DoFn):
    """A vocabulary file's path -> (block_id, list[str] of its IDs), one per block.

    Streams the file (split on '\n' only, as `model.vocabulary_from_bytes`), so no worker holds
    the whole vocabulary.
    """

    def __init__(self, block_rows: int):
        self._block_rows = block_rows

    def process(self, path: str):
        block_id, ids = 0, []
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            for line in handle:  # binary: split on b"\n" only
                ids.append(line.decode("utf-8").removesuffix("\n"))
                if len(ids) == self._block_rows:
                    yield block_id, ids
                    block_id, ids = block_id + 1, []
        if ids:
            yield block_id, ids


class _LoadUserBlock(beam.DoFn):
    """(block_id, visitorIds) -> UserBlock, with the block's factors and seen rows read from the
    model's files."""

    def __init__(self, model_dir: str, block_rows: int, n_items: int):
        self._model_dir = model_dir
        self._block_rows = block_rows
        self._n_items = n_items
        self._blocks = Metrics.counter(_METRICS, "user_blocks")

    def process(self, element):
        block_id, visitor_ids = element
        start = block_id * self._block_rows
        stop = start + len(visitor_ids)
        path = self._model_dir
        factors = read_npy_rows(model_file(path, "user_factors.npy"), start, stop)
        indptr = read_npy_rows(model_file(path, "seen_indptr.npy"), start, stop + 1)
        indptr = indptr.astype(np.int64)
        indices = read_npy_rows(
            model_file(path, "seen_indices.npy"), int(indptr[0]), int(indptr[-1])
        )
        seen = CsrMatrix(
            indptr - indptr[0],
            indices,
            np.ones(indices.size, np.float32),
            (stop - start, self._n_items),
        )
        self._blocks.inc()
        yield UserBlock(block_id, start, visitor_ids, factors.astype(np.float32), seen)


class ReadUserBlocks(beam.PTransform):
    """A saved model's users as blocks.

    Input: the pipeline root. Output: PCollection[UserBlock], one per block of `block_rows`
    users (the last one shorter), spread over the workers.

    Args:
        model_dir: a trainer.task --output_dir.
        block_rows: users per block, > 0.
        n_items: the model's number of items.
    """

    def __init__(self, model_dir: str, block_rows: int, n_items: int):
        super().__init__()
        self._model_dir = model_dir
        self._block_rows = block_rows
        self._n_items = n_items

    def expand(self, root):
        return (
            root
            | "UserVocabulary" >> beam.Create([model_file(self._model_dir, "vocab_users.txt")])
            | "SliceUserVocabulary" >> beam.ParDo(_SliceVocabulary(self._block_rows))
            | "SpreadBlocks" >> beam.Reshuffle()
            | "LoadUserBlocks"
            >> beam.ParDo(_LoadUserBlock(self._model_dir, self._block_rows, self._n_items))
        )
