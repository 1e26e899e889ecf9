"""The exported SavedModel against a dense NumPy oracle on a hand-built 6 x 9 model.

The fixture's user factors are the exact WALS row solves of each train row against random item
factors, so folding in a training visitor's own history must give back their served scores.
The last tests interrupt the move into the version directory (`trainer.serving.version_dir`) and
check that the next export redoes it, and that nothing this project did not write is deleted;
tests/test_gcs_export.py does the same on the gs:// emulator with a killed process.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf

from common.staging import OutputExistsError
from trainer.serving import export, version_dir
from trainer.serving.model import WALSModel

MEDIAN_MS = 1000.0
LATENT = 3
# Train rows: visitor u has seen items SEEN[u]. Visitor 2 has seen 7 of the 9 items, so fewer
# than k candidates remain. Item counts: 1 and 2 are seen 3 times (a tie), 7 once, the rest twice.
SEEN = [[0, 1, 2], [1, 3], [0, 2, 4, 5, 6, 7, 8], [4], [1, 5, 8], [2, 3, 6]]
N_USERS, N_ITEMS = len(SEEN), 9
USERS = [f"v{u}" for u in range(N_USERS)]
ITEMS = [f"c{i}" for i in range(N_ITEMS)]
COUNTS = np.bincount(np.concatenate(SEEN), minlength=N_ITEMS)
POPULAR = sorted(range(N_ITEMS), key=lambda i: (-COUNTS[i], i))
# Each case's weighting, its parameters (under the names of earlier releases for the *_legacy
# cases) and the k it is exported with (k > N_ITEMS for one). Configs without binary_target
# predate it and fit t = r.
SCHEMES = {
    "uniform": ({"weighting": "uniform"}, 4),
    "column_frequency": (
        {
            "weighting": "column_frequency",
            "column_weight_scale": 2.0,
            "column_weight_exponent": -1.0,
        },
        4,
    ),
    "column_frequency_legacy": (
        {"weighting": "column_frequency", "feature_wt_factor": 2.0, "feature_wt_exp": -1.0},
        4,
    ),
    "inverse_frequency": ({"weighting": "inverse_frequency", "inverse_frequency_exponent": 0.5}, 4),
    "log_legacy": ({"weighting": "log", "feature_wt_exp": 0.5}, 4),
    "confidence": ({"weighting": "confidence", "confidence_alpha": 4.0}, N_ITEMS + 3),
    "confidence_binary": (
        {"weighting": "confidence", "confidence_alpha": 4.0, "binary_target": True},
        4,
    ),
}

_rng = np.random.default_rng(20240611)
ITEM_FACTORS = (0.5 * _rng.standard_normal((N_ITEMS, LATENT))).astype(np.float32)
# Raw durations (ms) of the train cells, row by row.
DURATIONS = [_rng.uniform(200.0, 3000.0, len(row)) for row in SEEN]


def config_for(case: str) -> dict:
    params, _ = SCHEMES[case]
    return {
        "scaling": "median",
        "scale_stats": {"median": MEDIAN_MS},
        "unobserved_weight": 0.1,
        "regularization": 0.05,
        "regularization_exp": 1.0,
        "latent_factors": LATENT,
        **params,
    }


# ---- The oracle: dense float64 NumPy, written from the formulas. ----


def ref_ratings(durations: np.ndarray) -> np.ndarray:
    """median scaling: r = min(0.3 · d / median, 1)."""
    return np.minimum(0.3 * np.asarray(durations, np.float64) / MEDIAN_MS, 1.0)


def ref_weights(items: np.ndarray, ratings: np.ndarray, config: dict) -> np.ndarray:
    """f_i of each given cell, from the train counts (old key names where the new are absent)."""
    counts = COUNTS[items].astype(np.float64)
    scheme = config["weighting"]
    if scheme == "uniform":
        return np.ones(len(items))
    if scheme == "column_frequency":
        scale = config.get("column_weight_scale", config.get("feature_wt_factor"))
        return scale * counts ** config.get("column_weight_exponent", config.get("feature_wt_exp"))
    if scheme in ("inverse_frequency", "log"):
        exponent = config.get("inverse_frequency_exponent", config.get("feature_wt_exp"))
        return (1.0 / counts) ** exponent
    return config["confidence_alpha"] * np.maximum(ratings, 0.0)


def ref_solve(items: list[int], ratings: np.ndarray, config: dict) -> np.ndarray:
    """x = A⁻¹ b with A = w0·YᵀY + Σ f_i y_i y_iᵀ + λ_u I and b = Σ (w0 + f_i) t_i y_i,
    t_i = 1 under binary_target, else r_i."""
    y_all = ITEM_FACTORS.astype(np.float64)
    w0, items = config["unobserved_weight"], np.asarray(items)
    f = ref_weights(items, ratings, config)
    targets = np.ones(len(items)) if config.get("binary_target", False) else ratings
    lam = config["regularization"] * (len(items) + w0 * N_ITEMS) ** config["regularization_exp"]
    a = w0 * y_all.T @ y_all + lam * np.eye(LATENT)
    b = np.zeros(LATENT)
    for item, f_i, t_i in zip(items, f, targets, strict=True):
        a += f_i * np.outer(y_all[item], y_all[item])
        b += (w0 + f_i) * t_i * y_all[item]
    return np.linalg.solve(a, b)


def ref_top_k(scores: np.ndarray, exclude: list[int], k: int) -> tuple[list[str], list[float]]:
    """Best k item names and scores, excluded items left out, padded with "" and -inf."""
    order = sorted((i for i in range(N_ITEMS) if i not in exclude), key=lambda i: (-scores[i], i))
    order = order[:k]
    pad = k - len(order)
    return [ITEMS[i] for i in order] + [""] * pad, [scores[i] for i in order] + [-np.inf] * pad


def make_model(case: str) -> WALSModel:
    """The fixture model: each user's factors are the exact solve of their train row."""
    config = config_for(case)
    user_factors = np.stack(
        [ref_solve(row, ref_ratings(d), config) for row, d in zip(SEEN, DURATIONS, strict=True)]
    )
    return WALSModel(
        user_factors=user_factors.astype(np.float32),
        item_factors=ITEM_FACTORS,
        seen_indptr=np.concatenate([[0], np.cumsum([len(row) for row in SEEN])]).astype(np.int64),
        seen_indices=np.concatenate(SEEN).astype(np.int32),
        item_counts=COUNTS.astype(np.int64),
        users=list(USERS),
        items=list(ITEMS),
        config=config,
    )


