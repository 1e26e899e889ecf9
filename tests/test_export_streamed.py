"""The streamed export: from a model directory, chunk by chunk, and the fold-in-only model.

The oracle is the export of the model in memory in one chunk, which tests/test_export.py checks
against dense NumPy; here the same model is saved with `model.save` and exported from its
directory with chunks that divide none of the tables' row counts, and every answer must be
equal. The checkpoint's tensors are read back whole (`RestoreV2` of the full slice) and compared
with the model's arrays; the sizes on disk with `export_size.table_bytes`.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from tests.test_export import (
    HISTORY,
    HISTORY_MS,
    N_ITEMS,
    N_USERS,
    SCHEMES,
    SEEN,
    fold_in,
    make_model,
    outputs,
    ref_top_k,
    serve,
)
from trainer import task
from trainer.serving import export, export_size
from trainer.serving import model as model_lib

CASE = "confidence_binary"
K = SCHEMES[CASE][1]
# 28 bytes: 2 rows of factors (k = 3), 3 of seen_indptr, 7 of seen_indices, 3 or 7 counts;
# 1 byte: one row per chunk. Neither divides 6 users, 9 items or 19 seen cells.
TINY_CHUNKS = (28, 1)
HISTORIES = [
    (HISTORY, HISTORY_MS),
    (["c8", "unknown", "c8"], [300.0, 5.0, 900.0]),
    (["c2"], [0.0]),
    (["nobody-knows"], [1000.0]),
    ([], []),
]


def fold_ins(loaded) -> list[np.ndarray]:
    out = []
    for content_ids, durations in HISTORIES:
        names, scores = fold_in(loaded, content_ids, durations)
        out += [np.array(names), scores]
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """(model, model dir, {name: export dir}): in memory in one chunk, from the directory in
    tiny chunks, and the fold-in-only model from the directory."""
    base = tmp_path_factory.mktemp("streamed")
    model = make_model(CASE)
    model_dir = str(base / "model")
    model_lib.save(model, model_dir)
    paths = {"memory": export.export_saved_model(model, str(base / "memory" / "1"), K)}
    for chunk in TINY_CHUNKS:
        paths[f"dir{chunk}"] = export.export_saved_model(
            model_dir, str(base / f"dir{chunk}" / "1"), K, chunk_bytes=chunk
        )
    paths["fold_in"] = export.export_saved_model(
        model_dir, str(base / "fold_in" / "1"), K, serving_model=export.FOLD_IN, chunk_bytes=28
    )
    return model, model_dir, paths


def restored(path: str) -> dict[str, np.ndarray]:
    """Every variable of an export's checkpoint, read whole (the full-slice spec)."""
    prefix = os.path.join(path, "variables", "variables")
    dtypes = tf.train.load_checkpoint(prefix).get_variable_to_dtype_map()
    keys = sorted(key for key in dtypes if key.endswith("/.ATTRIBUTES/VARIABLE_VALUE"))
    values = tf.raw_ops.RestoreV2(
        prefix=prefix,
        tensor_names=keys,
        shape_and_slices=[""] * len(keys),
        dtypes=[dtypes[key] for key in keys],
    )
    return {key.split("/")[0]: value.numpy() for key, value in zip(keys, values, strict=True)}


def test_the_directory_export_in_any_chunk_answers_as_the_in_memory_one(exports):
    model, _, paths = exports
    want = outputs(tf.saved_model.load(paths["memory"])) + fold_ins(
        tf.saved_model.load(paths["memory"])
    )
    # The in-memory export itself, against the dense oracle for a known visitor.
    names, scores, known = serve(tf.saved_model.load(paths["memory"]), ["v2", "nobody"])
    expected, _ = ref_top_k(
        model.user_factors[2].astype(np.float64) @ model.item_factors.T, SEEN[2], K
    )
    assert names[0] == expected and known.tolist() == [True, False]
    for chunk in TINY_CHUNKS:
        loaded = tf.saved_model.load(paths[f"dir{chunk}"])
        got = outputs(loaded) + fold_ins(loaded)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)


def test_the_checkpoint_holds_the_model_whole_with_int32_seen_items(exports):
    model, _, paths = exports
    tables = restored(paths["dir28"])
    assert tables["seen_indices"].dtype == np.int32 and tables["seen_indptr"].dtype == np.int64
    np.testing.assert_array_equal(tables["seen_indices"], model.seen_indices)
    np.testing.assert_array_equal(tables["seen_indptr"], model.seen_indptr)
    np.testing.assert_array_equal(tables["user_factors"], model.user_factors)
    np.testing.assert_array_equal(tables["item_factors"], model.item_factors)
    np.testing.assert_array_equal(tables["item_counts"], model.item_counts.astype(np.float64))
    np.testing.assert_array_equal(tables["popularity"], model.item_counts.astype(np.float32))
    y = model.item_factors.astype(np.float64)
    w0 = model.config["unobserved_weight"]
    np.testing.assert_allclose(tables["w0_gramian"], w0 * y.T @ y, rtol=1e-12)
    for name, value in restored(paths["memory"]).items():
        np.testing.assert_array_equal(value, tables[name], err_msg=name)


