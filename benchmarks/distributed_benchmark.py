"""Seconds per iteration and peak memory of the distributed (Beam) WALS trainer vs. the local one.

The trainer benchmark's synthetic power-law matrix (`benchmarks.matrices`; large: 100K users x
20K items x 5M cells, small: 20K x 5K x 500K) is written once as a preprocessed dataset, exactly
what `trainer.task --input_dir` reads:

    <work_dir>/data-<size>/
      train/items_for_user-SSSSS-of-NNNNN.tfrecord.gz   whole rows    (pipeline.matrix_io format)
      train/users_for_item-SSSSS-of-NNNNN.tfrecord.gz   whole columns
      eval/items_for_user-...                           the held-out cells (a per-cell split)
      transform_fn/assets/vocab_users, vocab_items      one ID per line, line number = index
      summary.json                                      sizes and counts, written last

Then every configuration trains on it as its own `python -m trainer.task` subprocess (k = 64,
`--solver cg`, `--loss_every 0`, `--eval_every 0`), so that the peak RSS of the process tree
(the DirectRunner's worker processes included, `benchmarks.measure`) belongs to it alone:

    local                   trainer.local.train.fit, TensorFlow on the machine's cores
    broadcast x 1 worker    --distributed, DirectRunner in_memory, 1 worker
    broadcast x 2 workers   --distributed, DirectRunner multi_processing, 2 workers
    join x 1, join x 2      the same with --factor_exchange join

Seconds per iteration leave out the fixed start-up cost (Beam's pipeline construction and
worker start, reading the TFRecords into blocks, TensorFlow's tracing and XLA compilation): each
configuration trains once with --iters iterations (6 by default; the local trainer, whose
iterations are short, --local_iters = 21), and

    s/iter = mean of metrics.json's iteration_seconds (every iteration after the first)

which the trainers measure themselves: the local one between its iteration callbacks, the Beam
one between the checkpoint markers of consecutive iterations' item halves (one whole iteration,
every stage of it). An earlier version took the difference of a 1- and a 6-iteration run, whose
start-up (20 s and more, varying by ±2 s) swamped the difference.

The table gives the ratio to the local trainer and the solve
throughput per core: an iteration is two half-sweeps, each touching every training cell once, so

    cells/s/core = 2 · nnz_train / (s/iter · cores)   (rows/s/core: n_users + n_items per s/iter)

with cores = os.cpu_count() (every configuration here can use all of them). The sizing section of
the README predicts sweep times on a cluster from that figure.

    python -m benchmarks.distributed_benchmark --size small|large [--work_dir DIR]
        [--iters 6] [--local_iters 21] [--repeats 1] [--block_rows 16384]
        [--only local,broadcast-2,...] [--json_out results.json]

On a shared machine, --repeats N takes the fastest of N runs of each configuration; the load
average is printed with the table. It also prints the `join` exchange's shuffle per half-sweep as
distinct (solving block, fixed row) pairs per training cell.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile

import numpy as np
import tensorflow as tf

from benchmarks import matrices, measure
from trainer.beam import layout as blocks_lib
from trainer.core.sparse import CsrMatrix
from trainer.local import dataset as data
from transforms import features
from transforms.examples import sparse_example

logger = logging.getLogger(__name__)

# (n_users, n_items, nnz): large is the trainer benchmark's matrix.
SIZES: dict[str, tuple[int, int, int]] = {
    "small": (20_000, 5_000, 500_000),
    "large": matrices.SIZES["large"],
}
K = 64
SEED = 0
EVAL_FRACTION = 0.1
SHARDS = 4
# Issue 7's targets: seconds per iteration of the Beam trainer over the local trainer's.
TARGETS = {"broadcast": 3.0, "join": 5.0}


@dataclasses.dataclass(frozen=True)
class Config:
    """One way of training: the local trainer, or the Beam trainer with an exchange and workers."""

    name: str
    exchange: str | None = None  # None: the local trainer
    workers: int = 1

    def flags(self, block_rows: int) -> list[str]:
        if self.exchange is None:
            return []
        flags = [
            "--distributed",
            "--factor_exchange",
            self.exchange,
            "--block_rows",
            str(block_rows),
        ]
        if self.workers == 1:
            return [*flags, "--direct_running_mode", "in_memory", "--direct_num_workers", "1"]
        return [
            *flags,
            "--direct_running_mode",
            "multi_processing",
            "--direct_num_workers",
            str(self.workers),
        ]


CONFIGS = (
    Config("local"),
    Config("broadcast-1", "broadcast", 1),
    Config("broadcast-2", "broadcast", 2),
    Config("join-1", "join", 1),
    Config("join-2", "join", 2),
)


# --- the dataset --------------------------------------------------------------------------------


def _write_records(path: str, matrix: CsrMatrix, first_key: int) -> None:
    """One `key/indices/values` Example per row of `matrix`, keyed first_key + row (rows with no
    cells included)."""
    options = tf.io.TFRecordOptions(compression_type="GZIP")
    with tf.io.TFRecordWriter(path, options) as writer:
        for row in range(matrix.shape[0]):
            start, stop = matrix.indptr[row], matrix.indptr[row + 1]
            entries = zip(matrix.indices[start:stop].tolist(), matrix.values[start:stop].tolist())
            writer.write(sparse_example(first_key + row, entries))


def _write_sharded(directory: str, name: str, matrix: CsrMatrix, shards: int) -> None:
    os.makedirs(directory, exist_ok=True)
    bounds = np.linspace(0, matrix.shape[0], shards + 1).astype(int)
    for shard in range(shards):
        path = f"{directory}/{name}-{shard:05d}-of-{shards:05d}{features.TFRECORD_SUFFIX}"
        _write_records(path, matrix.row_slice(bounds[shard], bounds[shard + 1]), int(bounds[shard]))


def write_dataset(directory: str, shape: tuple[int, int, int], shards: int = SHARDS) -> dict:
    """Writes the synthetic matrix of shape (n_users, n_items, nnz) as a preprocessed dataset;
    returns its summary.json. An existing dataset of the same shape is reused.
    """
    n_users, n_items, nnz = shape
    summary_path = os.path.join(directory, features.SUMMARY_FILE)
    if os.path.exists(summary_path):
        with open(summary_path) as handle:
            summary = json.load(handle)
        if summary.get("benchmark_size") == [n_users, n_items, nnz]:
            logger.info("reusing the dataset in %s", directory)
            return summary
    shutil.rmtree(directory, ignore_errors=True)
    logger.info("writing a %d x %d x %d matrix to %s", n_users, n_items, nnz, directory)
    full = matrices.synthetic_matrix(n_users, n_items, nnz, seed=SEED)
    train, heldout = matrices.split_cells(full, EVAL_FRACTION, seed=SEED)
    # Row u is the vocabulary's line u, so the rows are their own IDs' indices.
    assets = os.path.join(directory, "transform_fn", "assets")
    os.makedirs(assets)
    for name, prefix, n in (
        (features.USER_VOCAB, "u", n_users),
        (features.ITEM_VOCAB, "i", n_items),
    ):
        with open(os.path.join(assets, name), "w") as handle:
            handle.writelines(f"{prefix}{index}\n" for index in range(n))
    train_dir = os.path.join(directory, features.TRAIN_DIR)
    eval_dir = os.path.join(directory, features.EVAL_DIR)
    _write_sharded(train_dir, features.ITEMS_FOR_USER, train, shards)
    _write_sharded(train_dir, features.USERS_FOR_ITEM, train.transpose(), shards)
    _write_sharded(eval_dir, features.ITEMS_FOR_USER, heldout, shards)
    _write_sharded(eval_dir, features.USERS_FOR_ITEM, heldout.transpose(), shards)
    summary = {
        "input": f"benchmarks.matrices.synthetic_matrix(seed={SEED})",
        "benchmark_size": [n_users, n_items, nnz],
        "eval_fraction": EVAL_FRACTION,
        "scaling": features.SCALING_MEDIAN,
        # The cells' dwell is log-normal with median 1 (benchmarks.matrices).
        "scale_stats": {"median": 1.0},
        "median": 1.0,
        "nusers": n_users,
        "nitems": n_items,
        "train_interactions": train.nnz,
        "eval_interactions": heldout.nnz,
    }
    with open(summary_path, "w") as handle:
        json.dump(summary, handle, indent=2)
    return summary


# --- measuring ----------------------------------------------------------------------------------


def train_once(data_dir: str, out_dir: str, config: Config, iters: int, block_rows: int) -> dict:
    """Trains `config` for `iters` iterations in a subprocess; returns its timings and peak RSS."""
    command = [
        sys.executable,
        "-m",
        "trainer.task",
        "--input_dir",
        data_dir,
        "--output_dir",
        out_dir,
        "--overwrite",
        "--latent_factors",
        str(K),
        "--solver",
        "cg",
        "--num_iters",
        str(iters),
        "--loss_every",
        "0",
        "--eval_every",
        "0",
        "--no_progress",
        *config.flags(block_rows),
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    # A checkpoint of an earlier, interrupted run would be resumed from: start afresh.
    shutil.rmtree(f"{out_dir}.checkpoints", ignore_errors=True)
    measured = measure.run_measured(command, env=env)
    if measured["returncode"] != 0:
        raise RuntimeError(
            f"{config.name} with {iters} iterations failed:\n{' '.join(command)}\n"
            f"{measured['stderr_tail']}"
        )
    with open(os.path.join(out_dir, "metrics.json")) as handle:
        result = json.load(handle)
    shutil.rmtree(out_dir, ignore_errors=True)
    logger.info(
        "%s, %d iterations: train %.1f s, process %.1f s, peak RSS %.0f MB",
        config.name,
        iters,
        result["train_seconds"],
        measured["seconds"],
        measured["peak_rss_mb"],
    )
    steady = [row["seconds"] for row in result.get("iteration_seconds", [])]
    if not steady:
        raise RuntimeError(f"{config.name}: metrics.json has no iteration_seconds")
    return {
        "train_seconds": result["train_seconds"],
        "process_seconds": measured["seconds"],
        "peak_rss_mb": measured["peak_rss_mb"],
        "iteration_seconds": steady,
    }


def measure_config(
    data_dir: str, work_dir: str, config: Config, iters: int, block_rows: int, repeats: int = 1
) -> dict:
    """Seconds per iteration, the mean of the trainer's own `iteration_seconds` (every iteration
    after the first, start-up and compilation excluded; the fastest of `repeats` runs, which
    discounts other load on the machine), and peak RSS."""
    out_dir = os.path.join(work_dir, f"model-{config.name}")
    runs = [train_once(data_dir, out_dir, config, iters, block_rows) for _ in range(repeats)]
    means = [float(np.mean(run["iteration_seconds"])) for run in runs]
    best = runs[int(np.argmin(means))]
    per_iter = min(means)
    return {
        "config": config.name,
        "exchange": config.exchange,
        "workers": config.workers,
        "seconds_per_iteration": per_iter,
        "iteration_seconds": best["iteration_seconds"],
        "startup_seconds": best["train_seconds"] - iters * per_iter,
        "train_seconds": best["train_seconds"],
        "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
    }


def join_volume(data_dir: str, block_rows: int) -> dict:
    """Per half-sweep, Σ over solving blocks of the distinct fixed rows their cells touch, as a
    share of the training cells: the `join` exchange ships that many vectors of k floats."""
    train = data.load_dataset(data_dir).train
    shares = {}
    for side, matrix in (("users", train), ("items", train.transpose())):
        block = blocks_lib.BlockLayout(matrix.shape[0], block_rows).block_of(matrix.row_ids())
        pairs = np.unique(block.astype(np.int64) * matrix.shape[1] + matrix.indices).size
        shares[side] = pairs / max(matrix.nnz, 1)
    return shares


def add_ratios(rows: list[dict], summary: dict, cores: int) -> None:
    """Adds the ratio to the local trainer and the per-core throughputs to every row."""
    local = next(row for row in rows if row["exchange"] is None)["seconds_per_iteration"]
    nnz, n_rows = summary["train_interactions"], summary["nusers"] + summary["nitems"]
    for row in rows:
        if row["seconds_per_iteration"] <= 0:
            logger.warning(
                "%s: the longer run was not slower; other load swamped the measurement "
                "(rerun with --repeats)",
                row["config"],
            )
        per_iter = max(row["seconds_per_iteration"], 1e-9)
        row["ratio_to_local"] = per_iter / local
        row["cells_per_second_per_core"] = 2 * nnz / (per_iter * cores)
        row["rows_per_second_per_core"] = n_rows / (per_iter * cores)
        target = TARGETS.get(row["exchange"])
        row["target"] = target
        row["meets_target"] = None if target is None else row["ratio_to_local"] <= target


def format_table(rows: list[dict]) -> str:
    lines = [
        f"{'trainer':<14} {'s/iter':>8} {'x local':>8} {'target':>7} {'start-up s':>11} "
        f"{'peak RSS MB':>12} {'cells/s/core':>13} {'rows/s/core':>12}"
    ]
    for row in rows:
        target = f"{row['target']:.0f}x" if row["target"] else ""
        lines.append(
            f"{row['config']:<14} {row['seconds_per_iteration']:>8.2f} "
            f"{row['ratio_to_local']:>8.2f} {target:>7} {row['startup_seconds']:>11.1f} "
            f"{row['peak_rss_mb']:>12.0f} {row['cells_per_second_per_core']:>13,.0f} "
            f"{row['rows_per_second_per_core']:>12,.0f}"
        )
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument(
        "--work_dir",
        help="where the dataset and models go (default: a temporary directory); "
        "a dataset already there is reused",
    )
    parser.add_argument(
        "--iters", type=int, default=6, help="iterations per run (the first is not timed)"
    )
    parser.add_argument(
        "--local_iters",
        type=int,
        default=21,
        help="iterations of the local trainer's run, whose iterations are short",
    )
    parser.add_argument(
        "--block_rows",
        type=int,
        default=blocks_lib.DEFAULT_TRAIN_BLOCK_ROWS,
        help="rows per block (Beam)",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per configuration; the fastest counts"
    )
    parser.add_argument(
        "--only", help="comma-separated configurations to run (default all; local is always run)"
    )
    parser.add_argument("--json_out", help="also write the results here")
    args = parser.parse_args(argv)
    if min(args.iters, args.local_iters) < 2:
        parser.error("need --iters and --local_iters >= 2: the first iteration is not timed")
    configs = list(CONFIGS)
    if args.only:
        wanted = set(args.only.split(",")) | {"local"}
        configs = [config for config in configs if config.name in wanted]

    work_dir = args.work_dir or tempfile.mkdtemp(prefix="distributed_benchmark-")
    os.makedirs(work_dir, exist_ok=True)
    data_dir = os.path.join(work_dir, f"data-{args.size}")
    summary = write_dataset(data_dir, SIZES[args.size])
    cores = os.cpu_count() or 1
    rows = [
        measure_config(
            data_dir,
            work_dir,
            config,
            args.local_iters if config.exchange is None else args.iters,
            args.block_rows,
            args.repeats,
        )
        for config in configs
    ]
    add_ratios(rows, summary, cores)
    shares = join_volume(data_dir, args.block_rows)
    result = {
        "size": args.size,
        "shape": summary["benchmark_size"],
        "train_interactions": summary["train_interactions"],
        "k": K,
        "solver": "cg",
        "block_rows": args.block_rows,
        "cores": cores,
        "iters": args.iters,
        "local_iters": args.local_iters,
        "rows": rows,
        "join_rows_shipped_per_cell": shares,
        "load_average": os.getloadavg(),
    }
    n_users, n_items, _ = summary["benchmark_size"]
    print(
        f"{n_users:,} users x {n_items:,} items, {summary['train_interactions']:,} training cells, "
        f"k={K}, CG, block_rows={args.block_rows}, {cores} cores; s/iter = mean wall time of "
        f"iterations 2-{args.iters} (local: 2-{args.local_iters}), fastest of {args.repeats}"
    )
    print(format_table(rows))
    print(
        "join ships, per half-sweep, distinct (solving block, fixed row) pairs per training cell: "
        + ", ".join(f"solving {side} {share:.3f}" for side, share in shares.items())
        + f"; load average at the end {result['load_average'][0]:.1f}"
    )
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump(result, handle, indent=2)
    if not args.work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run()