# ---- Fixtures and helpers. ----


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """case -> (model, export dir, loaded SavedModel), exported once per case of SCHEMES."""
    base = tmp_path_factory.mktemp("exports")
    cache = {}

    def get(case: str):
        if case not in cache:
            model = make_model(case)
            path = export.export_saved_model(model, str(base / case / "1"), SCHEMES[case][1])
            cache[case] = (model, path, tf.saved_model.load(path))
        return cache[case]

    return get


def serve(loaded, visitors: list[str]) -> tuple[list[list[str]], np.ndarray, np.ndarray]:
    out = loaded.signatures["serving_default"](visitorId=tf.constant(visitors, tf.string))
    names = [[name.decode() for name in row] for row in out["contentIds"].numpy()]
    return names, out["scores"].numpy(), out["known"].numpy()


def fold_in(loaded, content_ids: list[str], durations: list[float]) -> tuple[list[str], np.ndarray]:
    out = loaded.signatures["fold_in"](
        contentIds=tf.constant(content_ids, tf.string),
        durations=tf.constant(durations, tf.float32),
    )
    return [name.decode() for name in out["contentIds"].numpy()], out["scores"].numpy()


# ---- Tests. ----


def test_export_writes_a_complete_savedmodel_and_no_temp_dir(exported):
    _, path, _ = exported("uniform")
    assert os.path.isfile(os.path.join(path, "saved_model.pb"))
    assert os.path.isdir(os.path.join(path, "variables"))
    assert sorted(os.listdir(os.path.join(path, "assets"))) == [
        "vocab_items.txt",
        "vocab_users.txt",
    ]
    assert os.listdir(os.path.dirname(path)) == ["1"]
    with pytest.raises(FileExistsError):
        export.export_saved_model(make_model("uniform"), path)


