"""Memory of the Beam elements and worker processes: a trainer process with `broadcast`, and
one evaluation element, measured on the trees given (e.g. this one and an earlier commit's).

    python benchmarks/beam_memory.py --work_dir DIR [--trees .,/tmp/base] [--threads 1]
        [--users 250000] [--items 250000] [--cells 500000] [--element_users 4096]
        [--element_items 50000]

Each measurement runs in a subprocess with PYTHONPATH set to the tree, so the code measured is
that tree's (run this file by its path: the earlier tree need not hold it).

    process     `trainer.beam.train.train` with --factor_exchange broadcast, k = 64, CG, 2
                iterations, DirectRunner in_memory (or multi_threading with --threads > 1
                workers, in one process; Beam 2.77's multi_threading mode failed to decode a
                shuffle here and retried until memory ran out),
                on a synthetic matrix (`benchmarks.distributed_benchmark.write_dataset`: the
                fixed tables are users · 64 · 4 and items · 64 · 4 bytes). Reported: the
                process's RSS before the pipeline, its peak during it (sampled every 10 ms from
                /proc/self/statm) and the difference, which holds the fixed tables, their copies
                and everything else the pipeline allocates.
    element     `trainer.beam.evaluate.block_sums` of one block of --element_users users against
                --element_items items (k = 64, every user with held-out items, ks 10,20,50):
                the peak of the NumPy allocations (tracemalloc) during the call.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time

K = 64


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _measure_process(data_dir: str, out_dir: str, threads: int) -> dict:
    from trainer.beam import train as distributed
    from trainer.core.objective import WALSConfig
    from trainer.local import dataset as data

    dataset = data.load_dataset(data_dir)
    config = WALSConfig(latent_factors=K, num_iters=2, solver="cg")
    mode = "in_memory" if threads == 1 else "multi_threading"
    argv = ["--direct_running_mode", mode, "--direct_num_workers", str(threads)]
    baseline = _rss_mb()
    peak = [baseline]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    began = time.perf_counter()
    try:
        distributed.train(dataset, data_dir, config, out_dir, argv, "broadcast", 16384, 0)
    finally:
        done.set()
        sampler.join()
    return {
        "baseline_mb": round(baseline, 1),
        "peak_mb": round(peak[0], 1),
        "pipeline_mb": round(peak[0] - baseline, 1),
        "seconds": round(time.perf_counter() - began, 1),
    }


def _measure_element(n_users: int, n_items: int) -> dict:
    import tracemalloc

    import numpy as np

    from trainer.beam import evaluate
    from trainer.core.sparse import CsrMatrix

    rng = np.random.default_rng(0)
    factors = rng.normal(size=(n_users, K)).astype(np.float32)
    items = rng.normal(size=(n_items, K)).astype(np.float32)

    def rows(per_user: int) -> CsrMatrix:
        cols = np.sort(rng.choice(n_items, size=(n_users, per_user)), axis=1)
        indptr = np.arange(0, n_users * per_user + 1, per_user)
        return CsrMatrix(indptr, cols.ravel(), np.ones(cols.size, np.float32), (n_users, n_items))

    train, heldout = rows(20), rows(3)
    block = evaluate.EvalBlock(0, np.arange(n_users), factors, train, heldout)
    tracemalloc.start()
    began = time.perf_counter()
    evaluate.block_sums(block, items, (10, 20, 50), True)
    seconds = time.perf_counter() - began
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"peak_mb": round(peak / 2**20, 1), "seconds": round(seconds, 2)}


def _watch(process: subprocess.Popen, max_rss_gb: float) -> bool:
    """Waits for `process`; kills it (True) if its RSS exceeds max_rss_gb (a shared machine)."""
    statm = f"/proc/{process.pid}/statm"
    while process.poll() is None:
        try:
            with open(statm) as handle:
                rss = int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            rss = 0
        if rss > max_rss_gb * 2**30:
            process.kill()
            process.wait()
            return True
        time.sleep(0.05)
    return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", required=True)
    parser.add_argument("--trees", default=".")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--users", type=int, default=250_000)
    parser.add_argument("--items", type=int, default=250_000)
    parser.add_argument("--cells", type=int, default=500_000)
    parser.add_argument("--element_users", type=int, default=4096)
    parser.add_argument("--element_items", type=int, default=50_000)
    parser.add_argument("--only", default="process,element")
    parser.add_argument("--max_rss_gb", type=float, default=6.0, help="kill a child beyond this")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        if kind == "process":
            result = _measure_process(rest[0], rest[1], int(rest[2]))
        else:
            result = _measure_element(int(rest[0]), int(rest[1]))
        import trainer

        print(json.dumps({**result, "trainer": os.path.dirname(trainer.__file__)}))
        return

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, here)
    from benchmarks import distributed_benchmark

    data_dir = os.path.join(args.work_dir, f"data-{args.users}-{args.items}-{args.cells}")
    distributed_benchmark.write_dataset(data_dir, (args.users, args.items, args.cells))
    for tree in args.trees.split(","):
        tree = os.path.abspath(tree)
        env = {**os.environ, "PYTHONPATH": tree, "TF_CPP_MIN_LOG_LEVEL": "2"}
        for kind in args.only.split(","):
            if kind == "process":
                out = os.path.join(args.work_dir, "model")
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(f"{out}.checkpoints", ignore_errors=True)
                child = ["process", data_dir, out, str(args.threads)]
            else:
                child = ["element", str(args.element_users), str(args.element_items)]
            command = [sys.executable, os.path.abspath(__file__), "--work_dir", "-", "--child"]
            log = os.path.join(args.work_dir, f"{kind}.log")
            with open(log, "w") as errors:
                child_process = subprocess.Popen(
                    [*command, *child], env=env, cwd=tree, stdout=subprocess.PIPE, stderr=errors
                )
                killed = _watch(child_process, args.max_rss_gb)
                out = child_process.stdout.read().decode()
            if child_process.returncode or killed:
                why = "over --max_rss_gb" if killed else f"exit {child_process.returncode}"
                raise RuntimeError(f"{tree} {kind} failed ({why}); see {log}")
            print(tree, kind, out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
