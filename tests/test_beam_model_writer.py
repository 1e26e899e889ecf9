"""The model directory written by Beam workers (`trainer.beam.model_writer`) against
`trainer.serving.model.save` of the same factors and data: the same bytes, file by file, in one
part or in many; and the checks it makes on the way.

The data: 7 users x 5 items, 11 cells (user 5 has no cells, item 4 no users), factors in blocks
of 2 rows (interleaved, as the trainer writes them).
"""

from __future__ import annotations

import dataclasses
import io
import os

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.testing.test_pipeline import TestPipeline
from memory import peak_bytes

from trainer.beam import checkpoint_files, model_parts
from trainer.beam.layout import BlockLayout
from trainer.beam.model_writer import ModelSpec, WriteModel
from trainer.core.objective import WALSConfig
from trainer.core.sides import ITEMS, SIDES, USERS
from trainer.core.sparse import CsrMatrix
from trainer.serving import model as model_lib
from transforms import examples, features

R = np.array(
    [
        [1.0, 0.0, 2.5, 0.0, 0.0],
        [0.0, 3.0, 0.0, 1.0, 0.0],
        [0.5, 0.0, 0.0, 0.0, 0.0],
        [4.0, 1.0, 0.0, 0.25, 0.0],
        [0.0, 0.0, 5.0, 2.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 7.0, 0.0, 0.0, 0.0],
    ],
    dtype=np.float32,
)
N_USERS, N_ITEMS = R.shape
K = 3
USERS_IDS = ["u0", "u\u2028one", "u\x1ctwo", "é", "u4", "u5", "u6"]
ITEM_IDS = ["a", "b", "c", "d", "e"]
CONFIG = {
    **dataclasses.asdict(WALSConfig(latent_factors=K)),
    "scaling": "median",
    "scale_stats": {"median": 1.0},
}


def write_dataset(root, user_vocabulary: bytes | None = None) -> tuple[str, tuple[str, str]]:
    """train/items_for_user TFRecords of R (rows without cells have none, the cells of each
    record in shuffled order) and the two vocabulary files."""
    directory = root / "data" / features.TRAIN_DIR
    directory.mkdir(parents=True)
    rng = np.random.default_rng(3)
    shards = [directory / f"{features.ITEMS_FOR_USER}-0000{n}-of-00002.tfrecord.gz" for n in (0, 1)]
    writers = [tf.io.TFRecordWriter(str(path), options="GZIP") for path in shards]
    for user in rng.permutation(N_USERS):
        cols = rng.permutation(np.flatnonzero(R[user]))
        if cols.size:
            example = tf.train.Example()
            example.ParseFromString(examples.sparse_example(int(user), zip(cols, R[user, cols])))
            feature = example.features.feature
            del feature[features.INDICES].int64_list.value[:]  # unsorted, as any writer may
            feature[features.INDICES].int64_list.value.extend(cols.tolist())
            del feature[features.VALUES].float_list.value[:]
            feature[features.VALUES].float_list.value.extend(R[user, cols].tolist())
            writers[user % 2].write(example.SerializeToString())
    for writer in writers:
        writer.close()
    paths = []
    for name, ids in (("vocab_users", USERS_IDS), ("vocab_items", ITEM_IDS)):
        path = root / "data" / name
        data = model_lib.vocabulary_to_bytes(ids)
        path.write_bytes(user_vocabulary if name == "vocab_users" and user_vocabulary else data)
        paths.append(str(path))
    return str(root / "data"), tuple(paths)


def factor_files(checkpoint_dir: str, tables: dict) -> list[tuple[int, str, dict]]:
    """The tables written as interleaved blocks of 2 rows, as a half-sweep writes them."""
    listed = []
    for side in SIDES:
        layout = BlockLayout(tables[side].shape[0], 2)
        for block in range(layout.n_blocks):
            rows = layout.rows_of(block)
            entry = checkpoint_files.write_factor_block(
                checkpoint_dir, 3, side, block, rows, tables[side][rows]
            )
            directory = checkpoint_files.half_dir(checkpoint_dir, 3, side)
            listed.append((int(side), f"{directory}/{entry['file']}", entry))
    return listed


