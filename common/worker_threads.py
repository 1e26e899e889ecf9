"""Thread budgets of Beam worker processes: how many threads TensorFlow's and BLAS's pools get.

Each SDK worker process loads TensorFlow and NumPy's OpenBLAS, and each library sizes its thread
pool to every core it sees, so P processes on a machine run P x cores busy threads on `cores`
cores. OpenBLAS is the worst case: after a call its threads keep spinning for a while, holding
cores that the other processes wait for. On the 2-core benchmark machine with 2 local workers, a
block's 14,286 x 64 Gramian in the distributed trainer then took 0.45 s instead of 0.01 s, in
about half of the blocks.

`--worker_threads N` (`WorkerThreadsOptions`) gives each worker process N threads; 0, the
default, means cpus // P (at least 1), cpus the CPUs this process may run on and P the SDK
processes its runner starts on each worker machine (`sdk_processes`):

    DirectRunner, multi_processing    P = --direct_num_workers (cpus when 0)
    DirectRunner, in_memory or        no budget: the DoFns run in the launching process, whose
      multi_threading (or Prism)      pools are left as they are (an explicit N applies)
    DataflowRunner                    P = cpus (one SDK process per vCPU, Dataflow's default),
                                      or 1 with --experiments=no_use_multiple_sdk_containers
    any other runner (Flink, Spark,   P = --sdk_worker_parallelism (Beam's default 1; 0, "the
      PortableRunner)                 runner decides", counts as 1)

So on Dataflow each of an n2-standard-4's four processes gets 1 thread, and the one process of
`no_use_multiple_sdk_containers` gets 4, which its --number_of_worker_harness_threads share.

Two places apply the budget:

- `local_budget`, around a local multi-process run: sets the variables below in the launcher's
  environment, so that the worker processes DirectRunner starts inherit them and their libraries
  size their pools at load. A variable the user set is left alone.
- `apply_in_worker`, from the setup() of the DoFns that run TensorFlow or BLAS-heavy NumPy, on any
  runner: reads the job's options in the worker (`worker_options`), then limits the BLAS and
  OpenMP pools with threadpoolctl and sets TensorFlow's intra- and inter-op pools with
  `tf.config.threading`, once per process. TensorFlow takes them only before its runtime starts
  in that process (its first op); if it has started, its pools stay as they are (logged at
  debug). TF Transform's own sessions already run with 2 inter- and 2 intra-op threads on
  Dataflow and DirectRunner (`tensorflow_transform.beam.impl`), so preprocessing needs neither.

Element types: none; this module reads options and the environment and sets thread pools.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import threading

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (
    DebugOptions,
    DirectOptions,
    PipelineOptions,
    PortableOptions,
)

from common import allocator, locations

logger = logging.getLogger(__name__)

# What OpenMP, OpenBLAS, MKL and TensorFlow (intra- and inter-op pools) read at start-up.
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "TF_NUM_INTRAOP_THREADS",
    "TF_NUM_INTEROP_THREADS",
)
# Dataflow's experiment for one SDK process per worker VM (instead of one per vCPU).
ONE_SDK_PROCESS = "no_use_multiple_sdk_containers"
_DIRECT = ("direct", "switchingdirect", "bundlebaseddirect", "prism")


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


class WorkerThreadsOptions(PipelineOptions):
    """`--worker_threads`: the thread budget of each SDK worker process (module doc)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--worker_threads",
            type=_non_negative,
            default=0,
            help="Threads of TensorFlow's (intra- and inter-op) and BLAS's pools in each SDK "
            "worker process, set when its first trainer, evaluation or prediction DoFn starts. "
            "Default 0: the worker's vCPUs divided by the SDK processes its runner starts on it "
            "(1 on Dataflow, one process per vCPU; all vCPUs with "
            f"--experiments={ONE_SDK_PROCESS}; none set for an in-process DirectRunner).",
        )


def runner_name(options: PipelineOptions) -> str:
    """The runner's name, lower case, without module path and "runner" suffix: "direct",
    "dataflow", "flink", "portable", ... (`common.locations.runner_name`, shortened)."""
    return locations.runner_name(options).lower().removesuffix("runner") or "direct"


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def direct_workers(options: PipelineOptions) -> int | None:
    """The DirectRunner's number of workers (cores when --direct_num_workers is 0), or None on
    any other runner."""
    if runner_name(options) in _DIRECT:
        workers = options.view_as(DirectOptions).direct_num_workers
        return workers if workers > 0 else (os.cpu_count() or 1)
    return None


def local_processes(options: PipelineOptions) -> int:
    """The worker processes a run starts on this machine: N for DirectRunner in
    `multi_processing` mode with N workers (cores when N is 0), else 0."""
    workers = direct_workers(options)
    if workers is None or options.view_as(DirectOptions).direct_running_mode != "multi_processing":
        return 0
    return workers


