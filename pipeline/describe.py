"""Prints what a preprocessing run produced: sizes, counters, files and a few rows.

python -m pipeline.describe PREPROCESSED_DIR [--rows 3]
"""

from __future__ import annotations

import argparse
import json
import sys

import tensorflow as tf
import tensorflow_transform as tft
from apache_beam.io.filesystems import FileSystems

from transforms import examples, features


def describe(directory: str, rows: int = 3, out=sys.stdout) -> None:
    directory = directory.rstrip("/")
    with FileSystems.open(f"{directory}/{features.SUMMARY_FILE}") as handle:
        summary = json.load(handle)
    counters = summary["counters"]
    write = out.write
    write(f"preprocessed dataset {directory}\n")
    write(f"  input            {summary['input']} ({summary['input_format']})\n")
    write(f"  matrix           {summary['nusers']:,} users x {summary['nitems']:,} items\n")
    write(
        f"  train / eval     {summary['train_interactions']:,} / "
        f"{summary['eval_interactions']:,} interactions "
        f"({summary['eval_dropped_unknown']:,} eval pairs dropped: unknown user or item)\n"
    )
    write(f"  scaling          {summary['scaling']} {summary['scale_stats']}\n")
    write(
        f"  lines read       {counters.get('lines_read', 0):,}: "
        f"{counters.get('records_parsed', 0):,} parsed, "
        f"{counters.get('lines_rejected', 0):,} rejected {counters['rejected_by_reason']}\n"
    )
    if "page_hits" in counters:
        write(
            f"  hits             {counters.get('hits', 0):,}, of which PAGE "
            f"{counters['page_hits']:,} -> {counters.get('events', 0):,} events\n"
        )
    write("  files\n")
    for pattern in ("train/*", "eval/*", "rejected/*", "transform_fn/assets/*"):
        for metadata in FileSystems.match([f"{directory}/{pattern}"])[0].metadata_list:
            write(
                f"    {metadata.path[len(directory) + 1 :]:<52} {metadata.size_in_bytes:>12,} B\n"
            )
    output = tft.TFTransformOutput(directory)
    users = output.vocabulary_by_name(features.USER_VOCAB)
    items = output.vocabulary_by_name(features.ITEM_VOCAB)
    pattern = f"{directory}/{features.TRAIN_DIR}/{features.ITEMS_FOR_USER}-*"
    files = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    write(f"  first {rows} rows of train/{features.ITEMS_FOR_USER} (contentId:rating)\n")
    dataset = tf.data.TFRecordDataset(files, compression_type="GZIP").take(rows)
    for record in dataset:
        key, indices, values = examples.parse_sparse_example(record.numpy())
        cells = ", ".join(f"{items[i].decode()}:{v:.2f}" for i, v in list(zip(indices, values))[:6])
        more = f" ... ({len(indices)} items)" if len(indices) > 6 else ""
        write(f"    {users[key].decode()} (userId {key}): {cells}{more}\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="the preprocessing --output_dir")
    parser.add_argument("--rows", type=int, default=3, help="how many matrix rows to show")
    args = parser.parse_args(argv)
    describe(args.directory, args.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
