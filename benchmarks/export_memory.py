"""Peak memory of exporting a model directory as a SavedModel, at two sizes 8x apart.

    python -m benchmarks.export_memory [--users 100000] [--items 5000] [--cells_per_user 20]
        [--k 32] [--chunk_mb 8] [--main /work/main] [--workdir DIR]

Writes a random model directory (`trainer.serving.model.save`) of `--users` visitors and one of
8x the visitors and cells (same items and k), then exports each in a fresh process and reads that
process's peak resident set (VmHWM of /proc/self/status, after the export; not ru_maxrss,
which Linux carries over from the forking parent's size across exec):

    streamed   this checkout's `export_saved_model(model_dir, ...)`: the tables read and written
               chunk by chunk (`trainer.serving.export_tables`, `sliced_variables`)
    loading    with --main, that checkout's way (its trainer.serving, imported from there):
               `export_saved_model(model.load(model_dir), ...)`, the model and a variable of
               every table in memory

Prints one JSON line per (mode, size): the peak RSS in MB, the model's table bytes, and the
growth from the small size to the large one. Both sizes must stay small (a few hundred MB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

MB = 2**20
_CHILD = """
import json, sys
from trainer.serving import export
from trainer.serving import model as model_lib
mode, model_dir, export_dir, chunk_bytes = sys.argv[1:5]
if mode == "loading":
    export.export_saved_model(model_lib.load(model_dir), export_dir, k=10)
else:
    export.export_saved_model(model_dir, export_dir, k=10, chunk_bytes=int(chunk_bytes))
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss_mb": peak / 1024}))
"""


def write_model(directory: str, users: int, items: int, cells_per_user: int, k: int) -> int:
    """A random model of that size under directory; returns its table bytes (factors, seen)."""
    from trainer.serving import model as model_lib

    rng = np.random.default_rng(users)
    nnz = users * cells_per_user
    indices = np.sort(
        rng.integers(0, items, (users, cells_per_user), dtype=np.int32), axis=1
    ).ravel()
    model = model_lib.WALSModel(
        user_factors=rng.standard_normal((users, k), np.float32),
        item_factors=rng.standard_normal((items, k), np.float32),
        seen_indptr=np.arange(0, nnz + 1, cells_per_user, dtype=np.int64),
        seen_indices=indices,
        item_counts=np.bincount(indices, minlength=items).astype(np.int64),
        users=[f"{7_000_000_000_000_000_000 + u}" for u in range(users)],
        items=[f"article-{i:06d}" for i in range(items)],
        config={
            "scaling": "median",
            "scale_stats": {"median": 41000.0},
            "unobserved_weight": 0.1,
            "regularization": 0.05,
            "regularization_exp": 1.0,
            "weighting": "uniform",
            "latent_factors": k,
        },
    )
    model_lib.save(model, directory)
    return (users + items) * k * 4 + (users + 1) * 8 + nnz * 4


def measure(mode: str, model_dir: str, export_dir: str, root: str, chunk_bytes: int) -> float:
    """The peak RSS (MB) of a fresh process exporting model_dir with `root`'s code."""
    env = {**os.environ, "PYTHONPATH": root, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, model_dir, export_dir, str(chunk_bytes)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"{mode} export failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=5_000)
    parser.add_argument("--cells_per_user", type=int, default=20)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument(
        "--chunk_mb",
        type=int,
        default=8,
        help="the streamed export's chunk_bytes, in MiB (default 8: below both sizes' tables, "
        "so that the growth shows what does not depend on the chunk)",
    )
    parser.add_argument("--main", default=None, help="a checkout to measure the loading export of")
    parser.add_argument("--workdir", default=None, help="where the models go (default: a temp dir)")
    args = parser.parse_args(argv)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    modes = [("streamed", here)] + ([("loading", args.main)] if args.main else [])
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        sizes = {}
        for scale in (1, 8):
            directory = os.path.join(work, f"x{scale}")
            sizes[scale] = write_model(
                directory, args.users * scale, args.items, args.cells_per_user, args.k
            )
        for mode, root in modes:
            peaks = {}
            for scale in (1, 8):
                export_dir = os.path.join(work, f"{mode}-x{scale}", "1")
                peaks[scale] = measure(
                    mode, os.path.join(work, f"x{scale}"), export_dir, root, args.chunk_mb * MB
                )
                print(
                    json.dumps(
                        {
                            "mode": mode,
                            "users": args.users * scale,
                            "cells": args.users * scale * args.cells_per_user,
                            "table_mb": round(sizes[scale] / MB, 1),
                            "peak_rss_mb": round(peaks[scale], 1),
                        }
                    )
                )
            growth = peaks[8] - peaks[1]
            print(
                json.dumps(
                    {
                        "mode": mode,
                        "growth_mb": round(growth, 1),
                        "tables_growth_mb": round((sizes[8] - sizes[1]) / MB, 1),
                    }
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
