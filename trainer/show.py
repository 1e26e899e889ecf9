"""Prints what a training run produced: the metrics table, a few visitors' recommendations next
to what they read, and an answer from the exported SavedModel.

    python -m trainer.show MODEL_DIR [--predictions recs.tsv] [--visitors 3]

The predictions may be per visitor or, written with --targeting, per content; their keys need
not be in the model. Next to each visitor's recommendations, "seen" lists what that visitor read
most in training (their highest ratings first, `WALSModel.most_read`); next to each content's,
"read by" lists the visitors who read it most.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import numpy as np
import tensorflow as tf
from apache_beam.io.filesystems import FileSystems

from common import cli
from trainer.core import topk
from trainer.serving import model as model_lib
from trainer.serving.predictions import read_predictions
from trainer.training import METRICS_FILE, format_metrics

SHOWN = 8  # IDs shown of a visitor's history or a content's readers


def _block(key: str, label: str, history: list[str], ranked: list[str], index: int | None) -> str:
    """A few lines about one predictions row; `index` None: the model does not know `key`."""
    if index is None:
        past = "(not in this model)"
    else:
        past = ", ".join(history[:SHOWN]) + (" ..." if len(history) > SHOWN else "")
    return f"  {key}\n    {label + ':':<13}{past}\n    {'recommended:':<13}{', '.join(ranked)}\n"


def top_readers(model: model_lib.WALSModel, item: int) -> np.ndarray:
    """int64 [n] the userIds who read `item` in training, highest rating first (ties: lower
    userId), or in userId order for a model saved without ratings."""
    cells = np.flatnonzero(model.seen_indices == item)
    readers = np.searchsorted(model.seen_indptr, cells, side="right") - 1
    if model.seen_values is None or cells.size == 0:
        return readers
    # Cells are in userId order, so ranking positions breaks ties by the lower userId.
    order, _ = topk.top_k_excluding(model.seen_values[None, cells], None, cells.size)
    return readers[order[0]]


def show(model_dir: str, predictions: str | None = None, visitors: int = 3, out=None) -> None:
    """Writes the summary to `out` (default: sys.stdout).

    Raises:
        cli.UsageError: model_dir holds no finished model, or predictions is not a
            `trainer.batch_predict` output.
    """
    write = (out or sys.stdout).write
    if not FileSystems.exists(f"{model_dir}/{METRICS_FILE}"):
        raise cli.UsageError(f"no finished trained model in {model_dir} (no {METRICS_FILE})")
    with FileSystems.open(f"{model_dir}/{METRICS_FILE}") as handle:
        result = json.load(handle)
    config = result["config"]
    write(
        f"model {model_dir}: {result['nusers']:,} users x {result['nitems']:,} items, "
        f"k={config['latent_factors']}, {config['num_iters']} iterations, "
        f"{result['seconds_per_iteration']:.3f} s/iteration\n"
    )
    # The loss is in the iterations that computed it (trainer.task --loss_every).
    losses = [h for h in result.get("history") or [] if "loss/total" in h]
    if losses:
        pairs = [f"{h['iteration']}: {h['loss/total']:.4g}" for h in losses]
        write(f"training loss (iteration: loss): {', '.join(pairs)}\n")
    write(format_metrics(result) + "\n")

    model = model_lib.load(model_dir)
    rows = []
    if predictions:
        try:
            rows = list(itertools.islice(read_predictions(predictions), visitors))
        except (ValueError, KeyError) as error:
            raise cli.UsageError(f"--predictions {predictions}: {error}") from None
    if rows and rows[0].targeting:
        write(f"\ntargeting for {len(rows)} contents (read by: who read it most in training)\n")
        for row in rows:
            item = model.item_index(row.key)
            readers = [] if item is None else [model.users[u] for u in top_readers(model, item)]
            write(_block(row.key, "read by", readers, row.ranked, item))
    elif rows:
        write(
            f"\nrecommendations for {len(rows)} visitors (seen: what they read most in training)\n"
        )
        for row in rows:
            user = model.user_index(row.key)
            seen = [] if user is None else [model.items[i] for i in model.most_read(user)]
            write(_block(row.key, "seen", seen, row.ranked, user))

    loaded = tf.saved_model.load(f"{model_dir}/export")
    serve = loaded.signatures["serving_default"]
    asked = [model.users[0], "a-visitor-never-seen"]
    answer = serve(visitorId=tf.constant(asked))
    write("\nSavedModel serving_default:\n")
    for row, visitor in enumerate(asked):
        ids = [c.decode() for c in answer["contentIds"][row].numpy()[:5]]
        known = bool(answer["known"][row].numpy())
        write(f"  {visitor} (known={known}): {', '.join(ids)} ...\n")


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.show", description=__doc__.splitlines()[0]
    )
    parser.add_argument("model_dir", help="a trainer.task --output_dir")
    parser.add_argument(
        "--predictions", help="a trainer.batch_predict output (TSV, or JSONL if named *.jsonl)"
    )
    parser.add_argument("--visitors", type=int, default=3, help="how many predictions to show")
    args = parser.parse_args(argv)
    show(args.model_dir.rstrip("/"), args.predictions, args.visitors)


def main(argv: list[str] | None = None) -> int:
    return cli.main_with_usage_errors(run, argv)


if __name__ == "__main__":
    sys.exit(main())
