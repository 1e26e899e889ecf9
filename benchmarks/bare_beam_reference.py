r"""The bare Beam pipeline the preprocessing benchmark compares against: no TF Transform.

The same parse (`pipeline.records.session_events`), per-pair sum, grouping by visitor and by
content and gzip TFRecord writes as `pipeline.preprocess`, written the plain way a Beam user
would write it, without vocabularies, scaling or a train/eval split: rows and columns are keyed
by the raw IDs (bytes) instead of vocabulary indices.

    ReadLines | ParseEvents | KeyByPair | SumPerPair | DropNonPositive -> pairs
    pairs | KeyByVisitor | GroupByVisitor | EncodeRows | WriteRows
    pairs | KeyByContent | GroupByContent | EncodeColumns | WriteColumns

    python -m benchmarks.bare_beam_reference --input FILE.json.gz --output_dir DIR \
        [any Beam pipeline option]
"""

from __future__ import annotations

import argparse
import logging
import sys

import apache_beam as beam
import tensorflow as tf
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline import records
from transforms import features

logger = logging.getLogger(__name__)
_CONFIG = records.SessionConfig()


def parse(line: bytes):
    """A session line -> its (visitorId, contentId, duration_ms) events; bad lines yield none."""
    try:
        events, _, _ = records.session_events(line, _CONFIG)
    except records.Rejected:
        return []
    return events


def encode(key: str, entries) -> bytes:
    """One row or column as a tf.train.Example: key bytes[1], indices bytes[n], values float[n]."""
    entries = sorted(entries)
    example = tf.train.Example(
        features=tf.train.Features(
            feature={
                features.KEY: tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[key.encode("utf-8")])
                ),
                features.INDICES: tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[i.encode("utf-8") for i, _ in entries])
                ),
                features.VALUES: tf.train.Feature(
                    float_list=tf.train.FloatList(value=[v for _, v in entries])
                ),
            }
        )
    )
    return example.SerializeToString()


def build(p: beam.Pipeline, input_pattern: str, output_dir: str) -> None:
    pairs = (
        p
        | "ReadLines" >> beam.io.ReadFromText(input_pattern, coder=beam.coders.BytesCoder())
        | "ParseEvents" >> beam.FlatMap(parse)
        | "KeyByPair" >> beam.Map(lambda event: ((event[0], event[1]), event[2]))
        | "SumPerPair" >> beam.CombinePerKey(sum)
        | "DropNonPositive" >> beam.Filter(lambda kv: kv[1] > 0)
    )
    for label, name, key_index in (
        ("Visitor", features.ITEMS_FOR_USER, 0),
        ("Content", features.USERS_FOR_ITEM, 1),
    ):
        _ = (
            pairs
            | f"KeyBy{label}" >> beam.Map(lambda kv, k=key_index: (kv[0][k], (kv[0][1 - k], kv[1])))
            | f"GroupBy{label}" >> beam.GroupByKey()
            | f"Encode{label}" >> beam.MapTuple(encode)
            | f"Write{label}"
            >> beam.io.WriteToTFRecord(
                f"{output_dir}/{name}",
                file_name_suffix=features.TFRECORD_SUFFIX,
                compression_type=CompressionTypes.GZIP,
            )
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--output_dir", required=True)
    args, beam_args = parser.parse_known_args(argv)
    with beam.Pipeline(options=PipelineOptions(beam_args)) as p:
        build(p, args.input, args.output_dir)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main(sys.argv[1:])