def test_the_fold_in_only_model_folds_in_as_the_full_one_and_holds_no_user_side(exports):
    _, _, paths = exports
    path = paths["fold_in"]
    loaded = tf.saved_model.load(path)
    assert set(loaded.signatures) == {"serving_default", "fold_in"}
    assert sorted(os.listdir(os.path.join(path, "assets"))) == ["vocab_items.txt"]
    assert sorted(restored(path)) == ["item_counts", "item_factors", "popularity", "w0_gramian"]
    full = fold_ins(tf.saved_model.load(paths["memory"]))
    for a, b in zip(fold_ins(loaded), full, strict=True):
        np.testing.assert_array_equal(a, b)
    # serving_default is fold_in: same inputs, same answers.
    default = loaded.signatures["serving_default"](
        contentIds=tf.constant(HISTORY), durations=tf.constant(HISTORY_MS, tf.float32)
    )
    np.testing.assert_array_equal(default["contentIds"].numpy().astype(str), full[0])
    np.testing.assert_array_equal(default["scores"].numpy(), full[1])


@pytest.mark.parametrize("name", ["memory", "dir1", "fold_in"])
def test_the_size_formula_matches_the_disk(exports, name):
    model, _, paths = exports
    path = paths[name]
    serving_model = export.FOLD_IN if name == "fold_in" else export.FULL
    vocab = {
        f"{side}.txt": len(model_lib.vocabulary_to_bytes(ids))
        for side, ids in (("vocab_users", model.users), ("vocab_items", model.items))
    }
    predicted = export_size.table_bytes(
        N_USERS,
        N_ITEMS,
        len(model.seen_indices),
        model.item_factors.shape[1],
        vocab["vocab_users.txt"],
        vocab["vocab_items.txt"],
        serving_model,
    )
    sizes = export_size.on_disk(path)
    assets = {
        n: os.path.getsize(os.path.join(path, "assets", n))
        for n in os.listdir(os.path.join(path, "assets"))
    }
    assert assets == {n: b for n, b in predicted.items() if n.endswith(".txt")}
    assert sizes["assets"] == sum(assets.values())
    tables = sum(b for n, b in predicted.items() if not n.endswith(".txt"))
    variables = os.path.join(path, "variables")
    data = sum(
        os.path.getsize(os.path.join(variables, n)) for n in os.listdir(variables) if ".data-" in n
    )
    index = os.path.getsize(os.path.join(variables, "variables.index"))
    graph = tf.train.load_checkpoint(os.path.join(variables, "variables")).get_tensor(
        "_CHECKPOINTABLE_OBJECT_GRAPH"
    )
    # The data files: every table's raw bytes, and the object graph (a length and a checksum).
    assert 0 <= data - tables - len(graph) <= 16, (data, tables, len(graph))
    # The index: an entry per tensor and per written slice (dir1: one per row).
    slices = N_USERS + N_ITEMS * 3 + N_USERS + 1 + len(model.seen_indices) if name == "dir1" else 8
    assert index <= 1024 + 96 * slices, (index, slices)
    assert sizes["variables"] == data + index
    assert sizes["graph"] == os.path.getsize(os.path.join(path, "saved_model.pb"))
    assert sizes["total"] == sum(v for k, v in sizes.items() if k != "total")


def test_bad_serving_models_and_chunks_are_refused_before_anything_is_written(tmp_path):
    model = make_model(CASE)
    with pytest.raises(ValueError, match="serving_model must be one of"):
        export.export_saved_model(model, str(tmp_path / "a"), serving_model="users")
    with pytest.raises(ValueError, match="chunk_bytes must be > 0"):
        export.export_saved_model(model, str(tmp_path / "b"), chunk_bytes=0)
    with pytest.raises(FileNotFoundError):
        export.export_saved_model(str(tmp_path / "no-model"), str(tmp_path / "c"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as refused:
        task.run(
            ["--input_dir", str(tmp_path), "--output_dir", str(out), "--serving_model", "both"]
        )
    assert refused.value.code == 2
    assert os.listdir(tmp_path) == []


def test_a_vocabulary_that_does_not_match_the_factors_is_refused(tmp_path):
    model = make_model(CASE)
    model_lib.save(model, str(tmp_path / "model"))
    with open(tmp_path / "model" / "model" / "vocab_items.txt", "ab") as handle:
        handle.write(b"c9\n")
    with pytest.raises(ValueError, match="vocab_items holds 10 IDs, the factors 9 rows"):
        export.export_saved_model(str(tmp_path / "model"), str(tmp_path / "export" / "1"))
    assert os.listdir(tmp_path / "export") == []


def _graph_mode_answers(path: str, visitors: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """serving_default through the TF1 loader, the path TensorFlow Serving takes (C++
    `LoadSavedModel`: the graph, the saver's restore op over `variables/`, then the init op that
    fills the tables from `assets/`), in a graph of its own."""
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], path)
        signature = meta.signature_def["serving_default"]
        fetches = {name: info.name for name, info in signature.outputs.items()}
        feed = {signature.inputs["visitorId"].name: np.array(visitors, dtype=object)}
        got = session.run(fetches, feed)
    return got["contentIds"], got["scores"]


def test_the_sliced_checkpoint_loads_as_tensorflow_serving_loads_it(exports):
    """The variables written slice by slice restore whole through the TF1 loader too, and the
    answers equal the eager load's."""
    _, _, paths = exports
    visitors = ["v0", "v2", "v5", "nobody"]
    names, scores = _graph_mode_answers(paths["dir1"], visitors)
    want_names, want_scores, _ = serve(tf.saved_model.load(paths["memory"]), visitors)
    assert [[name.decode() for name in row] for row in names] == want_names
    np.testing.assert_array_equal(scores, want_scores)
