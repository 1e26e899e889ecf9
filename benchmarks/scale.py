"""Peak memory of `pipeline.run --distributed` on the portable runner, per stage, at two sizes 8x
apart: does the launcher stay flat as the data grows, and does each worker stay within what its
flags bound?

    python -m benchmarks.scale [--sessions 16000] [--visitors N] [--items 2000] \\
        [--latent_factors 32] [--num_iters 3] [--block_rows 512] [--repeats 1] \\
        [--work_dir DIR] [--output results.json]

Size S is one day of synthetic GA360 sessions (`pipeline.synthetic`: --sessions, --visitors
(default sessions / 4), --items); size 8S has 8 times each, so users, items and cells all grow
about 8x (the realised counts and ratios are printed). Each size runs --repeats times (S and
8S alternating; every figure is then the median of its runs: a run's peaks vary by tens of MB),
each time from a fresh root, against its own job service and EXTERNAL worker pool
(`benchmarks.portable_services`), whose SDK workers import this checkout:

    python -m pipeline.run --date 2017-08-01 --input .../ga_sessions_{date_nodash}.json.gz \\
        --root DIR --distributed --holdout_visitors 0.1 --gate_min_lift 0 [the flags above] \\
        --runner PortableRunner --job_endpoint localhost:J --environment_type EXTERNAL \\
        --environment_config localhost:P

While it runs, the RSS of the launcher and of the job service (the runner runs in it), each
with its children if any, of the worker pool alone, and of each SDK worker (a child of the pool;
one per Beam job) is sampled every --interval s and attributed to the stage the launcher's log
says is running (`benchmarks.process_memory`). A table per stage gives each process's peak at S
and 8S and the growth per 8x (peak at 8S - peak at S), then the verdict on issue 18's targets:

    launcher   the whole run's peak grows by less than LAUNCHER_GROWTH_MB (64 MB) per 8x
    workers    each worker's peak grows by no more than what its job's flags let it hold more
               (`benchmarks.worker_bounds`), plus 64 MB, plus what this runner makes it hold
               (printed apart as the runner's: the preprocessing worker is handed the packed
               lines it parses in one message): its peak at 8S stays within its peak at S plus
               that allowance

The job service's growth is printed, not judged: the local runner holds in it every PCollection
between fused stages (README, "What the local portable runner holds";
`python -m benchmarks.runner_memory` attributes the job service's and the worker's growth to
the fused stages of one pipeline).

The figures go to --output as JSON too. The verdict is printed, not enforced (exit status 0
when both runs complete).

With the defaults S is about 3,500 users x 2,000 items and 98K training cells; the two runs
take about 3 minutes on 2 cores, plus a minute writing the inputs (--work_dir keeps them for the
next run). Before issue 18's fix the launcher's peak grew by 87 MB per 8x (in the gate stage by
122 MB), the preprocessing worker's by 2.7 GB and the job service's by 3.8 GB: the runner held
the input's lines, which preprocessing then redistributed uncompressed (723 MiB at 8S); packed
(88 MiB), `pipeline.preprocess` alone grows by 331 MB in its worker and 423 MB in the job
service (`benchmarks.runner_memory`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from benchmarks import process_memory, scale_report, worker_bounds
from benchmarks.portable_services import PortableRunner, stop_process_groups

logger = logging.getLogger(__name__)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FACTOR = 8
LAUNCHER_GROWTH_MB = 64.0
DATE = "2017-08-01"
STAGE_LINE = re.compile(r"stage (.+?) of \d{4}-\d{2}-\d{2}: running")


def write_input(directory: str, sessions: int, visitors: int, items: int, seed: int) -> str:
    """Writes the day's sessions under directory (reused when written with the same arguments);
    returns pipeline.run's --input pattern."""
    from pipeline import synthetic

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"ga_sessions_{DATE.replace('-', '')}.json.gz")
    wanted = {"sessions": sessions, "visitors": visitors, "items": items, "seed": seed}
    sidecar = os.path.join(directory, "arguments.json")
    if os.path.exists(sidecar) and os.path.exists(path):
        with open(sidecar) as handle:
            if json.load(handle) == wanted:
                return os.path.join(directory, "ga_sessions_{date_nodash}.json.gz")
    synthetic.write_sessions(
        path, sessions, seed, num_visitors=visitors, num_items=items, date=DATE
    )
    with open(sidecar, "w") as handle:
        json.dump(wanted, handle)
    return os.path.join(directory, "ga_sessions_{date_nodash}.json.gz")


