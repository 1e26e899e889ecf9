"""How many iterations a warm-started nightly run needs, against a cold run with the defaults.

    python -m benchmarks.warm_start --work_dir /tmp/warm --sessions 20000 --visitors 6000 \\
        --items 2000 --days 4

Writes one synthetic export per day (`pipeline.synthetic --date`: the same visitors and content
every day, new sessions), preprocesses each day, and for each pair of consecutive days trains
day d three times with `--eval_every 1`: the model of day d-1 (cold, default iterations); day d
cold with the default iterations; day d warm-started from day d-1's model. It prints, per day,
the cold run's final Recall@20 and the first iteration at which each run reaches it exactly
and within 1%. `pipeline.scheduled.flags.WARM_NUM_ITERS` was set from this.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os

from pipeline import preprocess, synthetic
from trainer import task

logger = logging.getLogger(__name__)


def _first(curve: list[float], target: float) -> int | None:
    return next((i + 1 for i, value in enumerate(curve) if value >= target), None)


def measure(args: argparse.Namespace) -> list[dict]:
    start = datetime.date.fromisoformat(args.start_date)
    dates = [(start + datetime.timedelta(days=n)).isoformat() for n in range(args.days)]
    for date in dates:
        export = f"{args.work_dir}/ga360/ga_sessions_{date.replace('-', '')}.json.gz"
        os.makedirs(os.path.dirname(export), exist_ok=True)
        if not os.path.exists(export):
            synthetic.write_sessions(
                export, args.sessions, args.seed, args.visitors, args.items, date=date
            )
        preprocessed = f"{args.work_dir}/preprocessed/{date}"
        if not os.path.exists(f"{preprocessed}/summary.json"):
            preprocess.run(["--input", export, "--output_dir", preprocessed])

    def train(date: str, name: str, warm: str | None = None) -> dict:
        argv = [
            "--input_dir",
            f"{args.work_dir}/preprocessed/{date}",
            "--output_dir",
            f"{args.work_dir}/models/{name}",
            "--overwrite",
            "--no_progress",
            "--eval_every",
            "1",
            "--eval_ks",
            "20",
            "--loss_every",
            "0",
            "--latent_factors",
            str(args.latent_factors),
        ]
        return task.run(argv + (["--warm_start_from", warm] if warm else []))

    rows = []
    for before, date in zip(dates, dates[1:]):
        train(before, before)
        cold = train(date, f"{date}-cold")
        warm = train(date, f"{date}-warm", warm=f"{args.work_dir}/models/{before}")
        target = cold["wals"]["recall@20"]
        curves = {
            name: [entry["eval/recall@20"] for entry in result["history"]]
            for name, result in (("cold", cold), ("warm", warm))
        }
        row = {"date": date, "cold_recall@20": round(target, 4)}
        for name, curve in curves.items():
            row[f"{name}_iters_to_reach"] = _first(curve, target)
            row[f"{name}_iters_within_1pct"] = _first(curve, 0.99 * target)
            row[f"{name}_curve"] = [round(value, 4) for value in curve[:8]]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", required=True)
    parser.add_argument("--sessions", type=int, default=20_000, help="sessions per day")
    parser.add_argument("--visitors", type=int, default=6_000)
    parser.add_argument("--items", type=int, default=2_000)
    parser.add_argument("--days", type=int, default=4)
    parser.add_argument("--start_date", default="2017-08-01")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--latent_factors", type=int, default=32)
    logging.basicConfig(level=logging.WARNING)
    measure(parser.parse_args(argv))


if __name__ == "__main__":
    main()
