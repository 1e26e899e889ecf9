"""Shared fixtures: small synthetic GA360 inputs and a reader for the sparse-matrix TFRecords."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import tensorflow as tf

from transforms import examples, features


def read_sparse_records(directory: str, name: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{key: (indices, values)} of every `name-*` TFRecord under directory."""
    out = {}
    for path in sorted(glob.glob(os.path.join(directory, f"{name}-*{features.TFRECORD_SUFFIX}"))):
        for record in tf.data.TFRecordDataset(path, compression_type="GZIP"):
            key, indices, values = examples.parse_sparse_example(record.numpy())
            assert key not in out, f"key {key} written twice in {name}"
            out[key] = (indices, values)
    return out


def read_vocabulary(preprocessed_dir: str, name: str) -> list[str]:
    path = os.path.join(preprocessed_dir, "transform_fn", "assets", name)
    with open(path, "rb") as handle:  # Lines end at b"\n" only; IDs may hold U+2028 & co.
        return [line.decode("utf-8").removesuffix("\n") for line in handle]


def read_cells(preprocessed_dir: str, split: str) -> dict[tuple[str, str], float]:
    """{(visitorId, contentId): rating} of a split, mapped back through the vocabularies."""
    users = read_vocabulary(preprocessed_dir, features.USER_VOCAB)
    items = read_vocabulary(preprocessed_dir, features.ITEM_VOCAB)
    rows = read_sparse_records(os.path.join(preprocessed_dir, split), features.ITEMS_FOR_USER)
    return {
        (users[user], items[item]): float(value)
        for user, (indices, values) in rows.items()
        for item, value in zip(indices, values)
    }


@pytest.fixture(scope="session")
def gcs_emulator():
    """The session's one gs:// emulator (tests/gcs_emulator.py), started by the first test that
    needs it and stopped at the end; use it through `gcs`."""
    from gcs_emulator import GcsEmulator

    with GcsEmulator() as emulator:
        yield emulator


@pytest.fixture(scope="module")
def gcs(gcs_emulator):
    """The session's emulator with its environment applied for the module (its fixtures and the
    subprocesses its tests start), then restored. Tests isolate by bucket: `bucket`, or
    `gcs.new_bucket()` in a module-scoped fixture."""
    with gcs_emulator.applied():
        yield gcs_emulator


@pytest.fixture
def bucket(gcs) -> str:
    """A bucket of its own for the test (gs://NAME holds nothing another test wrote)."""
    return gcs.new_bucket()


@pytest.fixture(scope="session")
def tmp_session_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def tiny_preprocessed(tmp_path_factory) -> str:
    """A preprocessed dataset of a few hundred visitors, for Beam tests that must stay quick."""
    from pipeline import preprocess, synthetic

    root = tmp_path_factory.mktemp("tiny")
    sample = str(root / "sessions.json.gz")
    synthetic.write_sessions(sample, num_sessions=600, seed=11)
    out = str(root / "preprocessed")
    preprocess.run(["--input", sample, "--output_dir", out])
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_preprocessed, tmp_path_factory) -> str:
    """A trainer.task --output_dir trained on `tiny_preprocessed` (local trainer, 3 iterations)."""
    from trainer import task

    out = str(tmp_path_factory.mktemp("tiny_model") / "model")
    task.run(
        [
            "--input_dir",
            tiny_preprocessed,
            "--output_dir",
            out,
            "--num_iters",
            "3",
            "--latent_factors",
            "8",
            "--no_progress",
        ]
    )
    return out
