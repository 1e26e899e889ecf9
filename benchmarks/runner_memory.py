"""Which fused stage of a pipeline makes the SDK worker and the job service grow, on Beam's
local portable runner, at two sizes 8x apart.

    python -m benchmarks.runner_memory [--pipeline preprocess|bare|evaluate|train] \\
        [--sessions 16000] [--visitors N] [--items 2000] [--factor 8] [--work_dir DIR] \\
        [--output results.json] [--roots S_ROOT,8S_ROOT] [-- extra flags for the pipeline]

The pipeline is `pipeline.preprocess` (--holdout_visitors 0.1 as `pipeline.run` runs it, plus
the extra flags) or `benchmarks.bare_beam_reference` (plain Beam: read, parse, sum per pair,
group by visitor and by content, write TFRecords), run on the synthetic day of
`benchmarks.scale` (size S: --sessions, --visitors, --items; size 8S: --factor times each);
or, on copies of the preprocessed data and trained model of two roots `benchmarks.scale` kept
(--roots, S's then 8S's), `trainer.beam.eval_pipeline.evaluate_model_distributed` (`evaluate`:
the evaluation inside training and the gate's) or `trainer.task --distributed` (`train`: its
train, evaluate and new-visitor jobs, one worker each; e.g. `-- --num_iters 1`; the sizes'
--sessions, --visitors and --items are then unused),
against a job service (`benchmarks.logged_job_service`) and an EXTERNAL worker pool
(`benchmarks.portable_services`). The FnApiRunner in the job service runs one fused stage at a
time, each as one bundle on the one SDK worker; the service's log says when each stage's bundle
starts. The RSS of the job service and of the worker is sampled every --interval s
(`benchmarks.process_memory`) and attributed to the stage running then:

    peak   the process's largest RSS while the stage runs
    rise   peak - the RSS when the stage started: what the stage added (RSS seldom shrinks, so
           a stage that reuses memory an earlier one freed shows no rise)

The table lists the stages whose rise at 8S is largest, with their rise at S (the same fused
stage: the same transforms); then each
process's whole-run peak at both sizes and its growth per 8x.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks import process_memory, scale
from benchmarks.portable_services import PortableRunner, stop_process_groups

logger = logging.getLogger(__name__)

REPO = scale.REPO
BUNDLE_LINE = re.compile(r"^(\d+\.\d+) \S+ Running bundle for stage (.+)$")
PROCESSES = ("worker", "job service")
KEPT_ROOT_PIPELINES = ("evaluate", "train")  # run on --roots, not on a synthetic day


EVALUATE = (
    "import sys; from trainer.beam.eval_pipeline import evaluate_model_distributed as e; "
    "print(e(sys.argv[2], sys.argv[1], sys.argv[3:]))"
)


def pipeline_command(pipeline: str, input_path: str, output_dir: str, extra: list[str]) -> list:
    """The command line of one run (module doc), Beam's runner flags excepted; for `evaluate`,
    `input_path` is the preprocessed dataset and `output_dir` the train dir holding model/."""
    if pipeline == "evaluate":
        return [sys.executable, "-c", EVALUATE, input_path, output_dir, *extra]
    if pipeline == "train":
        return [sys.executable, "-m", "trainer.task", "--input_dir", input_path, "--output_dir",
                output_dir, "--distributed", *extra]  # fmt: skip
    if pipeline == "preprocess":
        module = ["pipeline.preprocess", "--holdout_visitors", "0.1"]
    elif pipeline == "bare":
        module = ["benchmarks.bare_beam_reference"]
    else:
        raise ValueError(f"unknown pipeline {pipeline!r}")
    return [
        sys.executable,
        "-m",
        *module,
        "--input",
        input_path,
        "--output_dir",
        output_dir,
        *extra,
    ]


def bundle_starts(log_text: str, offset: float) -> list[tuple[float, str]]:
    """The job service log's bundle starts as (time.monotonic(), stage name); `offset`:
    time.time() - time.monotonic() in this process."""
    starts = []
    for line in log_text.splitlines():
        match = BUNDLE_LINE.match(line)
        if match:
            starts.append((float(match.group(1)) - offset, match.group(2)))
    return starts


def stage_rises(samples: list, starts: list[tuple[float, str]], end: float) -> list[dict]:
    """Per bundle, in run order: {"stage", "seconds", "<process> peak_mb", "<process> rise_mb"}
    for PROCESSES (the worker's RSS: the sum over the pool's children)."""

    def rss(sample: dict) -> dict[str, float]:
        workers = sum(v for k, v in sample.items() if k.startswith(f"{process_memory.WORKER}:"))
        return {"worker": workers / process_memory.MB,
                "job service": sample.get("job service", 0) / process_memory.MB}  # fmt: skip

    out = []
    bounds = [t for t, _ in starts] + [end]
    for i, (start, stage) in enumerate(starts):
        before = [rss(s) for t, s in samples if t <= start]
        during = [rss(s) for t, s in samples if start <= t < bounds[i + 1]]
        entry = {"stage": stage, "seconds": bounds[i + 1] - start}
        for name in PROCESSES:
            base = before[-1][name] if before else 0.0
            peak = max([base] + [s[name] for s in during])
            entry[f"{name} peak_mb"] = peak
            entry[f"{name} rise_mb"] = peak - base
        out.append(entry)
    return out


def stage_key(stage: str) -> str:
    """A fused stage's transforms, sorted, without the numbers Beam appends to them and its
    PCollection reads/writes: its name lists them in an order, and numbers them, in ways that
    may differ between two runs of the same graph ("((A_7)+(B_8))+(ref_PCollection_3/Write)")."""
    parts = {re.sub(r"_\d+$", "", part) for part in re.split(r"[()+]", stage) if part}
    return " ".join(sorted(part for part in parts if not part.startswith("ref_PCollection")))


def input_bytes(path: str) -> int:
    """A file's size, or the sum of a directory tree's files' sizes."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def copy_run(root: str, directory: str) -> tuple[str, str]:
    """Copies the one run of a kept `benchmarks.scale` root's preprocessed data and model into
    `directory` (the evaluation writes its scratch next to the model, training its output; the
    root is left as it is); returns (dataset dir, train dir)."""
    (run,) = os.listdir(os.path.join(root, "runs"))
    source = os.path.join(root, "runs", run)
    dataset, train = os.path.join(directory, "preprocessed"), os.path.join(directory, "train")
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(f"{source}/preprocessed", dataset)
    shutil.copytree(f"{source}/train/model", f"{train}/model")
    return dataset, train


