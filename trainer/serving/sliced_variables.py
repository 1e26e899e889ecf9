"""Writes a SavedModel's big variables chunk by chunk into its `variables/` checkpoint.

    module.table = tf.Variable(np.zeros([0, k], np.float32), shape=tf.TensorShape([None, k]))
    tf.saved_model.save(module, directory)     # saved_model.pb and a tiny variables/
    sliced_variables.write(directory, {"table": Table((n, k), np.float32, chunks_of_table)})

A variable declared with an unknown leading dimension is saved empty: the graph and the tiny
checkpoint hold none of its rows. `write` then rebuilds `variables/variables` as a TensorFlow
tensor bundle (tensorflow/core/util/tensor_bundle/tensor_bundle.cc) in which each such tensor
is written one slice of rows at a time: one `SaveV2` per chunk with the slice spec
"<n> <dims...> <start>,<rows>:-" into a bundle of its own, plus one bundle of every other
tensor of the tiny save (the small variables and `_CHECKPOINTABLE_OBJECT_GRAPH`, the object
graph that maps attributes to keys), merged by `MergeV2Checkpoints`, which renames the parts'
data files into `variables.data-NNNNN-of-MMMMM` and merges their indexes. A reader asking for
the whole tensor (`RestoreV2` with the spec "", what `tf.saved_model.load`, TensorFlow
Serving's C++ loader and `tf.train.load_checkpoint` do) gets the slices put together
(`BundleReader::Lookup` -> `GetSliceValue`); the variables were declared [None, ...], so any
row count restores. Memory: one chunk (and its tensor copy) at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import numpy as np
import tensorflow as tf

_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
_PARTS = "parts"


@dataclasses.dataclass(frozen=True)
class Table:
    """A variable's full contents, by chunks.

    Attributes:
        shape: the full shape, rows first.
        dtype: the variable's NumPy dtype; chunks are converted to it.
        chunks: () -> iterable of (start row, array [rows, *shape[1:]]), covering the rows in
            order.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: Callable[[], Iterable[tuple[int, np.ndarray]]]


def checkpoint_key(attribute: str) -> str:
    """The checkpoint key of a tf.Module's variable attribute (`module.<attribute>`)."""
    return attribute + _SUFFIX


def _slice_spec(shape: tuple[int, ...], start: int, rows: int) -> str:
    """`TensorSlice` text of rows start..start+rows of a tensor of `shape`, after its shape."""
    extents = ":".join([f"{start},{rows}"] + ["-"] * (len(shape) - 1))
    return " ".join(str(d) for d in shape) + " " + extents


def write(saved_model_dir: str, tables: dict[str, Table]) -> None:
    """Replaces `<saved_model_dir>/variables/variables` by the same checkpoint with each named
    variable's full contents, written chunk by chunk.

    Args:
        saved_model_dir: a SavedModel just written by `tf.saved_model.save`, whose variables
            named in `tables` were saved empty (declared with an unknown leading dimension).
        tables: module attribute -> its contents.

    Raises:
        ValueError: a chunk does not continue the rows, or the rows do not add up to the shape.
        KeyError: the checkpoint has no variable of that name.
    """
    variables = f"{saved_model_dir.rstrip('/')}/variables"
    prefix = f"{variables}/variables"
    reader = tf.train.load_checkpoint(prefix)
    dtypes = reader.get_variable_to_dtype_map()
    streamed = {checkpoint_key(name): table for name, table in tables.items()}
    missing = sorted(set(streamed) - set(dtypes))
    if missing:
        raise KeyError(f"{saved_model_dir}: no variables {missing} in the checkpoint")
    parts_dir = f"{variables}/{_PARTS}"
    tf.io.gfile.makedirs(parts_dir)
    parts = []

    def save(names: list[str], specs: list[str], tensors: list[tf.Tensor]) -> None:
        part = f"{parts_dir}/part-{len(parts):05d}"
        tf.raw_ops.SaveV2(prefix=part, tensor_names=names, shape_and_slices=specs, tensors=tensors)
        parts.append(part)

    small = sorted(key for key in dtypes if key not in streamed)
    save(
        small,
        [""] * len(small),
        [tf.constant(reader.get_tensor(key), dtype=dtypes[key]) for key in small],
    )
    del reader
    for key, table in streamed.items():
        _save_table(save, key, table)
    for name in tf.io.gfile.glob(f"{prefix}.*"):
        tf.io.gfile.remove(name)
    tf.raw_ops.MergeV2Checkpoints(
        checkpoint_prefixes=parts, destination_prefix=prefix, delete_old_dirs=False
    )
    tf.io.gfile.rmtree(parts_dir)


def _save_table(save, key: str, table: Table) -> None:
    """Saves one table, a bundle per chunk (its slice), or whole when it has no rows."""
    shape, dtype, done = tuple(int(d) for d in table.shape), np.dtype(table.dtype), 0
    if shape[0] == 0:
        save([key], [""], [tf.constant(np.zeros(shape, dtype))])
        return
    for start, rows in table.chunks():
        rows = np.asarray(rows, dtype)
        if start != done or rows.shape[1:] != shape[1:] or start + len(rows) > shape[0]:
            raise ValueError(f"{key}: chunk of {rows.shape} at row {start} does not fit {shape}")
        if len(rows):
            save([key], [_slice_spec(shape, start, len(rows))], [tf.constant(rows)])
        done += len(rows)
    if done != shape[0]:
        raise ValueError(f"{key}: chunks hold {done} rows, the shape {shape}")
