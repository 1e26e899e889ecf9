"""Thread budgets of worker processes (`common.worker_threads`): the default rule, the variables
of local multi-process runs, and `apply_in_worker` in the setup of DoFns, checked in fresh
processes (a process's pools are set once; this one's TensorFlow runtime has started)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from common import cli, worker_threads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPUS = worker_threads.available_cpus()


def options(*flags: str) -> PipelineOptions:
    return PipelineOptions(list(flags))


@pytest.mark.parametrize(
    "flags, processes",
    [
        ((), 0),  # DirectRunner in memory by default
        (("--direct_running_mode", "in_memory", "--direct_num_workers", "4"), 0),
        (("--direct_running_mode", "multi_threading", "--direct_num_workers", "4"), 0),
        (("--direct_running_mode", "multi_processing", "--direct_num_workers", "2"), 2),
        (("--direct_running_mode", "multi_processing", "--direct_num_workers", "3"), 3),
        (("--runner", "DataflowRunner", "--direct_running_mode", "multi_processing"), 0),
    ],
)
def test_only_local_multi_process_runs_get_a_budget(flags, processes):
    assert worker_threads.local_processes(options(*flags)) == processes
    expected = None if processes == 0 else max(1, 8 // processes)
    assert worker_threads.budget(options(*flags), cores=8) == expected


def test_the_budget_splits_the_cores_and_never_drops_below_one():
    two = options("--direct_running_mode", "multi_processing", "--direct_num_workers", "2")
    assert worker_threads.budget(two, cores=2) == 1
    assert worker_threads.budget(two, cores=16) == 8
    five = options("--direct_running_mode", "multi_processing", "--direct_num_workers", "5")
    assert worker_threads.budget(five, cores=2) == 1


def test_the_variables_are_set_for_the_run_then_restored_and_user_values_kept(monkeypatch):
    for name in worker_threads.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    run = options("--direct_running_mode", "multi_processing", "--direct_num_workers", "2")
    expected = str(worker_threads.budget(run))
    with worker_threads.local_budget(run):
        assert os.environ["OMP_NUM_THREADS"] == "7"
        for name in worker_threads.THREAD_VARIABLES[1:]:
            assert os.environ[name] == expected
    assert os.environ["OMP_NUM_THREADS"] == "7"
    for name in worker_threads.THREAD_VARIABLES[1:]:
        assert name not in os.environ
    with worker_threads.local_budget(options()) as threads:
        assert threads is None
        assert "OPENBLAS_NUM_THREADS" not in os.environ


def test_worker_processes_inherit_the_budget(monkeypatch):
    """The variables reach the processes DirectRunner starts, not just the launcher."""
    for name in worker_threads.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    run = options("--direct_running_mode", "multi_processing", "--direct_num_workers", "2")
    expected = str(worker_threads.budget(run))
    launcher = os.getpid()
    with worker_threads.local_budget(run), beam.Pipeline(options=run) as pipeline:
        seen = (
            pipeline
            | beam.Create(range(4))
            # A lambda, pickled by value: the workers cannot import this test module.
            | beam.Map(lambda _: (os.environ.get("OPENBLAS_NUM_THREADS"), os.getpid()))
            | beam.Filter(lambda seen: seen[1] != launcher)  # ran in a worker process
            | beam.Map(lambda seen: seen[0])
            | beam.Distinct()
        )
        assert_that(seen, equal_to([expected]))


@pytest.mark.parametrize(
    "flags, processes, threads",
    [
        ((), None, None),  # in-process DirectRunner: the launcher's pools stay as they are
        (("--direct_running_mode", "multi_threading", "--direct_num_workers", "4"), None, None),
        (("--direct_running_mode", "multi_processing", "--direct_num_workers", "3"), 3, 2),
        (("--runner", "DataflowRunner"), 8, 1),  # one SDK process per vCPU
        (("--runner", "dataflow", "--experiments", "no_use_multiple_sdk_containers"), 1, 8),
        (("--runner", "FlinkRunner"), 1, 8),  # --sdk_worker_parallelism defaults to 1
        (("--runner", "PortableRunner", "--sdk_worker_parallelism", "4"), 4, 2),
        (("--runner", "SparkRunner", "--sdk_worker_parallelism", "0"), 1, 8),
        (("--runner", "PortableRunner", "--sdk_worker_parallelism", "16"), 16, 1),  # never 0
        (("--worker_threads", "3"), None, 3),  # an explicit budget applies anywhere
        (("--runner", "DataflowRunner", "--worker_threads", "6"), 8, 6),
    ],
)
def test_default_budget_is_the_workers_cpus_over_its_sdk_processes(flags, processes, threads):
    assert worker_threads.sdk_processes(options(*flags), cpus=8) == processes
    assert worker_threads.worker_budget(options(*flags), cpus=8) == threads


def test_local_runs_take_an_explicit_budget_too():
    run = options("--direct_running_mode", "multi_processing", "--direct_num_workers", "2")
    assert worker_threads.budget(run, cores=8) == 4
    in_process = options("--worker_threads", "3")
    assert worker_threads.budget(in_process, cores=8) is None  # no local worker processes
    flagged = options(
        "--direct_running_mode", "multi_processing", "--direct_num_workers", "2",
        "--worker_threads", "3",
    )  # fmt: skip
    assert worker_threads.budget(flagged, cores=8) == 3


def test_a_negative_budget_is_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit) as refused:
        cli.parse_options(["--worker_threads", "-1"], worker_threads.WorkerThreadsOptions)
    assert refused.value.code == 2
    assert "--worker_threads: must be >= 0, got -1" in capsys.readouterr().err


# A pipeline in a fresh interpreter: a DoFn whose setup applies the budget, as the trainer's do,
# reports from the process it ran in what BLAS and TensorFlow were given (one file per process).
REPORT = """
    import json, os, sys
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    class Report(beam.DoFn):
        def __init__(self, out):
            self.out = out  # sys.argv differs in a worker process

        def setup(self):
            from common import worker_threads
            self.applied = worker_threads.apply_in_worker()

        def process(self, element):
            import tensorflow as tf
            import threadpoolctl
            pools = threadpoolctl.threadpool_info()
            report = {
                "applied": self.applied,
                "blas": sorted({p["num_threads"] for p in pools if p["user_api"] == "blas"}),
                "intra": tf.config.threading.get_intra_op_parallelism_threads(),
                "inter": tf.config.threading.get_inter_op_parallelism_threads(),
                "env": os.environ.get("OPENBLAS_NUM_THREADS"),
            }
            with open(os.path.join(self.out, str(os.getpid())), "w") as handle:
                json.dump(report, handle)
            yield element

    with beam.Pipeline(options=PipelineOptions(sys.argv[2:])) as pipeline:
        _ = pipeline | beam.Create(range(8)) | beam.Reshuffle() | beam.ParDo(Report(sys.argv[1]))
