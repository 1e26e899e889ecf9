"""Thread budgets of local worker processes (`common.worker_threads`)."""

from __future__ import annotations

import os

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from common import worker_threads


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
