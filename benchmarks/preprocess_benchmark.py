"""Preprocessing throughput: the Beam + TF Transform pipeline against a plain Python reference.

Generates synthetic GA360 sessions with about --page_hits PAGE hits (cached under --work_dir),
then times, each in its own process:
  * the pipeline on DirectRunner, in-memory with 1 worker;
  * the pipeline on DirectRunner, multi-processing with 2 workers;
  * benchmarks/reference_aggregation.py (json parse + dict aggregation, one process).
and prints hits/s, wall time, peak RSS (process tree) and each time as a ratio of the
reference's.

    python -m benchmarks.preprocess_benchmark [--page_hits 1000000] [--work_dir /tmp/ga-bench]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys

from benchmarks.measure import run_measured
from pipeline import synthetic

logger = logging.getLogger(__name__)
PAGE_HITS_PER_SESSION = 9.78  # Measured on the generator's defaults.


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--page_hits", type=int, default=1_000_000)
    parser.add_argument("--work_dir", default="/tmp/ga-wals-bench")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    os.makedirs(args.work_dir, exist_ok=True)
    sessions = int(args.page_hits / PAGE_HITS_PER_SESSION)
    data = os.path.join(args.work_dir, f"sessions-{sessions}-{args.seed}.json.gz")
    if not os.path.exists(data):
        logger.info("generating %d sessions into %s", sessions, data)
        partial = data.replace(".json.gz", ".partial.json.gz")
        counts = synthetic.write_sessions(partial, num_sessions=sessions, seed=args.seed)
        os.rename(partial, data)
        with open(data + ".counts.json", "w") as handle:
            json.dump(counts, handle)
    with open(data + ".counts.json") as handle:
        page_hits = json.load(handle)["page_hits"]

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    runs = [
        (
            "plain Python reference (1 process)",
            [sys.executable, "-m", "benchmarks.reference_aggregation", data],
        ),
        (
            "pipeline, DirectRunner in_memory, 1 worker",
            [
                sys.executable,
                "-m",
                "pipeline.preprocess",
                "--input",
                data,
                "--overwrite",
                "--output_dir",
                os.path.join(args.work_dir, "out-1"),
            ],
        ),
        (
            "pipeline, DirectRunner multi_processing, 2 workers",
            [
                sys.executable,
                "-m",
                "pipeline.preprocess",
                "--input",
                data,
                "--overwrite",
                "--output_dir",
                os.path.join(args.work_dir, "out-2"),
                "--direct_num_workers",
                "2",
                "--direct_running_mode",
                "multi_processing",
            ],
        ),
    ]
    results = []
    for name, command in runs:
        logger.info("running: %s", name)
        result = run_measured(command, env=env)
        if result["returncode"] != 0:
            raise SystemExit(f"{name} failed:\n{result['stderr_tail']}")
        results.append({"name": name, **result})
    reference_seconds = results[0]["seconds"]
    print(
        f"\n{page_hits:,} PAGE hits ({sessions:,} sessions), {os.path.getsize(data) / 2**20:.0f} "
        "MB gzip"
    )
    print(f"{'run':<52} {'wall s':>8} {'hits/s':>10} {'peak RSS MB':>12} {'x reference':>12}")
    for result in results:
        print(
            f"{result['name']:<52} {result['seconds']:8.1f} "
            f"{page_hits / result['seconds']:10,.0f} {result['peak_rss_mb']:12,.0f} "
            f"{result['seconds'] / reference_seconds:12.2f}"
        )
    for out in ("out-1", "out-2"):
        shutil.rmtree(os.path.join(args.work_dir, out), ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
