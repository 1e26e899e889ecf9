"""The distributed trainer (`trainer.task --distributed`, `trainer.beam`) against the local
one, on DirectRunner: in-memory and multi_processing with 2 and 3 workers, several block sizes,
both factor exchanges; and its checkpoints: a crash, a resume, a corrupt or foreign checkpoint.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re

import numpy as np
import pytest
from apache_beam.io.filesystems import FileSystems

from common import cli
from pipeline import preprocess, synthetic
from trainer import task
from trainer.beam import (
    block_problems,
    checkpoint_files,
    checkpoints,
    model_blocks,
    model_parts,
    sweep,
)
from trainer.core import solver as core_solver
from trainer.core.sparse import CsrMatrix
from trainer.local import dataset as data
from trainer.serving import model as model_lib

ITERS = 4
HYPER = ["--num_iters", str(ITERS), "--latent_factors", "8", "--no_progress", "--loss_every", "1"]


def workers(n: int) -> list[str]:
    """DirectRunner flags for n worker processes (the portable harness of Dataflow and Flink)."""
    return ["--direct_running_mode", "multi_processing", "--direct_num_workers", str(n)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("beam_wals")
    sample = str(root / "sessions.json.gz")
    synthetic.write_sessions(sample, num_sessions=1200, seed=5)
    out = str(root / "preprocessed")
    preprocess.run(["--input", sample, "--output_dir", out, "--holdout_visitors", "0.1"])
    return out


@pytest.fixture(scope="module")
def local(dataset, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("local") / "model")
    task.run(["--input_dir", dataset, "--output_dir", out, *HYPER])
    return out


def factors(model_dir: str) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.load(os.path.join(model_dir, "model", "user_factors.npy")),
        np.load(os.path.join(model_dir, "model", "item_factors.npy")),
    )


def history(model_dir: str) -> list[dict]:
    with open(os.path.join(model_dir, task.METRICS_FILE)) as handle:
        return json.load(handle)["history"]


def assert_same_model(a: str, b: str, rtol: float = 1e-4) -> None:
    for left, right in zip(factors(a), factors(b)):
        # Relative to the table's scale: float32 solves in other tile layouts differ in round-off.
        np.testing.assert_allclose(left, right, rtol=0, atol=rtol * np.abs(left).max())
    losses_a = [h["loss/total"] for h in history(a)]
    losses_b = [h["loss/total"] for h in history(b)]
    assert len(losses_a) == len(losses_b) == ITERS
    np.testing.assert_allclose(losses_b, losses_a, rtol=rtol)


def assert_same_model_files(local: str, distributed: str) -> None:
    """The Beam workers' model/ holds the files `model.save` writes: all but the factors the
    local run's bytes (same data and flags), the factors the bytes numpy.save writes of them."""
    names = sorted(os.listdir(os.path.join(local, "model")))
    assert sorted(os.listdir(os.path.join(distributed, "model"))) == names
    for name in names:
        with open(os.path.join(local, "model", name), "rb") as handle:
            expected = handle.read()
        with open(os.path.join(distributed, "model", name), "rb") as handle:
            written = handle.read()
        if name in ("user_factors.npy", "item_factors.npy"):
            array = np.load(io.BytesIO(written))
            assert array.shape == np.load(io.BytesIO(expected)).shape
            buffer = io.BytesIO()
            np.save(buffer, array)
            assert written == buffer.getvalue(), name
        else:
            assert written == expected, name


