"""Thread budgets for the worker processes of a local multi-process Beam run.

DirectRunner's `multi_processing` mode starts N SDK worker processes on this machine. Each one
loads TensorFlow and NumPy's OpenBLAS, and each library sizes its thread pool to every core, so
N workers run N x cores busy threads on `cores` cores. OpenBLAS is the worst case: after a call
its threads keep spinning for a while, holding cores that the other processes wait for. On the
2-core benchmark machine with 2 workers, a block's 14,286 x 64 Gramian in the distributed
trainer then took 0.45 s instead of 0.01 s, in about half of the blocks.

So, like Ray (which sets OMP_NUM_THREADS for its worker processes), a local multi-process run
gives each worker max(1, cores // N) threads: `local_budget` sets the variables below in this
process's environment while the pipeline runs, and the workers it starts inherit them. The
launcher's own pools were sized when its libraries loaded and stay as they are. A variable
the user set is left alone. Remote runners (Dataflow, Flink) start their workers elsewhere and
are not touched; Dataflow runs one Python SDK process per vCPU.

Element types: none; this module only reads options and the environment.
"""

from __future__ import annotations

import contextlib
import logging
import os

from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

logger = logging.getLogger(__name__)

# What OpenMP, OpenBLAS, MKL and TensorFlow (intra- and inter-op pools) read at start-up.
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "TF_NUM_INTRAOP_THREADS",
    "TF_NUM_INTEROP_THREADS",
)


def direct_workers(options: PipelineOptions) -> int | None:
    """The DirectRunner's number of workers (cores when --direct_num_workers is 0), or None on
    any other runner."""
    runner = options.view_as(StandardOptions).runner
    name = runner if isinstance(runner, str) or runner is None else type(runner).__name__
    if name is None or name.lower() in ("direct", "directrunner", "bundlebasedirectrunner"):
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


def budget(options: PipelineOptions, cores: int | None = None) -> int | None:
    """Threads per local worker process, max(1, cores // N), or None if the run starts none."""
    processes = local_processes(options)
    if processes == 0:
        return None
    return max(1, (cores or os.cpu_count() or 1) // processes)


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