def specs(structure: dict[str, tf.TensorSpec]) -> dict[str, tuple[tf.DType, list]]:
    """{signature key: (dtype, shape)}, as `saved_model_cli show` lists them."""
    return {key: (spec.dtype, spec.shape.as_list()) for key, spec in structure.items()}


def test_signature_names_and_dtypes(exported):
    _, _, loaded = exported("uniform")
    k = SCHEMES["uniform"][1]
    assert set(loaded.signatures) == {"serving_default", "fold_in"}
    serving = loaded.signatures["serving_default"]
    assert specs(serving.structured_input_signature[1]) == {"visitorId": (tf.string, [None])}
    assert specs(serving.structured_outputs) == {
        "contentIds": (tf.string, [None, k]),
        "scores": (tf.float32, [None, k]),
        "known": (tf.bool, [None]),
    }
    folding = loaded.signatures["fold_in"]
    assert specs(folding.structured_input_signature[1]) == {
        "contentIds": (tf.string, [None]),
        "durations": (tf.float32, [None]),
    }
    assert specs(folding.structured_outputs) == {
        "contentIds": (tf.string, [k]),
        "scores": (tf.float32, [k]),
    }


def test_known_visitors_match_numpy_and_never_get_seen_items(exported):
    model, _, loaded = exported("uniform")
    k = SCHEMES["uniform"][1]
    names, scores, known = serve(loaded, USERS)
    assert known.tolist() == [True] * N_USERS
    for u, row in enumerate(SEEN):
        expected_names, expected_scores = ref_top_k(
            model.user_factors[u].astype(np.float64) @ ITEM_FACTORS.T.astype(np.float64), row, k
        )
        assert names[u] == expected_names, f"visitor {u}"
        np.testing.assert_allclose(scores[u], expected_scores, rtol=1e-5, atol=1e-6)
        assert not {ITEMS[i] for i in row} & set(names[u])
    # Visitor 2 has only two unseen items: the rest is padding.
    assert names[2][2:] == ["", ""] and np.all(np.isneginf(scores[2][2:]))


def test_unknown_visitors_get_popular_items_in_a_mixed_batch(exported):
    _, _, loaded = exported("uniform")
    k = SCHEMES["uniform"][1]
    names, scores, known = serve(loaded, ["nobody", "v3", "", "v0"])
    assert known.tolist() == [False, True, False, True]
    popular = [ITEMS[i] for i in POPULAR[:k]]
    assert popular[:2] == ["c1", "c2"]  # the tie at count 3 goes to the lower itemId
    for row in (0, 2):
        assert names[row] == popular
        np.testing.assert_array_equal(scores[row], COUNTS[POPULAR[:k]].astype(np.float32))
    alone_names, alone_scores, _ = serve(loaded, ["v3", "v0"])
    assert [names[1], names[3]] == alone_names
    np.testing.assert_array_equal(scores[[1, 3]], alone_scores)


@pytest.mark.parametrize("case", list(SCHEMES))
def test_fold_in_matches_the_dense_solve(exported, case):
    model, _, loaded = exported(case)
    k = SCHEMES[case][1]
    # c1 twice (summed to 1000 ms), c6, an unknown contentId, and c4 with a zero duration (no
    # rating, as preprocessing drops sums <= 0, but still never recommended).
    names, scores = fold_in(
        loaded, ["c1", "c6", "unknown", "c1", "c4"], [400.0, 2500.0, 9000.0, 600.0, 0.0]
    )
    x = ref_solve([1, 6], ref_ratings([1000.0, 2500.0]), model.config)
    expected_names, expected_scores = ref_top_k(ITEM_FACTORS.astype(np.float64) @ x, [1, 4, 6], k)
    assert names == expected_names
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-4, atol=1e-5)
    assert not {"c1", "c4", "c6"} & set(names)