def write_with_beam(tmp_path, part_bytes: int, column_counts=None, **overrides) -> tuple:
    """Writes the model with WriteModel; returns (its output dir, the factor tables)."""
    input_dir, vocabularies = write_dataset(tmp_path, overrides.pop("user_vocabulary", None))
    rng = np.random.default_rng(1)
    tables = {
        USERS: rng.normal(size=(N_USERS, K)).astype(np.float32),
        ITEMS: rng.normal(size=(N_ITEMS, K)).astype(np.float32),
    }
    files = factor_files(str(tmp_path / "ckpt"), tables)
    out = str(tmp_path / "beam")
    model_lib.write_config(out, CONFIG)
    spec = ModelSpec(
        model_dir=out,
        input_dir=input_dir,
        shape=(N_USERS, N_ITEMS),
        k=K,
        vocabularies=vocabularies,
        train_interactions=overrides.pop("train_interactions", int((R != 0).sum())),
        part_bytes=part_bytes,
        **overrides,
    )
    with TestPipeline() as p:
        counts = None
        if column_counts is not None:
            counts = p | "Columns" >> beam.Create([np.asarray(column_counts, np.int64)])
        _ = p | beam.Create(files) | WriteModel(spec, column_counts=counts)
    return out, tables


def saved_by_model_lib(directory: str, tables: dict) -> str:
    r, c = np.nonzero(R)
    train = CsrMatrix.from_triples(r, c, R[r, c], R.shape)
    model = model_lib.WALSModel(
        user_factors=tables[USERS],
        item_factors=tables[ITEMS],
        seen_indptr=train.indptr,
        seen_indices=train.indices.astype(np.int32),
        seen_values=train.values.astype(np.float32),
        item_counts=train.col_counts().astype(np.int64),
        users=USERS_IDS,
        items=ITEM_IDS,
        config=CONFIG,
    )
    model_lib.save(model, directory)
    return directory


def read_tree(directory: str) -> dict[str, bytes]:
    out = {}
    for parent, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as handle:
                out[os.path.relpath(path, directory)] = handle.read()
    return out


@pytest.mark.parametrize(
    "part_bytes",
    [
        1,  # every part one row: 7 user parts, 5 item parts, 7 seen parts, 5 count parts
        40,  # factor parts of 3 rows, seen parts of 2 users, count parts of 5 items
        model_parts.PART_BYTES,  # one part each
    ],
)
def test_the_beam_model_is_the_bytes_model_save_writes(tmp_path, part_bytes):
    # The columns' counts agree with the rows': the check passes.
    out, tables = write_with_beam(tmp_path, part_bytes, column_counts=(R != 0).sum(axis=0))
    expected = read_tree(saved_by_model_lib(str(tmp_path / "saved"), tables))
    assert sorted(expected) == sorted(f"model/{name}" for name in os.listdir(f"{out}/model"))
    written = read_tree(out)  # the scratch parts are gone: the model's files alone
    assert written.keys() == expected.keys()
    for name, data in expected.items():
        assert written[name] == data, name
    loaded = model_lib.load(out)
    np.testing.assert_array_equal(loaded.seen_matrix().to_dense() != 0, R != 0)
    np.testing.assert_array_equal(loaded.item_counts, (R != 0).sum(axis=0))


def test_an_npy_header_is_the_one_numpy_save_writes():
    for array in (np.zeros((3, 2), np.float32), np.zeros(0, np.int64), np.ones(10**6, np.int32)):
        buffer = io.BytesIO()
        np.save(buffer, array)
        header = model_parts.npy_header(array.dtype, array.shape)
        assert buffer.getvalue()[: len(header)] == header
        assert len(buffer.getvalue()) == len(header) + array.nbytes


def test_a_vocabulary_without_its_last_newline_gets_one(tmp_path):
    data = model_lib.vocabulary_to_bytes(USERS_IDS).removesuffix(b"\n")
    out, _ = write_with_beam(tmp_path, model_parts.PART_BYTES, user_vocabulary=data)
    with open(f"{out}/model/vocab_users.txt", "rb") as handle:
        assert handle.read() == model_lib.vocabulary_to_bytes(USERS_IDS)


def test_the_model_is_exported_once_written(tmp_path):
    out, _ = write_with_beam(tmp_path, 40, export_k=2)
    loaded = tf.saved_model.load(f"{out}/export")
    result = loaded.signatures["serving_default"](visitorId=tf.constant(["u6", "nobody"]))
    assert result["known"].numpy().tolist() == [True, False]


