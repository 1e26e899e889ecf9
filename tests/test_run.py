"""Scheduled runs end to end: `python -m pipeline.run` on dated synthetic exports.

One root serves the whole module, as one deployment serves many nights: 08-01 and 08-02 are
published in turn, 08-03 is a deliberately worse run, 08-04 crashes in training and resumes,
08-05 is launched three times at once, 08-06 is SIGKILLed mid-run. Each date's export has 1000
sessions of the same 300 visitors, so a run takes some 10-20 s.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline import runstate, synthetic
from pipeline.scheduled import flags
from pipeline.scheduled import launch as run_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATES = [f"2017-08-0{day}" for day in range(1, 8)]
FLAGS = ["--latent_factors", "8", "--eval_ks", "20", "--loss_every", "0"]
WORSE = ["--latent_factors", "1", "--regularization", "1000"]


def _data(tmp: str) -> str:
    directory = os.path.join(tmp, "ga360")
    os.makedirs(directory, exist_ok=True)
    for date in DATES[:6]:
        synthetic.write_sessions(
            os.path.join(directory, f"ga_sessions_{date.replace('-', '')}.json.gz"),
            1000,
            seed=5,
            num_visitors=300,
            num_items=300,
            num_topics=8,
            date=date,
        )
    return os.path.join(directory, "ga_sessions_{date_nodash}.json.gz")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """(input pattern, root) with 08-01 then 08-02 run and published."""
    tmp = str(tmp_path_factory.mktemp("scheduled"))
    pattern, root = _data(tmp), os.path.join(tmp, "root")
    first = run_lib.main(["--date", DATES[0], "--input", pattern, "--root", root, *FLAGS])
    assert first == 0
    assert runstate.published(root) == f"runs/{DATES[0]}"
    second = run_lib.main(["--date", DATES[1], "--input", pattern, "--root", root, *FLAGS])
    assert second == 0
    return pattern, root


def _record(root: str, date: str) -> dict:
    with open(os.path.join(root, "runs", date, "run.json")) as handle:
        return json.load(handle)


def _launch(pattern: str, root: str, date: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.run", "--date", date, "--input", pattern]
        + ["--root", root, *FLAGS, *extra],
        cwd=REPO,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _no_partial_outputs(root: str, date: str) -> None:
    names = os.listdir(os.path.join(root, "runs", date))
    assert not [n for n in names if ".incomplete-" in n or ".tmp-" in n], names


def test_second_date_is_published_warm_started_with_every_stage_recorded(deployment):
    pattern, root = deployment
    assert runstate.published(root) == f"runs/{DATES[1]}"
    with open(os.path.join(root, "published")) as handle:
        assert handle.read() == f"runs/{DATES[1]}\n"
    record = _record(root, DATES[1])
    assert record["status"] == "published"
    assert set(record["stages"]) == set(flags.STAGES)
    for stage, entry in record["stages"].items():
        assert entry["status"] == "done", stage
        assert entry["seconds"] >= 0 and entry["finished"] >= entry["started"]
    counts = record["stages"]["preprocess"]["counts"]
    assert counts["lines_read"] == 1000 and counts["train_interactions"] > 0
    train = record["stages"]["train"]
    assert train["warm_start_from"] == f"{root}/runs/{DATES[0]}/train"
    assert train["num_iters"] == flags.WARM_NUM_ITERS
    assert train["metrics"]["wals"]["recall@20"] > train["metrics"]["popularity"]["recall@20"]
    gate = record["gate"]
    assert gate["decision"] == "pass" and gate["reasons"] == []
    assert gate["published_run"] == DATES[0]
    assert gate["published"]["users_evaluated"] == gate["candidate"]["users_evaluated"] > 0
    # Visitors of the eval split the published model never saw still count: fold-in.
    coverage = gate["published_coverage"]
    assert coverage["known_visitors"] < coverage["eval_visitors"]
    with open(os.path.join(root, "runs", DATES[1], "predictions.tsv")) as handle:
        lines = handle.read().split("\n")
    assert lines[0] == "visitorId\tcontentIds"
    assert len([line for line in lines[1:] if line]) == record["stages"]["predict"]["lines"]
    assert record["stages"]["predict"]["lines"] == counts["nusers"]
    serving = os.path.join(root, "runs", DATES[1], "serving", DATES[1].replace("-", ""))
    assert os.path.exists(os.path.join(serving, "saved_model.pb"))
    assert record["stages"]["publish"]["previous"] == DATES[0]
    # The first run had nothing to warm start from, nor to compare with.
    first = _record(root, DATES[0])
    assert first["stages"]["train"]["warm_start_from"] is None
    assert first["gate"]["published"] is None and first["status"] == "published"
    _no_partial_outputs(root, DATES[1])
    assert not os.path.exists(os.path.join(root, "runs", DATES[1], runstate.LOCK_FILE))


def test_the_export_stage_copies_the_train_stages_savedmodel_which_answers_as_a_streamed_one(
    deployment, tmp_path
):
    """The train stage already wrote train/export with the run's k and serving model: the export
    stage publishes a copy of it, the same files and the same answers as the model streamed
    again into a version directory (what the stage did before copying)."""
    import numpy as np
    import tensorflow as tf

    from trainer.serving import export, model, version_dir

    _, root = deployment
    run_dir = os.path.join(root, "runs", DATES[1])
    train = os.path.join(run_dir, "train")
    record = _record(root, DATES[1])
    assert record["stages"]["export"]["copied_from"] == f"{train}/export"
    served = record["stages"]["export"]["saved_model"]
    assert served == os.path.join(run_dir, "serving", DATES[1].replace("-", ""))
    streamed = export.export_saved_model(train, str(tmp_path / "1"), k=10)
    assert version_dir._files(served) == version_dir._files(streamed)
    trained = model.load(train)
    visitors = tf.constant([*trained.users[:50], "a visitor never seen"])
    history = {"contentIds": tf.constant(trained.items[:3]), "durations": tf.constant([9e3] * 3)}
    answers = []
    for path in (served, streamed):
        loaded = tf.saved_model.load(path)
        answers.append(
            [
                *loaded.signatures["serving_default"](visitorId=visitors).values(),
                *loaded.signatures["fold_in"](**history).values(),
            ]
        )
    for got, want in zip(*answers, strict=True):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_rerun_skips_completed_stages(deployment):
    pattern, root = deployment
    before = _record(root, DATES[1])
    assert run_lib.main(["--date", DATES[1], "--input", pattern, "--root", root, *FLAGS]) == 0
    after = _record(root, DATES[1])
    assert after["attempts"] == before["attempts"] + 1
    assert after["stages"] == before["stages"]  # nothing ran again
    assert runstate.published(root) == f"runs/{DATES[1]}"


def test_stages_run_alone_need_the_earlier_stages_and_a_passing_gate(deployment, capsys):
    pattern, root = deployment
    common = ["--input", pattern, "--root", root, *FLAGS]
    before = _record(root, DATES[1])
    assert run_lib.main(["--date", DATES[1], *common, "--stages", "gate"]) == 0
    assert _record(root, DATES[1])["stages"] == before["stages"]  # done: skipped
    # A stage redone invalidates the later ones: they run again, the gate's verdict included.
    assert run_lib.main(["--date", DATES[1], *common, "--stages", "train", "--force"]) == 0
    record = _record(root, DATES[1])
    assert record["status"] == "pending" and record["gate"] is None
    assert set(record["stages"]) == {"preprocess", "train"}
    assert record["stages"]["preprocess"] == before["stages"]["preprocess"]
    assert record["stages"]["train"]["started"] >= before["stages"]["publish"]["finished"]
    assert run_lib.main(["--date", DATES[1], *common]) == 0
    record = _record(root, DATES[1])
    assert record["stages"]["gate"]["started"] >= record["stages"]["train"]["finished"]
    assert record["status"] == "published" and set(record["stages"]) == set(flags.STAGES)
    assert runstate.published(root) == f"runs/{DATES[1]}"
    assert run_lib.main(["--date", DATES[6], *common, "--stages", "gate"]) == 2
    assert f"no input for {DATES[6]}" in capsys.readouterr().err
    # A stage run alone needs the stages before it; nothing is recorded when they are missing.
    assert run_lib.main(["--date", DATES[5], *common, "--stages", "train,gate"]) == 2
    err = capsys.readouterr().err
    assert f"the earlier stage preprocess of {DATES[5]} is not complete" in err
    assert runstate.read_run(root, DATES[5]) is None


def test_worse_run_is_rejected_and_the_previous_stays_published(deployment, capsys):
    pattern, root = deployment
    status = run_lib.main(["--date", DATES[2], "--input", pattern, "--root", root, *FLAGS, *WORSE])
    assert status == flags.EXIT_REJECTED
    assert runstate.published(root) == f"runs/{DATES[1]}"
    record = _record(root, DATES[2])
    assert record["status"] == "rejected"
    assert record["gate"]["decision"] == "reject"
    reasons = " ".join(record["gate"]["reasons"])
    assert "below the floor" in reasons and "below the published model's" in reasons
    assert record["error"].startswith("gate: ")
    # Rejected: never predicted, exported or published; the model stays for inspection.
    assert set(record["stages"]) == {"preprocess", "train", "gate"}
    run_dir = os.path.join(root, "runs", DATES[2])
    assert os.path.exists(os.path.join(run_dir, "train", "metrics.json"))
    assert not os.path.exists(os.path.join(run_dir, "predictions.tsv"))
    assert not os.path.exists(os.path.join(run_dir, "serving"))
    # A rerun does not retrain and is still rejected; --force redoes every stage.
    again = run_lib.main(["--date", DATES[2], "--input", pattern, "--root", root, *FLAGS, *WORSE])
    assert again == flags.EXIT_REJECTED
    assert _record(root, DATES[2])["stages"]["train"] == record["stages"]["train"]
    forced = run_lib.main(
        ["--date", DATES[2], "--input", pattern, "--root", root, *FLAGS, *WORSE, "--force"]
    )
    assert forced == flags.EXIT_REJECTED
    redone = _record(root, DATES[2])
    assert redone["attempts"] == 3 and redone["status"] == "rejected"
    for stage in ("preprocess", "train", "gate"):
        assert redone["stages"][stage]["started"] >= record["stages"][stage]["finished"]
        assert redone["stages"][stage] != record["stages"][stage]
    assert runstate.published(root) == f"runs/{DATES[1]}"
    # Stages after the gate, run alone (as the DAG does), refuse a rejected model...
    common = ["--date", DATES[2], "--input", pattern, "--root", root, *FLAGS, *WORSE]
    assert run_lib.main([*common, "--stages", "predict"]) == flags.EXIT_REJECTED
    assert not os.path.exists(os.path.join(run_dir, "predictions.tsv"))
    assert run_lib.main([*common, "--stages", "export,publish"]) == flags.EXIT_REJECTED
    assert runstate.published(root) == f"runs/{DATES[1]}"


def test_crash_in_training_keeps_the_published_run_and_the_rerun_resumes(deployment, caplog):
    pattern, root = deployment
    published = runstate.published(root)
    argv = ["--date", DATES[3], "--input", pattern, "--root", root, *FLAGS, "--distributed"]
    argv += ["--num_iters", "2", "--block_rows", "128"]
    with pytest.raises(Exception, match="test fault injected after half-sweep 2"):
        run_lib.run([*argv, "--test_fail_after_sweep", "2"])
    assert runstate.published(root) == published
    record = _record(root, DATES[3])
    assert record["status"] == "failed"
    assert record["stages"]["preprocess"]["status"] == "done"
    assert record["stages"]["train"]["status"] == "failed"
    assert "test fault injected" in record["error"] and record["error"].startswith("train: ")
    run_dir = os.path.join(root, "runs", DATES[3])
    assert not os.path.exists(os.path.join(run_dir, "train"))  # nothing that looks complete
    assert os.path.isdir(os.path.join(run_dir, "train.checkpoints"))
    _no_partial_outputs(root, DATES[3])
    preprocessed = record["stages"]["preprocess"]

    with caplog.at_level(logging.INFO):
        assert run_lib.main(argv) == 0
    assert "resuming from the checkpoint of iteration 1" in caplog.text
    record = _record(root, DATES[3])
    assert record["status"] == "published" and record["attempts"] == 2
    assert record["stages"]["preprocess"] == preprocessed  # not redone
    assert runstate.published(root) == f"runs/{DATES[3]}"
    assert not os.path.exists(os.path.join(run_dir, "train.checkpoints"))


def test_concurrent_launches_of_one_date_leave_one_complete_published_run(deployment, capsys):
    pattern, root = deployment
    date = DATES[4]
    lock = os.path.join(root, "runs", date, runstate.LOCK_FILE)
    # A window of three days against a one-day model: judge the gate loosely, it is not the point.
    window = ["--window_days", "3", "--gate_tolerance", "0.2"]
    first = _launch(pattern, root, date, *window)
    deadline = time.monotonic() + 120
    while not os.path.exists(lock) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert os.path.exists(lock), first.communicate()[1][-2000:]
    waiting = _launch(pattern, root, date, *window, "--lock_wait", "600")
    # A launch that does not wait exits at once with a clear message and status 75.
    impatient = run_lib.main(["--date", date, "--input", pattern, "--root", root, *FLAGS, *window])
    impatient_err = capsys.readouterr().err
    _, first_err = first.communicate(timeout=300)
    _, waiting_err = waiting.communicate(timeout=300)
    assert impatient == flags.EXIT_LOCKED, impatient_err[-2000:]
    assert f"the run of {date} is locked by another launch" in impatient_err
    assert f"pid {first.pid} on " in impatient_err
    assert first.returncode == 0, first_err[-3000:]
    assert waiting.returncode == 0, waiting_err[-3000:]
    # Exactly one launch did the work; the waiting one found every stage done.
    assert first_err.count(f"stage train of {date}: running") == 1
    assert f"stage train of {date}: running" not in waiting_err
    assert waiting_err.count("done before, skipped") == len(flags.STAGES)
    record = _record(root, date)
    assert record["status"] == "published" and record["attempts"] == 2
    assert len(record["input"]) == 3  # --window_days 3: 08-03, 08-04 and 08-05
    assert record["stages"]["preprocess"]["counts"]["lines_read"] == 3000
    assert runstate.published(root) == f"runs/{date}"
    assert not os.path.exists(lock)
    _no_partial_outputs(root, date)


def test_sigkilled_launch_leaves_no_complete_looking_run_and_its_lock_is_taken_over(deployment):
    pattern, root = deployment
    date = DATES[5]
    published = runstate.published(root)
    # Like 08-05, a window of three days; the gate is judged loosely, it is not the point.
    flags = ["--window_days", "3", "--gate_tolerance", "0.2"]
    process = _launch(pattern, root, date, *flags)
    deadline = time.monotonic() + 180
    record = None
    while time.monotonic() < deadline and process.poll() is None:
        record = runstate.read_run(root, date)
        if record and record["stages"].get("train", {}).get("status") == "running":
            break
        time.sleep(0.05)
    assert record and record["stages"]["train"]["status"] == "running", process.communicate()
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    record = _record(root, date)
    assert record["status"] == "running" and record["finished"] is None
    assert record["stages"]["train"]["status"] == "running"
    assert not os.path.exists(os.path.join(root, "runs", date, "train", "metrics.json"))
    assert runstate.published(root) == published
    with open(os.path.join(root, "runs", date, runstate.LOCK_FILE)) as handle:
        assert json.load(handle)["pid"] == process.pid  # the dead launch's lock is left
    assert run_lib.main(["--date", date, "--input", pattern, "--root", root, *FLAGS, *flags]) == 0
    record = _record(root, date)
    assert record["status"] == "published" and record["stages"]["train"]["status"] == "done"
    assert runstate.published(root) == f"runs/{date}"
    _no_partial_outputs(root, date)


def test_a_date_without_input_fails_clearly_and_publishes_nothing(deployment, capsys):
    pattern, root = deployment
    published = runstate.published(root)
    status = run_lib.main(["--date", DATES[6], "--input", pattern, "--root", root, *FLAGS])
    assert status == 2
    assert f"no input for {DATES[6]}" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(root, "runs", DATES[6]))
    assert runstate.published(root) == published


def test_warm_start_reaches_the_cold_recall_in_fewer_iterations(deployment, tmp_path):
    """Cold: the trainer's default iterations from the seeded start. Warm: from the model
    published the day before. Iterations needed = the first whose Recall@20 is within 1% of
    the cold run's final Recall@20."""
    from trainer import task

    _, root = deployment
    day_before = f"{root}/runs/{DATES[0]}/train"
    common = ["--input_dir", f"{root}/runs/{DATES[1]}/preprocessed", "--no_progress"]
    common += [*FLAGS, "--eval_every", "1"]
    cold = task.run([*common, "--output_dir", str(tmp_path / "cold")])
    warm = task.run(
        [*common, "--output_dir", str(tmp_path / "warm"), "--warm_start_from", day_before]
    )
    target = 0.99 * cold["wals"]["recall@20"]

    def needed(result: dict) -> int:
        curve = [entry["eval/recall@20"] for entry in result["history"]]
        return next(i + 1 for i, recall in enumerate(curve) if recall >= target)

    assert cold["config"]["num_iters"] == 15  # the trainer's default
    assert needed(warm) < needed(cold)
    assert needed(warm) <= flags.WARM_NUM_ITERS
    assert warm["history"][0]["eval/recall@20"] > cold["history"][0]["eval/recall@20"]