@pytest.mark.parametrize("case", list(SCHEMES))
def test_fold_in_of_a_training_history_reproduces_the_served_row(exported, case):
    _, _, loaded = exported(case)
    served_names, served_scores, _ = serve(loaded, USERS)
    for u, (row, durations) in enumerate(zip(SEEN, DURATIONS, strict=True)):
        names, scores = fold_in(loaded, [ITEMS[i] for i in row], durations.tolist())
        assert names == served_names[u], f"visitor {u}"
        np.testing.assert_allclose(scores, served_scores[u], rtol=1e-4, atol=1e-5)


def test_fold_in_without_known_items_returns_popular_items(exported):
    _, _, loaded = exported("uniform")
    k = SCHEMES["uniform"][1]
    for content_ids, durations in ((["nope", "nada"], [5000.0, 100.0]), ([], [])):
        names, scores = fold_in(loaded, content_ids, durations)
        assert names == [ITEMS[i] for i in POPULAR[:k]]
        np.testing.assert_array_equal(scores, COUNTS[POPULAR[:k]].astype(np.float32))
    # A known item with no positive duration is excluded from the popular items.
    names, _ = fold_in(loaded, ["c1"], [0.0])
    assert names == [ITEMS[i] for i in POPULAR if i != 1][:k]


def test_python_and_saved_model_fold_in_agree_on_a_rating_below_the_train_minimum(tmp_path):
    """Under `unit` scaling a new visitor's short view rates below 0; its confidence weight is
    max(α·r, 0) = 0 in the Python model and in the SavedModel alike, as the oracle says."""
    model = make_model("confidence")
    model.config.update(scaling="unit", scale_stats={"min": 1000.0, "max": 3000.0})
    loaded = tf.saved_model.load(export.export_saved_model(model, str(tmp_path / "1"), 4))
    history, durations = ["c1", "c6"], [500.0, 2500.0]  # ratings -0.25 and 0.75
    x = ref_solve([1, 6], np.array([-0.25, 0.75]), model.config)
    expected_names, expected_scores = ref_top_k(ITEM_FACTORS.astype(np.float64) @ x, [1, 6], 4)

    x_python, items = model.fold_in(history, durations)
    np.testing.assert_array_equal(items, [1, 6])
    np.testing.assert_allclose(x_python, x, rtol=1e-5, atol=1e-6)
    python = model.recommend_for_history(history, durations, k=4)
    assert python.content_ids == expected_names
    np.testing.assert_allclose(python.scores, expected_scores, rtol=1e-4, atol=1e-5)
    names, scores = fold_in(loaded, history, durations)
    assert names == expected_names
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-4, atol=1e-5)


def test_export_rejects_bad_arguments(tmp_path):
    model = make_model("uniform")
    with pytest.raises(ValueError, match="k must be > 0"):
        export.export_saved_model(model, str(tmp_path / "a"), k=0)
    del model.config["regularization_exp"]
    with pytest.raises(KeyError, match="regularization_exp"):
        export.export_saved_model(model, str(tmp_path / "b"))
    model = make_model("inverse_frequency")
    del model.config["inverse_frequency_exponent"]
    with pytest.raises(KeyError, match="inverse_frequency_exponent"):
        export.export_saved_model(model, str(tmp_path / "c"))
    model = make_model("column_frequency_legacy")
    del model.config["feature_wt_exp"]
    with pytest.raises(KeyError, match="column_weight_exponent"):
        export.export_saved_model(model, str(tmp_path / "d"))
    assert os.listdir(tmp_path) == []