@pytest.mark.parametrize(
    "n_workers, block_rows, exchange",
    [
        (1, 64, "broadcast"),
        (2, 100, "join"),
        (3, 37, "broadcast"),
        (2, 5000, "join"),  # one block per side
    ],
)
def test_distributed_training_equals_local_training(
    dataset, local, tmp_path, monkeypatch, n_workers, block_rows, exchange
):
    # The model's arrays are regrouped and streamed in parts of about 1 KB (32 factor rows).
    monkeypatch.setattr(model_parts, "PART_BYTES", 1024)
    out = str(tmp_path / "model")
    task.run(
        [
            "--input_dir", dataset, "--output_dir", out, *HYPER, "--distributed",
            "--block_rows", str(block_rows), "--factor_exchange", exchange, *workers(n_workers),
        ]
    )  # fmt: skip
    assert_same_model(local, out)
    assert_same_model_files(local, out)
    # The loss never increases, and the published run leaves no checkpoints behind.
    totals = [h["loss/total"] for h in history(out)]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(totals, totals[1:]))
    assert not os.path.exists(checkpoints.checkpoint_dir_for(out))
    with open(os.path.join(out, task.METRICS_FILE)) as handle:
        metrics = json.load(handle)
    with open(os.path.join(local, task.METRICS_FILE)) as handle:
        expected = json.load(handle)
    assert metrics["wals"]["recall@20"] == pytest.approx(expected["wals"]["recall@20"], abs=0.01)
    # The sizes come from summary.json, the local run's from the matrices it loaded.
    for size in ("nusers", "nitems", "train_interactions", "eval_interactions"):
        assert metrics[size] == expected[size], size
    # Both trainers time every iteration after the first (the Beam one by its checkpoints).
    for timed in (metrics, expected):
        steps = timed["iteration_seconds"]
        assert [step["iteration"] for step in steps] == list(range(2, ITERS + 1))
        assert all(step["seconds"] > 0 for step in steps)
    # New visitors (held out whole, folded in by a Beam step here) score like the local run's.
    assert metrics["new_visitors"]["visitors"] == expected["new_visitors"]["visitors"] > 0
    for model in ("wals", "popularity"):
        for name in ("recall@20", "ndcg@20"):
            assert metrics["new_visitors"][model][name] == pytest.approx(
                expected["new_visitors"][model][name], abs=0.01
            )


