"""The held-out visitors of a preprocessed dataset, read for the new-visitor evaluation.

Preprocessing with `--holdout_visitors F` writes each held-out visitor's cells as a fold-in part
(`heldout/foldin-*`) and a target part (`heldout/target-*`), one `heldout_example` per visitor
and part (`transforms.examples`); `load_heldout` reads both into two CsrMatrix with one row per
visitor that has both parts (`trainer.evaluation.new_visitors` folds them in and scores them).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import tensorflow as tf
from apache_beam.io.filesystems import FileSystems

from trainer.core.sparse import CsrMatrix
from transforms import features
from transforms.examples import parse_heldout_example

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class HeldOutVisitors:
    """Held-out visitors with both parts non-empty, sorted by visitor ID.

    Attributes:
        visitors: list[str], the visitors' original IDs (row j of the matrices).
        foldin: CsrMatrix [n, n_items], the fold-in cells' ratings.
        target: CsrMatrix [n, n_items], the target cells' ratings.
        foldin_raw: float32 [foldin.nnz], the fold-in cells' raw values (durations in ms).
    """

    visitors: list[str]
    foldin: CsrMatrix
    target: CsrMatrix
    foldin_raw: np.ndarray


def has_heldout(dataset_dir: str) -> bool:
    """True when the preprocessed dataset has held-out visitors (`heldout/foldin-*`)."""
    return bool(_files(dataset_dir, features.FOLDIN))


def _files(dataset_dir: str, part: str) -> list[str]:
    pattern = f"{dataset_dir.rstrip('/')}/{features.HELDOUT_DIR}/{part}-*{features.TFRECORD_SUFFIX}"
    return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def _read_part(files: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    out = {}
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        visitor, indices, values, raw = parse_heldout_example(record.numpy())
        if visitor in out:
            raise ValueError(f"held-out visitor {visitor!r} has two records in one part")
        out[visitor] = (indices, values, raw)
    return out


def assemble(
    rows: list[tuple[str, tuple, tuple]], n_items: int
) -> tuple[list[str], CsrMatrix, CsrMatrix, np.ndarray]:
    """Visitors' parts -> (visitors sorted, foldin CsrMatrix, target CsrMatrix, foldin raw).

    Args:
        rows: (visitorId, (indices, ratings, raw) of fold-in, (indices, ratings, raw) of target),
            each part with distinct sorted indices in [0, n_items).
    """
    rows = sorted(rows, key=lambda row: row[0])
    visitors = [row[0] for row in rows]
    matrices = []
    for part in (1, 2):
        counts = np.array([row[part][0].size for row in rows], dtype=np.int64)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

        def cat(j: int, dtype, part=part):
            return np.concatenate([np.asarray(row[part][j], dtype) for row in rows] or [[]]).astype(
                dtype
            )

        indices, values = cat(0, np.int64), cat(1, np.float32)
        if indices.size and (indices.min() < 0 or indices.max() >= n_items):
            raise ValueError(f"held-out item index outside the {n_items} trained items")
        matrices.append(CsrMatrix(indptr, indices, values, (len(rows), n_items)))
        if part == 1:
            raw = cat(2, np.float32)
    return visitors, matrices[0], matrices[1], raw


def load_heldout(dataset_dir: str, n_items: int) -> HeldOutVisitors:
    """Reads `heldout/foldin-*` and `heldout/target-*`; keeps visitors with both parts.

    Args:
        dataset_dir: a `pipeline.preprocess --holdout_visitors` output.
        n_items: the train vocabulary's size.
    """
    foldin = _read_part(_files(dataset_dir, features.FOLDIN))
    target = _read_part(_files(dataset_dir, features.TARGET))
    both = sorted(set(foldin) & set(target))
    skipped = len(set(foldin) | set(target)) - len(both)
    if skipped:
        logger.info("%d held-out visitors have an empty fold-in or target part: skipped", skipped)
    visitors, foldin_rows, target_rows, raw = assemble(
        [(v, foldin[v], target[v]) for v in both], n_items
    )
    return HeldOutVisitors(visitors, foldin_rows, target_rows, raw)