def test_old_and_new_weighting_keys_export_the_same_model(exported):
    """A model saved with feature_wt_factor / feature_wt_exp folds in as with the new keys."""
    history, durations = ["c1", "c6", "c3"], [1000.0, 2500.0, 700.0]
    for new, old in (
        ("column_frequency", "column_frequency_legacy"),
        ("inverse_frequency", "log_legacy"),
    ):
        new_names, new_scores = fold_in(exported(new)[2], history, durations)
        old_names, old_scores = fold_in(exported(old)[2], history, durations)
        assert new_names == old_names
        np.testing.assert_array_equal(new_scores, old_scores)


# ---- Publishing the version directory: never half there, and a retry redoes it. ----

HISTORY, HISTORY_MS = ["c1", "c6", "c3"], [1000.0, 2500.0, 700.0]


def outputs(loaded) -> list[np.ndarray]:
    """Everything the two signatures answer for every visitor, an unknown one and a history."""
    names, scores, known = serve(loaded, [*USERS, "nobody"])
    fold_names, fold_scores = fold_in(loaded, HISTORY, HISTORY_MS)
    return [np.array(names), scores, known, np.array(fold_names), fold_scores]


def assert_same_model(path: str, clean: str) -> None:
    """path holds the same files as the clean export and answers exactly as it does."""
    assert version_dir._files(path) == version_dir._files(clean)
    for got, want in zip(outputs(tf.saved_model.load(path)), outputs(tf.saved_model.load(clean))):
        np.testing.assert_array_equal(got, want)


def moves_file_by_file(monkeypatch, fail_after: int | None = None) -> list[str]:
    """Publishes file by file, as on gs://, recording each moved name (and whether
    saved_model.pb was already in the target then); raises OSError on move fail_after + 1."""
    monkeypatch.setattr(version_dir, "_moves_atomically", lambda path: False)
    real_move, moved = version_dir._move_file, []

    def move(source: str, target: str) -> None:
        if fail_after is not None and len(moved) == fail_after:
            raise OSError("connection reset while copying " + source)
        ready = os.path.exists(os.path.join(os.path.dirname(target), version_dir.SAVED_MODEL))
        real_move(source, target)
        moved.append(target)
        assert not ready  # nothing is moved once the SavedModel is loadable

    monkeypatch.setattr(version_dir, "_move_file", move)
    return moved


def test_file_by_file_publishing_moves_the_marker_first_and_saved_model_pb_last(
    exported, tmp_path, monkeypatch
):
    clean = exported("uniform")[1]
    moved = moves_file_by_file(monkeypatch)
    path = export.export_saved_model(make_model("uniform"), str(tmp_path / "1"), k=4)
    names = [os.path.relpath(target, path) for target in moved]
    assert names[0] == version_dir.MARKER and names[-1] == version_dir.SAVED_MODEL
    assert sorted(names) == version_dir._files(clean) == version_dir._files(path)
    assert os.listdir(tmp_path) == ["1"]  # the staging directory is gone
    assert_same_model(path, clean)
    with open(os.path.join(path, version_dir.MARKER)) as handle:
        marker = json.load(handle)
    assert marker["completion_marker"] == "saved_model.pb"
    assert sorted(marker["files"]) == sorted(set(names) - {version_dir.MARKER})
    assert marker["export"] == {
        "k": 4,
        "users": N_USERS,
        "items": N_ITEMS,
        "latent_factors": 3,
        "serving_model": "full",
        "format": export.FORMAT,
    }


def test_a_failed_move_takes_back_what_it_moved(tmp_path, monkeypatch):
    moves_file_by_file(monkeypatch, fail_after=3)
    with pytest.raises(OSError, match="connection reset"):
        export.export_saved_model(make_model("uniform"), str(tmp_path / "1"), k=4)
    assert os.listdir(tmp_path) == []  # neither a partial version nor the staging directory