def run_size(label: str, counts: dict, args: argparse.Namespace) -> dict:
    """One run at one size; returns its per-stage figures and whole-run peaks."""
    directory = os.path.join(args.work_dir, label)
    if args.pipeline in KEPT_ROOT_PIPELINES:
        input_path, output_dir = copy_run(args.roots[label], directory)
        if args.pipeline == "train":
            output_dir = os.path.join(directory, "out-train")
    else:
        pattern = scale.write_input(os.path.join(directory, "ga360"), seed=args.seed, **counts)
        input_path = pattern.format(date_nodash=scale.DATE.replace("-", ""))
        output_dir = os.path.join(directory, f"out-{args.pipeline}")
        shutil.rmtree(output_dir, ignore_errors=True)
    service = "benchmarks.logged_job_service"
    with PortableRunner(pythonpath=REPO, job_service_module=service) as portable:
        command = pipeline_command(args.pipeline, input_path, output_dir, args.extra)
        command += portable.flags
        logger.info("size %s: %s", label, " ".join(command))
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": REPO}
        offset = time.time() - time.monotonic()
        begin = time.monotonic()
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        sampler = process_memory.RssSampler(
            {"launcher": (process.pid, True), "job service": (portable.job_service_pid, True)},
            workers_of=portable.worker_pool_pid,
            interval=args.interval,
        ).start()
        try:
            output, _ = process.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            stop_process_groups([process])
            output = b""
        end = time.monotonic()
        sampler.stop()
        with open(portable.job_service_log, errors="replace") as handle:
            log_text = handle.read()
    if process.returncode != 0:
        raise RuntimeError(f"size {label} exited {process.returncode}:\n{output[-4000:]!r}")
    starts = bundle_starts(log_text, offset)
    peaks = process_memory.stage_peaks(sampler.samples, sampler.workers, [], begin, end)
    whole = peaks[process_memory.WHOLE_RUN]["peak_mb"]
    return {
        "label": label,
        "requested": counts,
        "input_bytes": input_bytes(input_path),
        "seconds": end - begin,
        "stages": stage_rises(sampler.samples, starts, end),
        "peak_mb": {
            "worker": whole.get(process_memory.WORKER),
            "job service": whole["job service"],
            "launcher": whole["launcher"],
        },  # fmt: skip
        "workers": len(sampler.workers),
    }


