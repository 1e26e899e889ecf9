"""End to end: synthetic GA360 -> preprocess -> trainer.task -> metrics, model, predictions, export.

One preprocessed sample and one trained model are shared by the module's tests.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from conftest import read_cells

from common import cli
from pipeline import preprocess, synthetic
from trainer import batch_predict, task
from trainer.local import dataset as data
from trainer.serving import export
from trainer.serving import model as model_lib
from trainer.serving.predictions import read_predictions
from transforms import features


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("e2e")
    sample = str(root / "sessions.json.gz")
    synthetic.write_sessions(sample, num_sessions=4000, seed=42)
    out = str(root / "preprocessed")
    preprocess.run(["--input", sample, "--output_dir", out])
    return out


@pytest.fixture(scope="module")
def trained(preprocessed, tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("model") / "model")
    result = task.run(
        ["--input_dir", preprocessed, "--output_dir", out, "--num_iters", "8", "--no_progress"]
    )
    return out, result


def test_wals_beats_popularity_by_2x(trained):
    _, result = trained
    assert result["wals"]["users_evaluated"] > 500
    assert result["wals"]["recall@10"] >= 2.0 * result["popularity"]["recall@10"]
    assert result["wals"]["ndcg@10"] > result["popularity"]["ndcg@10"]


def test_metrics_file_history_and_tensorboard(trained):
    out, result = trained
    with open(os.path.join(out, task.METRICS_FILE)) as handle:
        on_disk = json.load(handle)
    assert on_disk["wals"] == pytest.approx(result["wals"])
    history = on_disk["history"]
    assert [h["iteration"] for h in history] == list(range(1, 9))
    # By default the loss is computed after the last iteration only, and only it says so.
    assert [h["iteration"] for h in history if "loss/total" in h] == [8]
    assert not [key for h in history[:-1] for key in h if key.startswith("loss/")]
    assert np.isfinite(history[-1]["loss/total"]) and history[-1]["loss/total"] > 0
    assert all("eval/recall@10" in h for h in history)
    events = os.listdir(os.path.join(out, "tensorboard"))
    assert any(name.startswith("events.out.tfevents") for name in events)


@pytest.mark.parametrize(
    ("loss_every", "with_loss"), [("1", [1, 2, 3, 4]), ("3", [3, 4]), ("0", [])]
)
def test_loss_every_says_which_iterations_have_the_loss(
    tiny_preprocessed, tmp_path, loss_every, with_loss
):
    out = str(tmp_path / "model")
    argv = ["--input_dir", tiny_preprocessed, "--output_dir", out, "--num_iters", "4"]
    argv += ["--latent_factors", "8", "--eval_every", "0", "--no_progress"]
    result = task.run([*argv, "--loss_every", loss_every])
    history = result["history"]
    assert [h["iteration"] for h in history] == [1, 2, 3, 4]
    assert [h["iteration"] for h in history if "loss/total" in h] == with_loss
    losses = [h["loss/total"] for h in history if "loss/total" in h]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(losses, losses[1:])), losses  # ALS descends


def test_batch_predictions_exclude_seen_and_use_original_ids(preprocessed, trained, tmp_path):
    out, _ = trained
    predictions = tmp_path / "recs.tsv"
    batch_predict.run(
        ["--model_dir", out, "--output", str(predictions), "--k", "10", "--no_progress"]
    )
    train = read_cells(preprocessed, features.TRAIN_DIR)
    seen: dict[str, set[str]] = {}
    for visitor, content in train:
        seen.setdefault(visitor, set()).add(content)
    items = {content for _, content in train}
    rows = list(read_predictions(str(predictions)))
    assert len(rows) == len(seen)
    for visitor, ranked in ((row.key, row.ranked) for row in rows):
        assert len(ranked) == 10 and len(set(ranked)) == 10
        assert set(ranked) <= items, "content IDs are the original ones"
        assert not set(ranked) & seen[visitor], "no already-seen content"


def test_model_load_recommend_and_export_agree(trained):
    out, _ = trained
    model = model_lib.load(out)
    visitors = model.users[:5] + ["never-seen-visitor"]
    recs = model.recommend(visitors, k=10)
    loaded = tf.saved_model.load(os.path.join(out, "export"))
    served = loaded.signatures["serving_default"](visitorId=tf.constant(visitors))
    for row, rec in enumerate(recs):
        ids = [c.decode() for c in served["contentIds"][row].numpy()]
        assert ids == rec.content_ids
        assert bool(served["known"][row].numpy()) == rec.known
    assert recs[-1].known is False


def test_same_seed_same_factors(preprocessed, tmp_path):
    runs = []
    for name in ("a", "b"):
        out = str(tmp_path / name)
        task.run(
            [
                "--input_dir",
                preprocessed,
                "--output_dir",
                out,
                "--num_iters",
                "2",
                "--eval_every",
                "0",
                "--no_progress",
                "--latent_factors",
                "8",
            ]
        )
        runs.append(model_lib.load(out))
    np.testing.assert_array_equal(runs[0].user_factors, runs[1].user_factors)
    np.testing.assert_array_equal(runs[0].item_factors, runs[1].item_factors)


def test_bad_inputs_give_clear_errors_and_no_output(preprocessed, tmp_path):
    out = str(tmp_path / "model")
    with pytest.raises(cli.UsageError, match="not a finished preprocessing output"):
        task.run(["--input_dir", str(tmp_path / "missing"), "--output_dir", out])
    with pytest.raises(cli.UsageError, match="latent_factors"):
        task.run(["--input_dir", preprocessed, "--output_dir", out, "--latent_factors", "0"])
    with pytest.raises(cli.UsageError, match="--export_k"):
        task.run(["--input_dir", preprocessed, "--output_dir", out, "--export_k", "0"])
    assert not os.path.exists(out)
    assert not [name for name in os.listdir(tmp_path) if "incomplete" in name]


def test_overwrite_replaces_only_a_model_we_wrote(preprocessed, tmp_path, capsys):
    out = str(tmp_path / "model")
    argv = ["--input_dir", preprocessed, "--output_dir", out, "--num_iters", "1", "--no_progress"]
    first = task.run(argv)
    with pytest.raises(cli.UsageError, match="--overwrite"):
        task.run(argv)
    again = task.run([*argv, "--overwrite"])
    assert again["wals"] == pytest.approx(first["wals"])
    assert os.listdir(tmp_path) == ["model"]
    # A directory of other files, and the dataset itself, are refused: exit 2, nothing deleted.
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    for target in (str(foreign), preprocessed):
        before = sorted(os.walk(target))
        assert task.main([*argv[:2], "--output_dir", target, "--overwrite"]) == 2
        assert f"error: refusing to replace {target}" in capsys.readouterr().err
        assert sorted(os.walk(target)) == before
    assert (foreign / "notes.txt").read_text() == "keep"


def test_inconsistent_dataset_is_refused(preprocessed, tmp_path):
    import shutil

    broken = str(tmp_path / "broken")
    shutil.copytree(preprocessed, broken)
    summary_path = os.path.join(broken, features.SUMMARY_FILE)
    with open(summary_path) as handle:
        summary = json.load(handle)
    summary["nitems"] += 1
    with open(summary_path, "w") as handle:
        json.dump(summary, handle)
    with pytest.raises(data.DatasetError, match="vocabulary sizes"):
        data.load_dataset(broken)
    out = str(tmp_path / "model")
    with pytest.raises(cli.UsageError, match="vocabulary sizes"):
        task.run(["--input_dir", broken, "--output_dir", out])
    assert not os.path.exists(out)


def test_fold_in_of_a_training_row_matches_the_dense_solve_and_the_export(trained):
    """Fold-in through the real model and SavedModel against np.linalg.solve of the row's
    dense normal equations, written here from the formulas (README, training section)."""
    out, _ = trained
    model = model_lib.load(out)
    user = 3
    items = np.sort(model.seen(user))
    config = model.wals_config()
    y = model.item_factors.astype(np.float64)
    n_items, k = y.shape
    # Every history item gets the median duration, so rating 0.3 each (median scaling).
    r = np.full(items.size, 0.3)
    counts = model.item_counts[items].astype(np.float64)
    f = {
        "uniform": np.ones(items.size),
        "column_frequency": config.column_weight_scale * counts**config.column_weight_exponent,
        "inverse_frequency": (1.0 / counts) ** config.inverse_frequency_exponent,
        "confidence": config.confidence_alpha * r,
    }[config.weighting]
    t = np.ones_like(r) if config.binary_target else r
    w0 = config.unobserved_weight
    lam = config.regularization * (items.size + w0 * n_items) ** config.regularization_exp
    a = w0 * y.T @ y + (y[items].T * f) @ y[items] + lam * np.eye(k)
    expected = np.linalg.solve(a, y[items].T @ ((w0 + f) * t))
    expected_scores = y @ expected
    expected_scores[items] = -np.inf
    expected_order = np.lexsort((np.arange(n_items), -expected_scores))[:10]

    median = model.config["scale_stats"]["median"]
    contents = [model.items[i] for i in items]
    x, used = model.fold_in(contents, [median] * items.size)  # rating 0.3 each
    np.testing.assert_array_equal(used, items)
    np.testing.assert_allclose(x, expected, rtol=1e-4, atol=1e-5)

    recs = model.recommend_for_history(contents, [median] * items.size, k=10)
    assert recs.known
    assert recs.content_ids == [model.items[i] for i in expected_order]
    np.testing.assert_allclose(recs.scores, expected_scores[expected_order], rtol=1e-4, atol=1e-5)
    loaded = tf.saved_model.load(os.path.join(out, "export"))
    served = loaded.signatures["fold_in"](
        contentIds=tf.constant(contents), durations=tf.constant([median] * items.size)
    )
    assert [c.decode() for c in served["contentIds"].numpy()] == recs.content_ids
    np.testing.assert_allclose(
        served["scores"].numpy(), expected_scores[expected_order], rtol=1e-4, atol=1e-5
    )


def test_the_command_logs_one_headline_line_and_trainer_show_the_table():
    """run_local.sh used to print the metrics table twice: trainer.task now logs one line."""
    from trainer import training

    result = {
        "wals": {"recall@10": 0.34421, "ndcg@10": 0.3, "recall@20": 0.5, "users_evaluated": 7},
        "popularity": {"recall@10": 0.12734, "ndcg@10": 0.1, "recall@20": 0.25},
    }
    assert training.headline(result) == (
        "Recall@10 0.3442 (popularity 0.1273), Recall@20 0.5000 (popularity 0.2500)"
    )
    assert training.headline({}) == "no held-out interactions: nothing to evaluate"


def test_serving_model_fold_in_exports_the_item_side_that_folds_in_as_the_full_model(
    trained, preprocessed, tmp_path
):
    """--serving_model fold_in through the real entry point: assets and tables of the item side
    alone, and fold_in answers equal to those of the full model exported from the same model
    directory (streamed from its files) and of the Python model."""
    out, _ = trained
    model = model_lib.load(out)
    history = model.items[:3] + ["never-seen-content"]
    durations = [30000.0, 5000.0, 90000.0, 1000.0]

    def fold_in(path: str) -> list[str]:
        answer = tf.saved_model.load(path).signatures["fold_in"](
            contentIds=tf.constant(history), durations=tf.constant(durations, tf.float32)
        )
        return [c.decode() for c in answer["contentIds"].numpy()]

    full = export.export_saved_model(out, str(tmp_path / "full" / "1"), k=10)
    assert fold_in(full) == fold_in(os.path.join(out, "export"))
    assert fold_in(full) == model.recommend_for_history(history, durations, k=10).content_ids
    small = str(tmp_path / "small")
    task.run(
        ["--input_dir", preprocessed, "--output_dir", small, "--num_iters", "2"]
        + ["--eval_every", "0", "--no_progress", "--serving_model", "fold_in"]
    )
    exported = os.path.join(small, "export")
    assert sorted(os.listdir(os.path.join(exported, "assets"))) == ["vocab_items.txt"]
    small_model = model_lib.load(small)
    assert fold_in(exported) == (
        small_model.recommend_for_history(history, durations, k=10).content_ids
    )