@pytest.mark.parametrize(
    "overrides, column_counts, message",
    [
        (
            {"train_interactions": 10},
            None,
            "train TFRecords hold 11 cells but summary.json says 10",
        ),
        ({}, [3, 4, 2, 3, 0], "rows .items_for_user. and columns .users_for_item. disagree"),
        ({"user_vocabulary": b"u0\nbad\r\n"}, None, "holds a line break"),
        ({"user_vocabulary": b"u0\n\xff\n"}, None, "line 1 is not UTF-8"),
    ],
)
def test_inconsistent_data_fails_with_a_message(tmp_path, overrides, column_counts, message):
    with pytest.raises(Exception, match=message):
        write_with_beam(tmp_path, 40, column_counts=column_counts, **overrides)


def _random_records(rng, n_users: int, n_items: int, start: int = 0):
    """items_for_user records of users [start, start + n_users) in random order, each user's
    items in random order (some users without cells)."""
    records = []
    for user in rng.permutation(n_users) + start:
        n = int(rng.integers(0, min(n_items, 40)))
        items = rng.choice(n_items, n, replace=False).astype(np.int64)
        records.append((int(user), items, rng.uniform(0.1, 5.0, n).astype(np.float32)))
    return records


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ascending", [False, True])
@pytest.mark.parametrize("chunk_cells", [7, 1 << 16])
def test_a_seen_part_is_the_csr_rows_of_its_users(seed, ascending, chunk_cells, monkeypatch):
    """`seen_part` against `CsrMatrix.from_triples` of the same cells (the oracle the local
    model's seen items come from): counts, items ascending within each user, ratings; whether
    the records' items come ascending (as preprocessing writes them) or not, copied in chunks
    of a few cells (rows spanning chunks) or all at once."""
    monkeypatch.setattr(model_parts, "_SEEN_CHUNK_CELLS", chunk_cells)
    rng = np.random.default_rng(seed)
    n_users, n_items, part_rows, part = 300, 97, 120, 1
    start = part * part_rows
    records = _random_records(rng, part_rows, n_items, start)
    if ascending:
        records = [(u, np.sort(i), v) for u, i, v in records]
    rows = np.concatenate([np.full(len(i), u - start) for u, i, _ in records])
    cols = np.concatenate([i for _, i, _ in records])
    values = np.concatenate([v for _, _, v in records])
    oracle = CsrMatrix.from_triples(rows, cols, values, (part_rows, n_items))
    counts, items, ratings = model_parts.seen_part(part, records, part_rows, (n_users, n_items))
    np.testing.assert_array_equal(counts, oracle.row_counts())
    np.testing.assert_array_equal(items, oracle.indices)
    np.testing.assert_array_equal(ratings, oracle.values)
    assert items.dtype == np.int32 and ratings.dtype == np.float32 and counts.dtype == np.int64


_ONE_CELL = (np.array([1]), np.array([1.0], np.float32))


def _first_row(indices, values):
    """A change to records: the first record's user gets these cells instead."""
    cells = np.array(indices), np.array(values, np.float32)
    return lambda records: records.__setitem__(0, (records[0][0], *cells))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda records: records.append((records[0][0], *_ONE_CELL)), "more than one"),
        (_first_row([2, 2], [1.0, 1.0]), "twice"),
        (_first_row([97], [1.0]), "97"),
        (_first_row([-1], [1.0]), "-1"),
        (_first_row([3], [np.nan]), "1 non-finite"),
        (_first_row([3, 4], [1.0]), "different numbers"),
    ],
)
def test_a_bad_seen_part_is_refused_with_its_reason(change, message):
    records = _random_records(np.random.default_rng(5), 50, 97)
    change(records)
    with pytest.raises(model_parts.DatasetError, match=message):
        model_parts.seen_part(0, records, 50, (50, 97))


def test_a_seen_part_holds_little_more_than_its_records():
    """A seen part's peak above its records: 8 bytes a cell of output and a chunk's work arrays; one
    sort of every cell's (user, item) keys took about 47 bytes a cell more (measured with
    tracemalloc on the 8S sample of `benchmarks.scale`)."""
    rng = np.random.default_rng(7)
    records = _random_records(rng, 20000, 5000)
    cells = sum(len(i) for _, i, _ in records)
    peak = peak_bytes(lambda: model_parts.seen_part(0, records, 20000, (20000, 5000)))
    assert peak < 16 * cells, f"{peak / cells:.1f} bytes a cell"