def launch(
    command: list[str], portable: PortableRunner, log_path: str, timeout: float, interval: float
) -> dict:
    """Runs the launcher command while sampling; returns {"returncode", "begin", "end",
    "starts": [(time, stage)], "samples", "workers"} (times: time.monotonic())."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    starts: list[tuple[float, str]] = []
    begin = time.monotonic()
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    sampler = process_memory.RssSampler(
        {
            "launcher": (process.pid, True),
            "job service": (portable.job_service_pid, True),
            "worker pool": (portable.worker_pool_pid, False),
        },
        workers_of=portable.worker_pool_pid,
        interval=interval,
    ).start()

    def read() -> None:
        with open(log_path, "w") as log:
            for line in process.stdout:
                match = STAGE_LINE.search(line)
                if match:
                    starts.append((time.monotonic(), match.group(1)))
                    sampler.sample()  # a stage shorter than the interval gets one too
                log.write(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        returncode = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        logger.error("pipeline.run ran past --timeout %s s: stopping it", timeout)
        stop_process_groups([process])
        returncode = None
    end = time.monotonic()
    reader.join(timeout=10)
    sampler.stop()
    return {
        "returncode": returncode,
        "begin": begin,
        "end": end,
        "starts": starts,
        "samples": sampler.samples,
        "workers": sampler.workers,
    }


def read_shape(run_dir: str, input_path: str) -> dict:
    """The run's data, from its preprocessed/summary.json: "nusers", "nitems",
    "train_interactions", "eval_interactions", "heldout_visitors", "pairs" (every cell, the
    held-out visitors' included), and "buckets", "groups": the preprocessing's shuffle keys;
    "redistributed_bytes": what its preprocessing redistributes (`redistributed_bytes`);
    "grouped_bytes": {"train", "evaluate": the packed rows those jobs group (`grouped_bytes`)}."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline import options

    with open(os.path.join(run_dir, "preprocessed", "summary.json")) as handle:
        summary = json.load(handle)
    keys = ("nusers", "nitems", "train_interactions", "eval_interactions", "heldout_visitors")
    shape = {key: summary.get(key, 0) for key in keys}
    cells = ("eval_interactions", "heldout_foldin_interactions", "heldout_target_interactions")
    shape["pairs"] = shape["train_interactions"] + sum(summary.get(key, 0) for key in cells)
    flags = PipelineOptions(["--input", input_path]).view_as(options.PreprocessOptions)
    shape["buckets"], shape["groups"] = options.shuffle_keys(flags)
    shape["redistributed_bytes"] = redistributed_bytes(input_path)
    shape["grouped_bytes"] = grouped_bytes(os.path.join(run_dir, "preprocessed"))
    return shape


def grouped_bytes(dataset_dir: str) -> dict[str, int]:
    """The bytes of packed rows (`trainer.beam.row_groups.pack_rows`) the distributed jobs
    group by block, from a preprocessed dataset: "train", the larger of its two sides (train
    items_for_user, users_for_item: grouped one after the other), and "evaluate", the train and
    eval items_for_user rows (grouped together). Each file is packed as one bundle would pack
    it, blocks aside: within a few percent of the packs of a few blocks."""
    import glob

    import tensorflow as tf

    from trainer.beam import row_groups
    from transforms import features

    def packed(split: str, name: str) -> int:
        total = 0
        pattern = os.path.join(dataset_dir, split, f"{name}-*{features.TFRECORD_SUFFIX}")
        for path in sorted(glob.glob(pattern)):
            rows, weight = [], 0
            for record in tf.data.TFRecordDataset(path, compression_type="GZIP"):
                rows.append(row_groups.parse_row(record.numpy()))
                weight += rows[-1].indices.size + row_groups.ROW_WEIGHT
                if weight >= row_groups.MAX_PACKED_CELLS:
                    total, rows, weight = total + len(row_groups.pack_rows(rows)), [], 0
            total += len(row_groups.pack_rows(rows)) if rows else 0
        return total

    train_rows = packed(features.TRAIN_DIR, features.ITEMS_FOR_USER)
    train_columns = packed(features.TRAIN_DIR, features.USERS_FOR_ITEM)
    eval_rows = packed(features.EVAL_DIR, features.ITEMS_FOR_USER)
    return {"train": max(train_rows, train_columns), "evaluate": train_rows + eval_rows}


def redistributed_bytes(path: str) -> int:
    """The bytes preprocessing's `ParseEvents` redistributes for a gzip input file: its lines
    (endings stripped, as ReadFromText gives them) in batches of LINES_PER_BATCH, each packed
    by `events.pack_lines`."""
    import gzip

    from pipeline import events

    total, batch = 0, []
    with gzip.open(path, "rb") as handle:
        for line in handle:
            batch.append(line.rstrip(b"\n").removesuffix(b"\r"))
            if len(batch) == events.LINES_PER_BATCH:
                total, batch = total + len(events.pack_lines(batch)), []
    return total + (len(events.pack_lines(batch)) if batch else 0)


def run_size(label: str, counts: dict, args: argparse.Namespace) -> dict:
    """Runs pipeline.run at one size, from a fresh root; returns its shape and stage peaks."""
    directory = os.path.join(args.work_dir, label)
    pattern = write_input(os.path.join(directory, "ga360"), seed=args.seed, **counts)
    root = os.path.join(directory, "root")
    shutil.rmtree(root, ignore_errors=True)  # a fresh run: every stage runs
    flags = [
        "--latent_factors", str(args.latent_factors), "--num_iters", str(args.num_iters),
        "--block_rows", str(args.block_rows), "--factor_exchange", args.factor_exchange,
        "--holdout_visitors", "0.1", "--gate_min_lift", "0",
    ]  # fmt: skip
    log_path = os.path.join(directory, "launcher.log")
    with PortableRunner(pythonpath=REPO) as portable:
        command = [sys.executable, "-m", "pipeline.run", "--date", DATE, "--input", pattern]
        command += ["--root", root, "--distributed", *flags, *portable.flags]
        logger.info("size %s: %s", label, " ".join(command))
        ran = launch(command, portable, log_path, args.timeout, args.interval)
    if ran["returncode"] != 0:
        with open(log_path, errors="replace") as handle:
            tail = handle.read()[-4000:]
        raise RuntimeError(f"size {label}: pipeline.run exited {ran['returncode']}:\n{tail}")
    run_dir = os.path.join(root, "runs", DATE)
    with open(os.path.join(run_dir, "run.json")) as handle:
        record = json.load(handle)
    input_path = pattern.format(date_nodash=DATE.replace("-", ""))
    stages = process_memory.stage_peaks(
        ran["samples"], ran["workers"], ran["starts"], ran["begin"], ran["end"]
    )
    return {
        "label": label,
        "requested": counts,
        "shape": read_shape(run_dir, input_path),
        "seconds": ran["end"] - ran["begin"],
        "run_json_stages": list(record.get("stages", {})),
        "run_status": record.get("status"),
        "stages": stages,
        "workers": {
            str(pid): {"command": seen.command, "peak_mb": seen.peak_bytes / process_memory.MB}
            for pid, seen in ran["workers"].items()
        },
        "samples": len(ran["samples"]),
    }


def median_size(runs: list[dict]) -> dict:
    """Several runs of one size (`run_size`) -> one, each figure the median over the runs: a
    stage's seconds, each named process's peak, and each worker's peak by start order within
    the stage (a stage whose runs started different numbers of workers keeps the workers all
    its runs have). The shape and the rest are the first run's; "runs" counts them."""
    if len(runs) == 1:
        return {**runs[0], "runs": 1}
    first = runs[0]
    stages = {}
    for stage, entry in first["stages"].items():
        entries = [run["stages"][stage] for run in runs if stage in run["stages"]]
        labels = set().union(*(e["peak_mb"] for e in entries))
        workers = [
            {
                "pid": worker["pid"],
                "peak_mb": statistics.median(e["workers"][i]["peak_mb"] for e in entries),
            }
            for i, worker in enumerate(entry["workers"][: min(len(e["workers"]) for e in entries)])
        ]
        stages[stage] = {
            "seconds": statistics.median(e["seconds"] for e in entries),
            "peak_mb": {
                label: statistics.median(
                    e["peak_mb"][label] for e in entries if label in e["peak_mb"]
                )
                for label in sorted(labels)
            },
            "workers": workers,
        }
    return {
        **first,
        "seconds": statistics.median(run["seconds"] for run in runs),
        "stages": stages,
        "runs": len(runs),
    }


def run(argv: list[str] | None = None) -> dict:
    """Runs both sizes; prints the tables and the verdict; returns the result (module doc)."""
    from trainer.beam.layout import DEFAULT_BLOCK_ROWS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=16000, help="sessions of size S")
    parser.add_argument("--visitors", type=int, help="visitors of size S (default sessions / 4)")
    parser.add_argument("--items", type=int, default=2000, help="content items of size S")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latent_factors", type=int, default=32)
    parser.add_argument("--num_iters", type=int, default=3)
    parser.add_argument("--block_rows", type=int, default=512, help="rows per training block")
    parser.add_argument("--factor_exchange", choices=("broadcast", "join"), default="broadcast")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run, at most")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of each size, alternating S and 8S; every figure is the median (default 1)",
    )
    parser.add_argument(
        "--work_dir", help="inputs and runs (default: a temporary directory, removed after)"
    )
    parser.add_argument("--output", help="also write the figures here, as JSON")
    args = parser.parse_args(argv)
    visitors = args.visitors or args.sessions // 4
    if min(args.sessions, visitors, args.items) < 1:
        parser.error("--sessions, --visitors and --items must be >= 1")
    if args.interval <= 0 or args.timeout <= 0:
        parser.error("--interval and --timeout must be > 0")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    try:
        import psutil  # noqa: F401
    except ImportError:
        parser.error("needs psutil, from the bench extra: pip install -e '.[bench]'")
    temporary = args.work_dir is None
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="scale_benchmark-")
    try:
        runs: dict[str, list[dict]] = {"S": [], f"{FACTOR}S": []}
        for _ in range(args.repeats):
            for label, factor in (("S", 1), (f"{FACTOR}S", FACTOR)):
                counts = {
                    "sessions": args.sessions * factor,
                    "visitors": visitors * factor,
                    "items": args.items * factor,
                }
                runs[label].append(run_size(label, counts, args))
        sizes = [median_size(label_runs) for label_runs in runs.values()]
    finally:
        if temporary:
            shutil.rmtree(args.work_dir, ignore_errors=True)
    flags = {
        key: getattr(args, key)
        for key in ("latent_factors", "num_iters", "block_rows", "factor_exchange", "interval")
    }
    # The evaluation's, new visitors' and batch_predict's block (pipeline.run sets none).
    flags["eval_block_rows"] = DEFAULT_BLOCK_ROWS
    result = scale_report.compare(
        *sizes,
        flags=flags,
        launcher_limit_mb=LAUNCHER_GROWTH_MB,
        runner=worker_bounds.LOCAL_PORTABLE,
    )
    result["cores"] = os.cpu_count()
    result["load_average"] = os.getloadavg()
    print(format_header(result))
    print(scale_report.format_report(result))
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


def format_header(result: dict) -> str:
    flags = result["flags"]
    return (
        f"pipeline.run --distributed on the portable runner (EXTERNAL workers), k="
        f"{flags['latent_factors']}, {flags['num_iters']} iterations, --block_rows "
        f"{flags['block_rows']}, {flags['factor_exchange']}; RSS sampled every "
        f"{flags['interval']} s; {result['cores']} cores, load average at the end "
        f"{result['load_average'][0]:.1f}; peak RSS in MB"
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run()