def test_workers_without_cached_problems_rebuild_them_from_the_stashed_ratings(
    dataset, local, tmp_path, monkeypatch
):
    # A cache of one entry evicts every block's problem before its next sweep, as a worker that
    # restarts between sweeps would: each solve then rereads the block's rows file.
    monkeypatch.setattr(block_problems, "PLAN_CACHE_SLOTS", 0)
    block_problems._PLAN_CACHE.clear()
    reads = []
    read_ratings = checkpoint_files.read_ratings
    monkeypatch.setattr(
        checkpoint_files,
        "read_ratings",
        lambda *args: reads.append(args[1:]) or read_ratings(*args),
    )
    out = str(tmp_path / "model")
    task.run(
        [
            "--input_dir", dataset, "--output_dir", out, *HYPER, "--distributed",
            "--block_rows", "128", "--factor_exchange", "join",
        ]
    )  # fmt: skip
    assert_same_model(local, out)
    # Every half-sweep rebuilt its blocks: at least one read per block and solve.
    with open(os.path.join(dataset, "summary.json")) as handle:
        summary = json.load(handle)
    n_blocks = sum(-(-summary[n] // 128) for n in ("nusers", "nitems"))
    assert len(reads) >= ITERS * n_blocks


@pytest.mark.parametrize("exchange", ["broadcast", "join"])
def test_workers_compile_every_tile_shape_they_solve_before_the_first_solve(
    dataset, tmp_path, monkeypatch, exchange
):
    """The kernel shapes `StashRatings` collects per side cover every tile that any block's solve
    runs, against the fixed table length it runs with: a worker that warmed up compiles nothing
    when it meets a new block."""
    sweep._WARMED.clear()
    block_problems._PLAN_CACHE.clear()
    warmed, solved = {}, []
    warm_up, solve_planned = sweep._warm_up, core_solver.solve_planned

    def record_warm_up(spec, side, kernels):
        warmed.setdefault(side, kernels)
        return warm_up(spec, side, kernels)

    def record_solve(plan, fixed, gramian, solver, *args, **kwargs):
        if solver == "cg":  # the training sweeps (new visitors are folded in exactly)
            solved.append((plan, int(np.shape(fixed)[0])))
        return solve_planned(plan, fixed, gramian, solver, *args, **kwargs)

    monkeypatch.setattr(sweep, "_warm_up", record_warm_up)
    # Every solver of the interface (`trainer.core.solver`) solves through the kernels' engine.
    monkeypatch.setattr(core_solver, "solve_planned", record_solve)
    task.run(
        [
            "--input_dir", dataset, "--output_dir", str(tmp_path / "model"), *HYPER,
            "--solver", "cg", "--distributed", "--block_rows", "50",
            "--factor_exchange", exchange,
        ]
    )  # fmt: skip
    assert set(warmed) == {0, 1} and solved
    for plan, n_other in solved:
        assert {(n_other, *shape) for shape in plan.kernel_shapes} <= warmed[0] | warmed[1]
    # Different blocks have different shapes (else there would be nothing to warm up).
    assert len({plan.kernel_shapes for plan, _ in solved}) > 1


def test_block_ratings_files_round_trip_and_a_corrupt_one_is_named(tmp_path):
    rows = CsrMatrix.from_triples(
        np.array([0, 0, 2]), np.array([5, 1, 3]), np.array([0.5, 1.0, 2.0]), (3, 7)
    )
    directory = str(tmp_path / "ckpt")
    checkpoint_files.write_ratings(directory, 1, 4, rows)
    back = checkpoint_files.read_ratings(directory, 1, 4)
    np.testing.assert_array_equal(back.to_dense(), rows.to_dense())
    assert back.shape == (3, 7)
    path = tmp_path / "ckpt" / "rows" / "items" / "block-00004.npz"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(checkpoints.CheckpointError, match="block-00004.npz"):
        checkpoint_files.read_ratings(directory, 1, 4)


def test_join_requests_files_round_trip_and_a_corrupt_one_is_named(tmp_path):
    directory = str(tmp_path / "ckpt")
    requests = [(3, np.array([7, 9])), (0, np.array([], np.int64)), (1, np.array([2]))]
    entry = checkpoint_files.write_requests(directory, 0, 2, requests)
    back = checkpoint_files.read_requests(directory, 0, 2, entry)
    assert [block for block, _ in back] == [0, 1, 3]  # by solving block
    for (block, rows), (expected_block, expected) in zip(
        back, sorted(requests, key=lambda r: r[0])
    ):
        assert block == expected_block
        np.testing.assert_array_equal(rows, expected)
    path = tmp_path / "ckpt" / "requests" / "users" / "block-00002.npz"
    path.write_bytes(path.read_bytes()[:-1] + b"x")
    with pytest.raises(checkpoints.CheckpointError, match="block-00002.npz"):
        checkpoint_files.read_requests(directory, 0, 2, entry)


def test_join_equals_broadcast_with_cg(dataset, tmp_path):
    runs = {}
    for exchange in ("broadcast", "join"):
        runs[exchange] = str(tmp_path / exchange)
        task.run(
            [
                "--input_dir", dataset, "--output_dir", runs[exchange], *HYPER, "--solver", "cg",
                "--distributed", "--block_rows", "50", "--factor_exchange", exchange, *workers(2),
            ]
        )  # fmt: skip
    assert_same_model(runs["broadcast"], runs["join"], rtol=1e-5)


def test_a_crashed_run_resumes_from_its_checkpoint(dataset, local, tmp_path, caplog):
    out = str(tmp_path / "model")
    argv = ["--input_dir", dataset, "--output_dir", out, *HYPER, "--distributed"]
    argv += ["--block_rows", "80", *workers(2)]
    with pytest.raises(Exception, match="test fault injected after half-sweep 3"):
        task.run([*argv, "--test_fail_after_sweep", "3"])
    assert not os.path.exists(out)
    checkpoint_dir = checkpoints.checkpoint_dir_for(out)
    assert os.path.exists(os.path.join(checkpoint_dir, "iter-0002", "users", checkpoints.MARKER))
    caplog.set_level("INFO")
    task.run(argv)
    resumed = [r.getMessage() for r in caplog.records if "resuming from" in r.getMessage()]
    assert resumed and "iteration" in resumed[0]
    assert_same_model(local, out)
    assert not os.path.exists(checkpoint_dir)


def test_a_run_that_crashed_after_its_last_half_sweep_only_writes_the_model(
    dataset, local, tmp_path, caplog
):
    """Every iteration is checkpointed, the model is not written: the relaunch runs a pipeline
    that writes it from the final markers' factor files, and trains nothing."""
    out = str(tmp_path / "model")
    argv = ["--input_dir", dataset, "--output_dir", out, *HYPER, "--distributed"]
    argv += ["--block_rows", "80"]
    with pytest.raises(Exception, match=f"test fault injected after half-sweep {2 * ITERS}"):
        task.run([*argv, "--test_fail_after_sweep", str(2 * ITERS)])
    assert not os.path.exists(out)
    caplog.set_level("INFO")
    task.run(argv)
    assert f"writing the model of the checkpoint's iteration {ITERS}" in caplog.text
    assert not re.search(r"training \d+ x \d+ in blocks", caplog.text)
    for left, right in zip(factors(local), factors(out)):
        np.testing.assert_allclose(left, right, rtol=0, atol=1e-4 * np.abs(left).max())
    assert_same_model_files(local, out)


def crash(dataset: str, out: str, *extra: str) -> str:
    argv = ["--input_dir", dataset, "--output_dir", out, *HYPER, "--distributed"]
    with pytest.raises(Exception, match="test fault injected"):
        task.run([*argv, "--block_rows", "100", *extra, "--test_fail_after_sweep", "4"])
    return checkpoints.checkpoint_dir_for(out)


def test_a_truncated_or_corrupt_checkpoint_is_named(dataset, tmp_path):
    out = str(tmp_path / "model")
    checkpoint_dir = crash(dataset, out)
    argv = ["--input_dir", dataset, "--output_dir", out, *HYPER, "--distributed"]
    argv += ["--block_rows", "100"]
    block = sorted(glob.glob(os.path.join(checkpoint_dir, "iter-0002", "items", "block-*.npz")))[0]
    with open(block, "rb") as handle:
        data = handle.read()
    # Same size, other bytes: the workers' SHA-256 check names the file.
    with open(block, "wb") as handle:
        handle.write(data[:-8] + bytes(8))
    with pytest.raises(Exception, match=f"corrupt checkpoint file .*{os.path.basename(block)}"):
        task.run(argv)
    # Truncated: the launcher names it before starting.
    with open(block, "wb") as handle:
        handle.write(data[:100])
    with pytest.raises(
        cli.UsageError, match=f"corrupt checkpoint file .*{os.path.basename(block)}"
    ):
        task.run(argv)
    assert not os.path.exists(out)


def test_a_checkpoint_of_other_hyperparameters_is_refused(dataset, tmp_path):
    out = str(tmp_path / "model")
    checkpoint_dir = crash(dataset, out, "--regularization", "0.05")
    argv = ["--input_dir", dataset, "--output_dir", out, *HYPER, "--distributed"]
    with pytest.raises(cli.UsageError, match="differs in: .*regularization"):
        task.run([*argv, "--block_rows", "100", "--regularization", "0.1"])
    with pytest.raises(cli.UsageError, match="differs in: block_rows"):
        task.run([*argv, "--block_rows", "64", "--regularization", "0.05"])
    assert os.path.exists(os.path.join(checkpoint_dir, checkpoints.RUN_FILE))


def test_a_foreign_checkpoint_directory_is_left_alone(dataset, tmp_path):
    out = str(tmp_path / "model")
    foreign = checkpoints.checkpoint_dir_for(out)
    os.makedirs(foreign)
    with open(os.path.join(foreign, "notes.txt"), "w") as handle:
        handle.write("keep")
    with pytest.raises(cli.UsageError, match="not a checkpoint of this project"):
        task.run(["--input_dir", dataset, "--output_dir", out, *HYPER, "--distributed"])
    assert os.listdir(foreign) == ["notes.txt"]


def test_beam_flags_need_distributed_and_must_exist(dataset, tmp_path):
    out = str(tmp_path / "model")
    base = ["--input_dir", dataset, "--output_dir", out, *HYPER]
    with pytest.raises(cli.UsageError, match="--direct_num_workers"):
        task.run([*base, "--direct_num_workers", "2"])
    with pytest.raises(cli.UsageError, match="--no_such_flag"):
        task.run([*base, "--distributed", "--no_such_flag", "1"])
    with pytest.raises(cli.UsageError, match="block_rows"):
        task.run([*base, "--distributed", "--block_rows", "0"])


def test_warm_start_matches_rows_by_id_locally_and_distributed(dataset, local, tmp_path):
    """Both trainers start from the earlier model's factors for the IDs it knows; one
    iteration from there gives the same factors on both, and fits better than a cold one."""
    one = ["--num_iters", "1", "--latent_factors", "8", "--no_progress"]
    warm = ["--warm_start_from", local]
    runs = {}
    for name, extra in (("local", []), ("distributed", ["--distributed", "--block_rows", "90"])):
        runs[name] = str(tmp_path / name)
        result = task.run(["--input_dir", dataset, "--output_dir", runs[name], *one, *warm, *extra])
        assert result["warm_start"]["matched_users"] == len(
            np.load(os.path.join(local, "model", "user_factors.npy"))
        )
    for left, right in zip(factors(runs["local"]), factors(runs["distributed"])):
        np.testing.assert_allclose(left, right, rtol=0, atol=1e-4 * np.abs(left).max())
    cold = str(tmp_path / "cold")
    task.run(["--input_dir", dataset, "--output_dir", cold, *one])
    assert history(runs["local"])[-1]["loss/total"] < history(cold)[-1]["loss/total"]
    with pytest.raises(cli.UsageError, match="k=8 latent factors, this run 4"):
        task.run(
            [
                "--input_dir",
                dataset,
                "--output_dir",
                str(tmp_path / "x"),
                *warm,
                "--latent_factors",
                "4",
            ]
        )


def test_zero_iterations_publish_the_seeded_or_warm_start_factors(dataset, local, tmp_path):
    """With --num_iters 0 the model is the initial factors, computed by the workers: bit for bit
    the local trainer's, seeded by each row's ID or, with a warm start, the earlier model's."""
    zero = ["--num_iters", "0", "--latent_factors", "8", "--no_progress"]
    for warm in ([], ["--warm_start_from", local]):
        runs = {}
        for name, extra in (
            ("local", []),
            ("distributed", ["--distributed", "--block_rows", "70"]),
        ):
            runs[name] = str(tmp_path / f"{name}{len(warm)}")
            result = task.run(
                ["--input_dir", dataset, "--output_dir", runs[name], *zero, *warm, *extra]
            )
            assert result.get("warm_start", {}).get("matched_items") == (
                len(np.load(os.path.join(local, "model", "item_factors.npy"))) if warm else None
            )
        for left, right in zip(factors(runs["local"]), factors(runs["distributed"])):
            np.testing.assert_array_equal(left, right)
        assert_same_model_files(runs["local"], runs["distributed"])


def test_the_launcher_reads_no_cells_vocabularies_or_factors(dataset, tmp_path, monkeypatch):
    """With worker processes (multi_processing), whatever this process opens is the
    launcher's: summary.json, config.json, markers, losses and .npy headers, never a TFRecord,
    a vocabulary, a factor block or a model array's rows."""
    opened = []
    open_file = FileSystems.open

    def record(path, *args, **kwargs):
        opened.append(path)
        return open_file(path, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("the launcher read the data")

    monkeypatch.setattr(FileSystems, "open", staticmethod(record))
    for module, name in (
        (data, "load_dataset"),
        (data, "read_sparse"),
        (data, "read_vocabulary"),
        (model_lib, "load"),
        (model_lib, "save"),
        (model_blocks, "read_npy_rows"),
        (np, "load"),
    ):
        monkeypatch.setattr(module, name, refuse)
    out = str(tmp_path / "model")
    task.run(
        [
            "--input_dir", dataset, "--output_dir", out, *HYPER, "--distributed",
            "--block_rows", "100", *workers(2),
        ]
    )  # fmt: skip
    monkeypatch.undo()
    assert os.path.exists(os.path.join(out, "export", "saved_model.pb"))
    read = {os.path.basename(path) for path in opened}
    assert "summary.json" in read and "config.json" in read
    data_files = [
        name
        for name in read
        if name.endswith((".tfrecord.gz", ".npz", ".bin", ".txt")) or "vocab" in name
    ]
    assert not data_files