def test_a_full_disk_in_a_stage_leaves_no_run_that_looks_complete(
    deployment, tmp_path, monkeypatch
):
    """The disk fills up while the SavedModel is being written: the run is recorded as failed,
    nothing under the run looks finished, nothing is published; with space again, the rerun
    redoes only that stage onwards and publishes."""
    import errno

    import tensorflow as tf

    from trainer.serving import export_copy

    pattern, _ = deployment
    root = str(tmp_path / "root")
    argv = ["--date", DATES[0], "--input", pattern, "--root", root, *FLAGS]
    real_save = tf.saved_model.save

    def save_until_the_disk_is_full(module, export_dir, **kwargs):
        if f"{os.sep}serving{os.sep}" not in export_dir:  # TF Transform saves models too
            return real_save(module, export_dir, **kwargs)
        os.makedirs(export_dir, exist_ok=True)
        with open(os.path.join(export_dir, "saved_model.pb"), "wb") as handle:
            handle.write(b"\0" * 1024)  # a partial file, as a full disk leaves one
        raise OSError(errno.ENOSPC, "No space left on device", export_dir)

    def copy_until_the_disk_is_full(source, target):
        if f"{os.sep}serving{os.sep}" not in target:
            return real_copy(source, target)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as handle:
            handle.write(b"\0" * 1024)  # a partial copy
        raise OSError(errno.ENOSPC, "No space left on device", target)

    # The export stage copies the train stage's SavedModel (export_copy) or streams the model
    # (tf.saved_model.save, then the tables): the disk fills up whichever it does.
    real_copy = export_copy._copy_file
    monkeypatch.setattr(tf.saved_model, "save", save_until_the_disk_is_full)
    monkeypatch.setattr(export_copy, "_copy_file", copy_until_the_disk_is_full)
    assert run_lib.main(argv) == 1
    record = _record(root, DATES[0])
    assert record["status"] == "failed"
    assert record["stages"]["export"]["status"] == "failed"
    assert "No space left on device" in record["error"]
    assert runstate.published(root) is None
    run_dir = os.path.join(root, "runs", DATES[0])
    serving = os.path.join(run_dir, "serving")
    assert not os.path.isdir(serving) or os.listdir(serving) == []  # no partial SavedModel
    _no_partial_outputs(root, DATES[0])
    done_before = {name: stage for name, stage in record["stages"].items() if name != "export"}

    monkeypatch.setattr(tf.saved_model, "save", real_save)
    monkeypatch.setattr(export_copy, "_copy_file", real_copy)
    assert run_lib.main(argv) == 0
    record = _record(root, DATES[0])
    assert record["status"] == "published" and record["stages"]["export"]["status"] == "done"
    assert record["stages"]["export"]["copied_from"] == f"{run_dir}/train/export"
    for name in ("preprocess", "train", "gate", "predict"):
        assert record["stages"][name] == done_before[name]  # not redone
    assert runstate.published(root) == f"runs/{DATES[0]}"
