"""Reading a preprocessed dataset (the output of `pipeline.preprocess`) into memory.

    dataset = load_dataset("runs/local/preprocessed")
    dataset.train      CsrMatrix [nusers, nitems], from train/items_for_user-*
    dataset.heldout    CsrMatrix [nusers, nitems], from eval/items_for_user-*
    dataset.users      list[str], userId -> visitorId (vocab_users)
    dataset.items      list[str], itemId -> contentId (vocab_items)
    dataset.summary    the preprocessing summary.json

Every inconsistency a trainer could trip over later (no summary.json, vocabularies that disagree
with the TFRecords, rows and columns that disagree, non-finite ratings) raises `DatasetError`
naming the problem. The distributed trainer loads none of this in its launcher: it reads
`transforms.dataset_info.DatasetInfo` (summary.json and the vocabularies' paths) and its workers
check the data.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import tensorflow as tf
import tensorflow_transform as tft
from apache_beam.io.filesystems import FileSystems

from trainer.core.sparse import CsrMatrix
from trainer.serving.model import vocabulary_from_bytes
from transforms import features
from transforms.dataset_info import DatasetError, read_summary

# DatasetError is shared with the distributed trainer (`transforms.dataset_info`).
__all__ = ["Dataset", "DatasetError", "load_dataset", "read_sparse", "read_vocabulary"]
logger = logging.getLogger(__name__)

_SPEC = {
    features.KEY: tf.io.FixedLenFeature([1], tf.int64),
    features.INDICES: tf.io.RaggedFeature(tf.int64),
    features.VALUES: tf.io.RaggedFeature(tf.float32),
}


@dataclasses.dataclass(frozen=True)
class Dataset:
    train: CsrMatrix
    heldout: CsrMatrix
    users: list[str]
    items: list[str]
    summary: dict


def _files(directory: str, split: str, name: str) -> list[str]:
    pattern = f"{directory}/{split}/{name}-*{features.TFRECORD_SUFFIX}"
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def read_sparse(files: list[str], shape: tuple[int, int], what: str) -> CsrMatrix:
    """Reads `key/indices/values` Examples into a CsrMatrix whose rows are the keys.

    Args:
        files: gzip TFRecord files of whole rows (or whole columns, with `shape` transposed).
        shape: (number of keys, number of indices): the vocabulary sizes.
        what: a name for error messages.

    Raises:
        DatasetError: a key or index outside `shape`, a key twice, indices and values of
            different lengths, or a non-finite value.
    """
    keys, lengths, indices, values = [], [], [], []
    dataset = tf.data.TFRecordDataset(files, compression_type="GZIP").batch(4096)
    for batch in dataset.map(lambda b: tf.io.parse_example(b, _SPEC)):
        batch_indices, batch_values = batch[features.INDICES], batch[features.VALUES]
        index_lengths = batch_indices.row_lengths().numpy()
        if not np.array_equal(index_lengths, batch_values.row_lengths().numpy()):
            raise DatasetError(f"{what}: a record has different numbers of indices and values")
        keys.append(batch[features.KEY].numpy()[:, 0])
        lengths.append(index_lengths)
        indices.append(batch_indices.flat_values.numpy())
        values.append(batch_values.flat_values.numpy())
    n_rows, n_cols = shape
    if not keys:
        return CsrMatrix(
            np.zeros(n_rows + 1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), shape
        )
    keys, lengths = np.concatenate(keys), np.concatenate(lengths)
    indices, values = np.concatenate(indices), np.concatenate(values)
    if keys.min() < 0 or keys.max() >= n_rows:
        raise DatasetError(f"{what}: key {keys.max()} outside the vocabulary of size {n_rows}")
    if indices.size and (indices.min() < 0 or indices.max() >= n_cols):
        raise DatasetError(f"{what}: index {indices.max()} outside the vocabulary of size {n_cols}")
    if np.unique(keys).size != keys.size:
        raise DatasetError(f"{what}: a key appears in more than one record")
    if not np.all(np.isfinite(values)):
        raise DatasetError(f"{what}: {int(np.sum(~np.isfinite(values)))} non-finite ratings")
    rows = np.repeat(keys, lengths)
    matrix = CsrMatrix.from_triples(rows, indices, values, shape)
    if matrix.nnz != indices.size:
        raise DatasetError(f"{what}: a cell appears twice")
    return matrix


def read_vocabulary(path: str) -> list[str]:
    r"""A TF Transform vocabulary file: one ID per '\n'-ended line, line number = index.

    TF Transform writes each token followed by '\n' and drops tokens holding '\n' or '\r';
    any other character (U+2028, \x1c, ...) may be part of an ID.
    """
    with FileSystems.open(path) as handle:
        return vocabulary_from_bytes(handle.read())


def load_dataset(directory: str) -> Dataset:
    """Loads and checks a preprocessed dataset.

    Raises:
        DatasetError: naming what is missing or inconsistent.
    """
    directory = directory.rstrip("/")
    summary = read_summary(directory)
    transform_output = tft.TFTransformOutput(directory)
    users = read_vocabulary(transform_output.vocabulary_file_by_name(features.USER_VOCAB))
    items = read_vocabulary(transform_output.vocabulary_file_by_name(features.ITEM_VOCAB))
    if (len(users), len(items)) != (summary["nusers"], summary["nitems"]):
        raise DatasetError(
            f"vocabulary sizes {len(users)} x {len(items)} disagree with summary.json's "
            f"{summary['nusers']} x {summary['nitems']}"
        )
    shape = (len(users), len(items))
    matrices = {}
    for split in (features.TRAIN_DIR, features.EVAL_DIR):
        rows = _files(directory, split, features.ITEMS_FOR_USER)
        if split == features.TRAIN_DIR and not rows:
            raise DatasetError(f"no {split}/{features.ITEMS_FOR_USER}-* files in {directory}")
        matrices[split] = read_sparse(rows, shape, f"{split}/{features.ITEMS_FOR_USER}")
    train = matrices[features.TRAIN_DIR]
    columns = read_sparse(
        _files(directory, features.TRAIN_DIR, features.USERS_FOR_ITEM),
        (shape[1], shape[0]),
        f"{features.TRAIN_DIR}/{features.USERS_FOR_ITEM}",
    )
    if columns.nnz != train.nnz or not np.array_equal(columns.row_counts(), train.col_counts()):
        raise DatasetError("train rows (items_for_user) and columns (users_for_item) disagree")
    if train.nnz != summary["train_interactions"]:
        raise DatasetError(
            f"train TFRecords hold {train.nnz} cells but summary.json says "
            f"{summary['train_interactions']}"
        )
    logger.info(
        "loaded %s: %d users x %d items, %d train and %d held-out cells",
        directory,
        shape[0],
        shape[1],
        train.nnz,
        matrices[features.EVAL_DIR].nnz,
    )
    return Dataset(train, matrices[features.EVAL_DIR], users, items, summary)
