"""Prints what a training run produced: the metrics table, a few visitors' recommendations next
to what they read, and an answer from the exported SavedModel.

    python -m trainer.show MODEL_DIR [--predictions recs.tsv] [--visitors 3]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import tensorflow as tf
from apache_beam.io.filesystems import FileSystems

from trainer import model as model_lib
from trainer.task import METRICS_FILE, format_metrics


def show(model_dir: str, predictions: str | None = None, visitors: int = 3, out=sys.stdout):
    write = out.write
    with FileSystems.open(f"{model_dir}/{METRICS_FILE}") as handle:
        result = json.load(handle)
    config = result["config"]
    write(
        f"model {model_dir}: {result['nusers']:,} users x {result['nitems']:,} items, "
        f"k={config['latent_factors']}, {config['num_iters']} iterations, "
        f"{result['seconds_per_iteration']:.3f} s/iteration\n"
    )
    history = result.get("history") or []
    if history:
        losses = [f"{h['loss/total']:.4g}" for h in history]
        write(f"training loss by iteration: {' '.join(losses)}\n")
    write(format_metrics(result) + "\n")

    model = model_lib.load(model_dir)
    write(f"\nrecommendations for {visitors} visitors (seen: what they read in training)\n")
    lines = []
    if predictions:
        with FileSystems.open(predictions) as handle:
            lines = [
                line.decode("utf-8").rstrip("\n") for line in itertools.islice(handle, visitors)
            ]
    for line in lines:
        visitor, ranked = line.split("\t")
        seen = [model.items[i] for i in model.seen(model.user_index(visitor))]
        write(
            f"  {visitor}\n    seen:        {', '.join(seen[:8])}"
            f"{' ...' if len(seen) > 8 else ''}\n    recommended: {ranked.replace(',', ', ')}\n"
        )

    loaded = tf.saved_model.load(f"{model_dir}/export")
    serve = loaded.signatures["serving_default"]
    asked = [model.users[0], "a-visitor-never-seen"]
    answer = serve(visitorId=tf.constant(asked))
    write("\nSavedModel serving_default:\n")
    for row, visitor in enumerate(asked):
        ids = [c.decode() for c in answer["contentIds"][row].numpy()[:5]]
        known = bool(answer["known"][row].numpy())
        write(f"  {visitor} (known={known}): {', '.join(ids)} ...\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="a trainer.task --output_dir")
    parser.add_argument("--predictions", help="a trainer.batch_predict TSV output")
    parser.add_argument("--visitors", type=int, default=3)
    args = parser.parse_args(argv)
    show(args.model_dir.rstrip("/"), args.predictions, args.visitors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
