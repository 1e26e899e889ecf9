"""What a trainer's launcher may know of a preprocessed dataset without reading its data.

    info = read_dataset_info("gs://bucket/preprocessed/2026-11-22")
    info.shape               (nusers, nitems), from summary.json
    info.train_interactions  train cells, from summary.json
    info.user_vocabulary     the path of transform_fn/assets/vocab_users (never read here)
    info.summary             the whole summary.json

It reads summary.json and asks TF Transform for the vocabulary files' paths (metadata only):
a few kilobytes, whatever the dataset's size. The distributed trainer's launcher holds only
this; its workers check the data against it (`trainer.beam.seed_keys`: the vocabularies'
lengths; `trainer.beam.model_writer`: the train cells). The local trainer loads everything
(`trainer.local.dataset.load_dataset`) and checks it there.
"""

from __future__ import annotations

import dataclasses
import json

import tensorflow_transform as tft
from apache_beam.io.filesystems import FileSystems

from transforms import features


class DatasetError(ValueError):
    """The preprocessed dataset is missing, unfinished or inconsistent."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """A preprocessed dataset's summary and where its vocabularies are.

    Attributes:
        directory: the preprocessing output directory (no trailing slash).
        summary: its summary.json (nusers, nitems, train_interactions, eval_interactions,
            scaling, scale_stats, ...).
        user_vocabulary: the path of the visitorId vocabulary (line number = userId).
        item_vocabulary: the path of the contentId vocabulary (line number = itemId).
    """

    directory: str
    summary: dict
    user_vocabulary: str
    item_vocabulary: str

    @property
    def shape(self) -> tuple[int, int]:
        """(n_users, n_items), the rating matrix's shape."""
        return int(self.summary["nusers"]), int(self.summary["nitems"])

    @property
    def train_interactions(self) -> int:
        return int(self.summary["train_interactions"])

    @property
    def eval_interactions(self) -> int:
        return int(self.summary["eval_interactions"])

    @property
    def vocabularies(self) -> tuple[str, str]:
        """(user vocabulary path, item vocabulary path), by side."""
        return self.user_vocabulary, self.item_vocabulary


def read_summary(directory: str) -> dict:
    """A finished preprocessing output's summary.json.

    Raises:
        DatasetError: there is none (not a preprocessing output, or an unfinished one).
    """
    path = f"{directory.rstrip('/')}/{features.SUMMARY_FILE}"
    if not FileSystems.exists(path):
        raise DatasetError(
            f"{directory} is not a finished preprocessing output (no {features.SUMMARY_FILE}); "
            "run python -m pipeline.preprocess first"
        )
    with FileSystems.open(path) as handle:
        return json.loads(handle.read().decode("utf-8"))


def read_dataset_info(directory: str) -> DatasetInfo:
    """The summary of the dataset in `directory` and its vocabularies' paths.

    Raises:
        DatasetError: no summary.json, one without the sizes a trainer needs, or no
            vocabulary file.
    """
    directory = directory.rstrip("/")
    summary = read_summary(directory)
    missing = [
        key
        for key in ("nusers", "nitems", "train_interactions", "eval_interactions", "scaling")
        if key not in summary
    ]
    if missing:
        raise DatasetError(f"{directory}/{features.SUMMARY_FILE} lacks {', '.join(missing)}")
    transform_output = tft.TFTransformOutput(directory)
    paths = []
    for name in (features.USER_VOCAB, features.ITEM_VOCAB):
        path = transform_output.vocabulary_file_by_name(name)
        if path is None:
            raise DatasetError(f"{directory} has no {name} vocabulary under transform_fn/assets")
        paths.append(path)
    return DatasetInfo(directory, summary, *paths)
