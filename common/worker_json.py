"""One JSON value that a pipeline's workers leave for its launcher, in a file.

    PCollection of one element | WriteJson(path)   -> `path` holds json.dumps(element)
    read_json(path)                                -> the element, after the run

The launcher reads a handful of figures (metrics, counts) that workers computed, without any
process but a worker touching the data: the workers write them to a scratch file
(`common.locations.scratch_dir`, local or gs://) and the launcher reads it once the run is
done. One shard, no shard name: `path` is the file.
"""

from __future__ import annotations

import json

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems


class WriteJson(beam.PTransform):
    """PCollection of one JSON-serialisable element -> the file `path` holding it (one line)."""

    def __init__(self, path: str, sort_keys: bool = False):
        super().__init__()
        self._path, self._sort_keys = path, sort_keys

    def expand(self, values):
        return (
            values
            | "ToJson" >> beam.Map(json.dumps, sort_keys=self._sort_keys)
            | "Write" >> beam.io.WriteToText(self._path, num_shards=1, shard_name_template="")
        )


def read_json(path: str):
    """The element `WriteJson` wrote to `path` (local or any Beam filesystem)."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return json.loads(handle.read().decode("utf-8"))
