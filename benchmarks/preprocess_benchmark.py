"""Preprocessing throughput: the Beam + TF Transform pipeline against two references.

Generates synthetic GA360 sessions with about --page_hits PAGE hits (cached under --work_dir),
then, --repeats times, times each of these in its own process:
  * benchmarks/reference_aggregation.py: plain Python (json parse + dict aggregation);
  * benchmarks/bare_beam_reference.py: the bare Beam pipeline (same parse, per-pair sum, group by
    visitor and by content, gzip TFRecords; no TF Transform), DirectRunner, 1 worker;
  * the pipeline on DirectRunner, in-memory with 1 worker;
  * the pipeline on DirectRunner, multi-processing with 2 workers.
Each repeat runs every row once, so the ratios of a repeat (x bare Beam, x plain Python, and the
2-worker speed-up) compare runs made under the same load. The table gives, per row, the median
over repeats of the wall time and of each ratio, with [min-max], and the largest peak memory of
the process tree (launcher and DirectRunner workers), in two columns:
  * peak RSS: the sum of the processes' resident sets, sampled every 0.2 s. It counts the pages
    of a library that several processes map (TensorFlow, about 0.4 GB of each TF process's RSS)
    once per process: the 2-worker run has 3 processes that import TensorFlow.
  * peak PSS: the sum of the proportional set sizes, where a page shared by k processes counts
    1/k in each, so that shared pages count once; sampled every PSS_INTERVAL s (reading smaps is
    slower). Both are reported; the issue's bar is stated for the process tree's memory.

    python -m benchmarks.preprocess_benchmark [--page_hits 1000000] [--repeats 3] \
        [--work_dir /tmp/ga-wals-bench] [--rows plain,bare,pipeline,pipeline2]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys

from benchmarks.measure import run_measured
from pipeline import synthetic

logger = logging.getLogger(__name__)
PAGE_HITS_PER_SESSION = 9.78  # Measured on the generator's defaults.

PLAIN = "plain Python reference (1 process)"
BARE = "bare Beam reference, DirectRunner, 1 worker"
SINGLE = "pipeline, DirectRunner in_memory, 1 worker"
DOUBLE = "pipeline, DirectRunner multi_processing, 2 workers"
ROW_KEYS = {"plain": PLAIN, "bare": BARE, "pipeline": SINGLE, "pipeline2": DOUBLE}
TWO_WORKERS = ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]
PSS_INTERVAL = 1.0  # Seconds between PSS samples of the process tree.


def sample_path(work_dir: str, page_hits: int, seed: int) -> tuple[str, int, int]:
    """The cached synthetic input: (path, sessions, PAGE hits), generated on first use."""
    os.makedirs(work_dir, exist_ok=True)
    sessions = int(page_hits / PAGE_HITS_PER_SESSION)
    data = os.path.join(work_dir, f"sessions-{sessions}-{seed}.json.gz")
    if not os.path.exists(data):
        logger.info("generating %d sessions into %s", sessions, data)
        partial = data.replace(".json.gz", ".partial.json.gz")
        counts = synthetic.write_sessions(partial, num_sessions=sessions, seed=seed)
        os.rename(partial, data)
        with open(data + ".counts.json", "w") as handle:
            json.dump(counts, handle)
    with open(data + ".counts.json") as handle:
        return data, sessions, json.load(handle)["page_hits"]


def commands(data: str, work_dir: str) -> dict[str, list[str]]:
    """The command line of each row."""

    def pipeline(out: str, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "pipeline.preprocess",
            "--input",
            data,
            "--overwrite",
            "--output_dir",
            os.path.join(work_dir, out),
            *extra,
        ]

    return {
        PLAIN: [sys.executable, "-m", "benchmarks.reference_aggregation", data],
        BARE: [
            sys.executable,
            "-m",
            "benchmarks.bare_beam_reference",
            "--input",
            data,
            "--output_dir",
            os.path.join(work_dir, "out-bare"),
        ],
        SINGLE: pipeline("out-1"),
        DOUBLE: pipeline("out-2", *TWO_WORKERS),
    }


def _ratios(repeat: dict[str, dict]) -> None:
    """Adds each row's ratios to the references of the same repeat, in place."""
    for result in repeat.values():
        for key, peer in (("x_bare", BARE), ("x_plain", PLAIN)):
            if peer in repeat:
                result[key] = result["seconds"] / repeat[peer]["seconds"]
    if SINGLE in repeat and DOUBLE in repeat:
        repeat[DOUBLE]["speedup"] = repeat[SINGLE]["seconds"] / repeat[DOUBLE]["seconds"]