def format_report(small: dict, big: dict, top: int) -> str:
    """The tables of the module doc."""
    lines = [
        f"{size['label']}: {size['requested']}, input {size['input_bytes'] / 2**20:.1f} MB, "
        f"{size['seconds']:.0f} s, {len(size['stages'])} bundles, {size['workers']} workers"
        for size in (small, big)
    ]
    rises = {stage_key(entry["stage"]): entry for entry in small["stages"]}
    for name in PROCESSES:
        lines.append(f"\n{name}: the {top} stages with the largest rise at {big['label']} (MB)")
        lines.append(f"  {'rise S':>8} {'rise 8S':>8} {'peak 8S':>8} {'s 8S':>6}  stage")
        ranked = sorted(big["stages"], key=lambda e: -e[f"{name} rise_mb"])[:top]
        for entry in ranked:
            before = rises.get(stage_key(entry["stage"]), {}).get(f"{name} rise_mb")
            text = f"{before:>8.0f}" if before is not None else f"{'-':>8}"
            lines.append(
                f"  {text} {entry[f'{name} rise_mb']:>8.0f} {entry[f'{name} peak_mb']:>8.0f} "
                f"{entry['seconds']:>6.1f}  {entry['stage'][:110]}"
            )
    lines.append(f"\nwhole run, peak MB: {'S':>8} {'8S':>8} {'growth':>8}")
    for name in (*PROCESSES, "launcher"):
        a, b = small["peak_mb"].get(name) or 0.0, big["peak_mb"].get(name) or 0.0
        lines.append(f"  {name:<17} {a:>8.0f} {b:>8.0f} {b - a:>+8.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pipeline", choices=("preprocess", "bare", *KEPT_ROOT_PIPELINES), default="preprocess"
    )
    parser.add_argument(
        "--roots", help="evaluate, train: the kept roots of size S and 8S, S_ROOT,8S_ROOT"
    )
    parser.add_argument("--sessions", type=int, default=16000)
    parser.add_argument("--visitors", type=int, help="default sessions / 4")
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--factor", type=int, default=scale.FACTOR, help="size 8S / size S")
    parser.add_argument("--sizes", default="S,8S", help="which sizes to run (S, 8S or both)")
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--top", type=int, default=8, help="stages listed per process")
    parser.add_argument("--work_dir", help="inputs and outputs (default: temporary)")
    parser.add_argument("--output", help="also write the figures here, as JSON")
    parser.add_argument("extra", nargs="*", help="after --: flags for the pipeline")
    args = parser.parse_args(argv)
    if (args.pipeline in KEPT_ROOT_PIPELINES) != bool(args.roots):
        parser.error(f"--roots is needed by --pipeline {'/'.join(KEPT_ROOT_PIPELINES)} only")
    if args.roots:
        args.roots = dict(zip(("S", "8S"), args.roots.split(","), strict=True))
    visitors = args.visitors or args.sessions // 4
    temporary = args.work_dir is None
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="runner_memory-")
    sizes = {}
    try:
        for label, factor in (("S", 1), ("8S", args.factor)):
            if label not in args.sizes.split(","):
                continue
            counts = {"sessions": args.sessions * factor, "visitors": visitors * factor,
                      "items": args.items * factor}  # fmt: skip
            sizes[label] = run_size(label, counts, args)
    finally:
        if temporary:
            shutil.rmtree(args.work_dir, ignore_errors=True)
    if len(sizes) == 2:
        print(format_report(sizes["S"], sizes["8S"], args.top))
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(sizes, handle, indent=2)
    return sizes


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    main()