"""


def _reports(tmp_path, *flags: str) -> dict[int, dict]:
    """{pid: report} of every process that ran the Report DoFn under `flags`."""
    out = tmp_path / "reports"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in worker_threads.THREAD_VARIABLES}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(REPORT), str(out), *flags],
        cwd=REPO,
        env={**env, "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {int(p.name): json.loads(p.read_text()) for p in out.iterdir()}


def test_setup_gives_blas_and_tensorflow_the_explicit_budget(tmp_path):
    threads = CPUS + 1  # unlike any default of this machine
    [report] = _reports(tmp_path, "--worker_threads", str(threads)).values()
    assert report == {
        "applied": threads,
        "blas": [threads],
        "intra": threads,
        "inter": threads,
        "env": None,
    }


def test_setup_leaves_an_in_process_runs_pools_alone(tmp_path):
    [report] = _reports(tmp_path).values()
    assert report == {"applied": None, "blas": [CPUS], "intra": 0, "inter": 0, "env": None}


def test_setup_gives_each_local_worker_process_its_share(tmp_path):
    """Two worker processes of a multi-process DirectRunner, not started under `local_budget`
    (no variables): their setups give each max(1, cpus // 2) threads."""
    reports = _reports(
        tmp_path, "--direct_running_mode", "multi_processing", "--direct_num_workers", "2"
    )
    share = max(1, CPUS // 2)
    assert 1 <= len(reports) <= 2 and os.getpid() not in reports
    for report in reports.values():
        assert report == {
            "applied": share,
            "blas": [share],
            "intra": share,
            "inter": share,
            "env": None,
        }


def test_a_started_tensorflow_runtime_keeps_its_pools_and_blas_still_gets_the_budget():
    code = """
        import json, logging
        import numpy as np
        import tensorflow as tf
        import threadpoolctl
        from apache_beam.options.pipeline_options import PipelineOptions
        from common import worker_threads

        logging.basicConfig(level=logging.DEBUG, format="%(name)s: %(message)s")
        tf.constant(1.0) + 1  # TensorFlow's runtime starts
        budget = PipelineOptions(["--worker_threads", "3"])
        first = worker_threads.apply_in_worker(budget)
        again = worker_threads.apply_in_worker(PipelineOptions(["--worker_threads", "5"]))
        print(json.dumps({
            "first": first,
            "again": again,
            "blas": [p["num_threads"] for p in threadpoolctl.threadpool_info()
                     if p["user_api"] == "blas"],
            "intra": tf.config.threading.get_intra_op_parallelism_threads(),
        }))
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"first": 3, "again": 3, "blas": [3], "intra": 0}  # once per process
    assert "TensorFlow's thread pools stay as they are" in result.stderr
    assert "cannot be modified after initialization" in result.stderr


def test_distributed_training_takes_the_flag_and_gives_the_same_model(tiny_preprocessed, tmp_path):
    """`trainer.task --distributed --worker_threads 1` on an in-process DirectRunner, in a fresh
    process (the budget is set once per process): the DoFns apply it, and the model equals the
    run without the flag."""
    from trainer import task

    hyper = ["--num_iters", "2", "--latent_factors", "4", "--no_progress", "--distributed"]
    plain, flagged = str(tmp_path / "plain"), str(tmp_path / "flagged")
    task.run(["--input_dir", tiny_preprocessed, "--output_dir", plain, *hyper])
    result = subprocess.run(
        [sys.executable, "-m", "trainer.task", "--input_dir", tiny_preprocessed]
        + ["--output_dir", flagged, *hyper, "--worker_threads", "1"],
        cwd=REPO,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 thread(s) for BLAS" in result.stderr
    for name in ("user_factors.npy", "item_factors.npy"):
        a, b = (np.load(os.path.join(d, "model", name)) for d in (plain, flagged))
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())
