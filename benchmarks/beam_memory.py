"""Memory of the Beam elements and worker processes: a trainer process with `broadcast`, and
one evaluation element, measured on the trees given (e.g. this one and an earlier commit's).

    python benchmarks/beam_memory.py --work_dir DIR [--trees .,/tmp/base] [--threads 4]
        [--users 250000] [--items 250000] [--cells 500000] [--element_users 4096]
        [--element_items 50000]

Each measurement runs in a subprocess with PYTHONPATH set to the tree, so the code measured is
that tree's (run this file by its path: the earlier tree need not hold it).

    process     `trainer.beam.train.train` with --factor_exchange broadcast, k = 64, CG, 2
                iterations, DirectRunner multi_threading with --threads workers in one process,
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
    argv = ["--direct_running_mode", "multi_threading", "--direct_num_workers", str(threads)]
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", required=True)
    parser.add_argument("--trees", default=".")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--users", type=int, default=250_000)
    parser.add_argument("--items", type=int, default=250_000)
    parser.add_argument("--cells", type=int, default=500_000)
    parser.add_argument("--element_users", type=int, default=4096)
    parser.add_argument("--element_items", type=int, default=50_000)
    parser.add_argument("--only", default="process,element")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
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
            done = subprocess.run(
                [*command, *child], env=env, cwd=tree, capture_output=True, text=True
            )
            if done.returncode:
                raise RuntimeError(f"{tree} {kind} failed:\n{done.stderr[-3000:]}")
            print(tree, kind, done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