def sdk_processes(options: PipelineOptions, cpus: int) -> int | None:
    """SDK worker processes per worker machine of `cpus` CPUs, as the runner starts them (the
    table of the module doc); None for a DirectRunner that runs the DoFns in the launcher."""
    name = runner_name(options)
    if name in _DIRECT:
        return local_processes(options) or None
    if name == "dataflow":
        experiments = options.view_as(DebugOptions).experiments or []
        return 1 if ONE_SDK_PROCESS in experiments else cpus
    parallelism = options.view_as(PortableOptions).sdk_worker_parallelism  # a str from flags
    return max(1, int(parallelism or 1))


def worker_budget(options: PipelineOptions, cpus: int | None = None) -> int | None:
    """Threads per SDK worker process: --worker_threads when set, else max(1, cpus // P) with P
    = `sdk_processes`; None when nothing is to be set (in-process DirectRunner, flag unset)."""
    threads = options.view_as(WorkerThreadsOptions).worker_threads
    if threads:
        return threads
    cpus = cpus or available_cpus()
    processes = sdk_processes(options, cpus)
    return None if processes is None else max(1, cpus // processes)


def budget(options: PipelineOptions, cores: int | None = None) -> int | None:
    """Threads per local worker process of a multi-process DirectRunner run (--worker_threads,
    or max(1, cores // N)), or None if the run starts none."""
    if local_processes(options) == 0:
        return None
    return worker_budget(options, cores or os.cpu_count() or 1)


@contextlib.contextmanager
def local_budget(options: PipelineOptions):
    """Within the block, the thread variables the user did not set hold `budget(options)`, so
    that the worker processes the pipeline starts inherit them; restored on exit."""
    threads = budget(options)
    if threads is None:
        yield None
        return
    added = [name for name in THREAD_VARIABLES if name not in os.environ]
    for name in added:
        os.environ[name] = str(threads)
    if added:
        logger.info(
            "%d local worker processes: %d thread(s) each (%s)",
            local_processes(options),
            threads,
            ", ".join(added),
        )
    try:
        yield threads
    finally:
        for name in added:
            os.environ.pop(name, None)


def worker_options() -> PipelineOptions:
    """The options of the job this process runs. An SDK worker gets them from its runner, and
    `sdk_worker_main` hands them to Beam's FileSystems (which read their own flags from them,
    e.g. --s3_endpoint_url); in the launcher, `beam.Pipeline(options=...)` does the same."""
    options = FileSystems._pipeline_options  # noqa: SLF001 - Beam's own holder of them
    return options if options is not None else PipelineOptions([])


def _in_sdk_worker() -> bool:
    """Whether this process is an SDK worker that a runner started (`sdk_worker_main` reads its
    control endpoint from this variable), rather than the process that launched the job."""
    return "CONTROL_API_SERVICE_DESCRIPTOR" in os.environ


_lock = threading.Lock()
_applied: int | None = None  # the budget this process's pools were given, once given


def _limit_tensorflow(threads: int) -> bool:
    """Sets TensorFlow's intra- and inter-op pools to `threads`; False if its runtime has
    started in this process (then they stay as they are)."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError as error:  # "... cannot be modified after initialization."
        logger.debug("TensorFlow's thread pools stay as they are: %s", error)
        return False
    return True


def apply_in_worker(options: PipelineOptions | None = None) -> int | None:
    """Gives this process's BLAS, OpenMP and TensorFlow pools the budget `worker_budget` of
    `options` (default `worker_options()`); once per process, later calls return the first
    budget. For the setup() of DoFns that run TensorFlow or BLAS-heavy NumPy, or hold large
    elements: in an SDK worker process it also has glibc give freed blocks back to the OS
    (`common.allocator`).

    Returns:
        The threads per pool, or None when there is nothing to set (in-process DirectRunner
        without --worker_threads).
    """
    global _applied
    allocator.return_freed_memory()  # a worker process: its freed blocks go back to the OS
    with _lock:
        if _applied is not None:
            return _applied
        options = options if options is not None else worker_options()
        if local_processes(options) and not _in_sdk_worker():
            return None  # the launcher of local worker processes: they take the budget
        threads = worker_budget(options)
        if threads is None:
            return None
        import threadpoolctl

        threadpoolctl.threadpool_limits(limits=threads)  # BLAS and OpenMP, process-wide
        tensorflow = _limit_tensorflow(threads)
        _applied = threads
        logger.info(
            "worker process %d: %d thread(s) for BLAS%s",
            os.getpid(),
            threads,
            " and TensorFlow" if tensorflow else " (TensorFlow's runtime had started)",
        )
        return threads