def test_an_export_killed_mid_move_is_redone_by_the_next_one(exported, tmp_path, monkeypatch):
    """The move stops after three files and nothing can be deleted (the store is gone, as when
    the process is killed): the version is there but not loadable; the next export redoes it."""
    clean = exported("uniform")[1]
    moved = moves_file_by_file(monkeypatch, fail_after=3)

    def unreachable(path: str) -> None:
        raise OSError("connection reset while deleting " + path)

    monkeypatch.setattr(version_dir, "_delete_file", unreachable)
    path = str(tmp_path / "1")
    with pytest.raises(OSError, match="connection reset while copying"):
        export.export_saved_model(make_model("uniform"), path, k=4)
    assert len(moved) == 3 and version_dir._files(path) == sorted(
        os.path.relpath(target, path) for target in moved
    )
    assert version_dir.MARKER in version_dir._files(path)
    assert not os.path.exists(os.path.join(path, version_dir.SAVED_MODEL))
    with pytest.raises(OSError):
        tf.saved_model.load(path)
    assert version_dir.inspect(path) == version_dir.Existing(tuple(version_dir._files(path)))

    monkeypatch.undo()  # the store is back; the retry publishes with the local atomic rename
    assert export.export_saved_model(make_model("uniform"), path, k=4) == path
    assert os.listdir(tmp_path) == ["1"]
    assert_same_model(path, clean)


def interrupted_copy(clean: str, path: str) -> None:
    """What a killed file-by-file move leaves: the marker and some files, no saved_model.pb."""
    shutil.copytree(clean, path)
    os.remove(os.path.join(path, version_dir.SAVED_MODEL))


def test_what_the_project_did_not_write_is_refused_and_kept(exported, tmp_path):
    clean, model = exported("uniform")[1], make_model("uniform")
    foreign = tmp_path / "foreign"  # a SavedModel directory of someone else's
    shutil.copytree(clean, foreign)
    os.remove(foreign / version_dir.MARKER)
    ours_and_more = tmp_path / "ours_and_more"  # an interrupted export of ours, and a file
    interrupted_copy(clean, str(ours_and_more))
    (ours_and_more / "notes.txt").write_text("mine")
    not_our_marker = tmp_path / "not_our_marker"
    interrupted_copy(clean, str(not_our_marker))
    (not_our_marker / version_dir.MARKER).write_text('{"written_by": "someone"}')
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    cases = {
        foreign: "this project's export did not write it (no .written-by-ga-wals): assets/",
        ours_and_more: "it holds files this project did not write: notes.txt",
        not_our_marker: "its .written-by-ga-wals is not one this project's export wrote",
        a_file: "it is a file",
    }
    for path, reason in cases.items():
        before = sorted(p.relative_to(tmp_path) for p in path.rglob("*"))
        for replace in (False, True):
            expected = re.escape(f"refusing to export to {path}: {reason}")
            with pytest.raises(OutputExistsError, match=expected):
                export.export_saved_model(model, str(path), k=4, replace=replace)
        assert sorted(p.relative_to(tmp_path) for p in path.rglob("*")) == before
    assert not [name for name in os.listdir(tmp_path) if ".incomplete-" in name]


def test_an_interrupted_export_is_redone_and_a_complete_one_replaced_only_when_asked(
    exported, tmp_path
):
    clean, model = exported("uniform")[1], make_model("uniform")
    path = str(tmp_path / "1")
    interrupted_copy(clean, path)
    export.export_saved_model(model, path, k=4)
    assert_same_model(path, clean)
    with pytest.raises(FileExistsError, match="already holds a complete export"):
        export.export_saved_model(model, path, k=2)
    export.export_saved_model(model, path, k=2, replace=True)
    names, _, _ = serve(tf.saved_model.load(path), USERS)
    assert [len(row) for row in names] == [2] * N_USERS
    empty = tmp_path / "2" / "variables"  # empty directories hold nothing of anyone's
    empty.mkdir(parents=True)
    export.export_saved_model(model, str(tmp_path / "2"), k=4)
    assert_same_model(str(tmp_path / "2"), clean)
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]