def summarize(name: str, runs: list[dict]) -> dict:
    """One row: median and [min, max] of seconds and ratios over repeats; peak RSS and PSS, the
    largest of any repeat."""
    row = {
        "name": name,
        "repeats": runs,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "peak_pss_mb": max(r.get("peak_pss_mb", 0.0) for r in runs),
    }
    for key in ("seconds", "x_bare", "x_plain", "speedup"):
        values = [r[key] for r in runs if key in r]
        if values:
            row[key] = statistics.median(values)
            row[f"{key}_range"] = (min(values), max(values))
    return row


def _cell(row: dict, key: str, fmt: str) -> str:
    if key not in row:
        return "-"
    low, high = row[f"{key}_range"]
    return f"{row[key]:{fmt}} [{low:{fmt}}-{high:{fmt}}]"


def print_table(rows: list[dict], page_hits: int, sessions: int, data: str, repeats: int) -> None:
    print(
        f"\n{page_hits:,} PAGE hits ({sessions:,} sessions), {os.path.getsize(data) / 2**20:.0f} "
        f"MB gzip; median [min-max] of {repeats} repeat(s)"
    )
    print(
        f"{'run':<52} {'wall s':>18} {'x bare Beam':>18} {'x plain Python':>18} "
        f"{'2-worker speed-up':>18} {'peak RSS MB':>12} {'peak PSS MB':>12}"
    )
    for row in rows:
        print(
            f"{row['name']:<52} {_cell(row, 'seconds', '.1f'):>18} "
            f"{_cell(row, 'x_bare', '.2f'):>18} {_cell(row, 'x_plain', '.1f'):>18} "
            f"{_cell(row, 'speedup', '.2f'):>18} {row['peak_rss_mb']:12,.0f} "
            f"{row['peak_pss_mb']:12,.0f}"
        )


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--page_hits", type=int, default=1_000_000)
    parser.add_argument("--work_dir", default="/tmp/ga-wals-bench")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="Runs of every row (default 1).")
    parser.add_argument(
        "--rows",
        default=",".join(ROW_KEYS),
        help=f"Comma-separated rows to run, of {', '.join(ROW_KEYS)} (default: all).",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    data, sessions, page_hits = sample_path(args.work_dir, args.page_hits, args.seed)
    names = [ROW_KEYS[key] for key in args.rows.split(",")]
    all_commands = commands(data, args.work_dir)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    by_name: dict[str, list[dict]] = {name: [] for name in names}
    for index in range(args.repeats):
        repeat = {}
        for name in names:
            logger.info("repeat %d/%d: %s", index + 1, args.repeats, name)
            result = run_measured(all_commands[name], env=env, pss_interval=PSS_INTERVAL)
            if result["returncode"] != 0:
                raise SystemExit(f"{name} failed:\n{result['stderr_tail']}")
            repeat[name] = {key: result[key] for key in ("seconds", "peak_rss_mb", "peak_pss_mb")}
        _ratios(repeat)
        for name, result in repeat.items():
            logger.info("%s: %s", name, json.dumps(result))
            by_name[name].append(result)
    rows = [summarize(name, by_name[name]) for name in names]
    print_table(rows, page_hits, sessions, data, args.repeats)
    for out in ("out-bare", "out-1", "out-2"):
        shutil.rmtree(os.path.join(args.work_dir, out), ignore_errors=True)
    return rows


if __name__ == "__main__":
    main()
