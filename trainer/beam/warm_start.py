"""A warm start on the workers: initial factors from an earlier model, matched by original ID.

    root | WarmStartRows(spec, side)
        -> PCollection[tuple[int, tuple[np.ndarray, np.ndarray]]]
           (block_id, (rows int64 [m], factors float32 [m, k])): the rows of this run's
           vocabulary whose ID the earlier model (`spec.warm_start`) knows, with its factors

As in `trainer.local.warm_start`: a row the earlier model knew starts from its trained factors,
any other from its seeded ones (`trainer.beam.side_state.InitialFactors` seeds every row, then
puts these in). Vocabulary indices change between runs, so rows are joined by ID, a hash join
in batches:

    this run's vocabulary  ─ _StreamIds ─> (shard, (IDs, rows))           shard = crc32(ID) mod S
    the earlier vocabulary ─ _StreamIds ─> (shard, (IDs, earlier rows))
        | CoGroupByKey(shard) | match IDs ─> (part, (earlier rows, rows))
                                             part = earlier row // part_rows
        | GroupByKey(part) | read those rows of the earlier factors (`read_npy_rows`: a seek)
                           ─> (block, (rows, factors)), block = this run's `BlockLayout.block_of`
    matched rows Σ |rows| ─> <checkpoint_dir>/warm-start/<side>.json (`write_warm_matches`)

A shard holds about `SHARD_ROWS` IDs of each vocabulary (an ID the earlier vocabulary holds twice
maps to its last row, as a dict built in file order does); a part about
`model_parts.PART_BYTES` of the earlier factors.

`describe` is the launcher's part: the earlier model's k from its .npy header, checked, and a
digest for the checkpoint's fingerprint from its directory, config.json and arrays' shapes (no
factor is read).
"""

from __future__ import annotations

import hashlib
import json
import typing
import zlib

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from trainer.beam import checkpoint_files as files
from trainer.beam import model_parts as parts_lib
from trainer.beam.model_blocks import model_file, read_npy_rows
from trainer.beam.spec import TrainSpec
from trainer.core.sides import Side
from trainer.serving import model as model_lib

# IDs of one vocabulary per shard: a shard's join holds about this many of each in memory.
SHARD_ROWS = 1 << 20
# IDs buffered per shard before they leave the streaming worker as one element.
_FLUSH_IDS = 1 << 14


def describe(model_dir: str, k: int) -> str:
    """The digest of the earlier model in `model_dir` for a warm start of k factors: SHA-256 of
    its directory, config.json and factor arrays' shapes (their headers alone are read).

    Raises:
        FileNotFoundError: model_dir holds no trained model.
        ValueError: the model has another number of latent factors.
    """
    config = model_lib.read_config(model_dir)
    shapes = {
        name: model_lib.array_shape(model_dir, name) for name in ("user_factors", "item_factors")
    }
    if shapes["item_factors"][1] != k:
        raise ValueError(
            f"cannot warm start from {model_dir}: it has k={shapes['item_factors'][1]} "
            f"latent factors, this run {k}"
        )
    text = json.dumps({"model": model_dir, "config": config, "shapes": shapes}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class _StreamIds(beam.DoFn):
    """A vocabulary's path -> (shard, (IDs list[bytes], rows int64 [m])), every line once."""

    def __init__(self, shards: int):
        self._shards = shards

    def process(self, path: str):
        ids = [[] for _ in range(self._shards)]
        rows = [[] for _ in range(self._shards)]
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            for row, line in enumerate(handle):  # binary: split on b"\n" only
                value = line.removesuffix(b"\n")
                shard = zlib.crc32(value) % self._shards
                ids[shard].append(value)
                rows[shard].append(row)
                if len(rows[shard]) == _FLUSH_IDS:
                    yield shard, (ids[shard], np.asarray(rows[shard], np.int64))
                    ids[shard], rows[shard] = [], []
        for shard in range(self._shards):
            if rows[shard]:
                yield shard, (ids[shard], np.asarray(rows[shard], np.int64))


@beam.typehints.with_output_types(tuple[int, typing.Any])  # the main output's; tagged: ints
class _Match(beam.DoFn):
    """(shard, {"new": batches, "earlier": batches}) -> (part, (earlier rows, rows)) by part of
    the earlier rows; (tag "matched") the number of rows matched."""

    def __init__(self, part_rows: int):
        self._part_rows = part_rows

    def process(self, element):
        _, grouped = element
        earlier = sorted(
            (int(row), value)
            for values, rows in grouped["earlier"]
            for value, row in zip(values, rows.tolist())
        )
        known = {value: row for row, value in earlier}  # a repeated ID: its last row
        matched_new, matched_old = [], []
        for values, rows in grouped["new"]:
            for value, row in zip(values, rows.tolist()):
                old = known.get(value)
                if old is not None:
                    matched_new.append(row)
                    matched_old.append(old)
        new = np.asarray(matched_new, np.int64)
        old = np.asarray(matched_old, np.int64)
        for part, positions in parts_lib.split_rows(old, self._part_rows):
            yield part, (old[positions], new[positions])
        yield beam.pvalue.TaggedOutput("matched", int(new.size))


class _ReadEarlier(beam.DoFn):
    """(part, [(earlier rows, rows)]) -> (block, (rows, factors float32 [m, k])), the earlier
    factors of the matched rows, read from the earlier model's .npy by one seek per part."""

    def __init__(self, path: str, spec: TrainSpec, side: Side):
        self._path = path
        self._layout = spec.layout(side)

    def process(self, element):
        _, pairs = element
        old = np.concatenate([o for o, _ in pairs])
        new = np.concatenate([n for _, n in pairs])
        if not old.size:
            return
        low, high = int(old.min()), int(old.max()) + 1
        factors = read_npy_rows(self._path, low, high).astype(np.float32)[old - low]
        blocks = np.asarray(self._layout.block_of(new), np.int64)
        for block, positions in parts_lib.split_rows(blocks, 1):
            yield block, (new[positions], factors[positions])


class WarmStartRows(beam.PTransform):
    """The pipeline root -> PCollection[(block_id, (rows int64 [m], factors float32 [m, k]))]
    of one side: the earlier model's factors of the rows it knows (module docstring); also
    writes how many rows matched to the checkpoint directory."""

    def __init__(self, spec: TrainSpec, side: Side):
        super().__init__()
        self._spec = spec
        self._side = Side(side)

    def expand(self, root):
        spec, side = self._spec, self._side
        shards = max(1, -(-spec.shape[side] // SHARD_ROWS))
        earlier = spec.warm_start
        prefix = "user" if side == Side.USERS else "item"
        part_rows = parts_lib.part_rows_for(4 * spec.config.latent_factors)
        streams = {
            name: root
            | f"{name.capitalize()}Vocabulary" >> beam.Create([path])
            | f"Stream{name.capitalize()}Ids" >> beam.ParDo(_StreamIds(shards))
            for name, path in (
                ("new", spec.vocabularies[side]),
                ("earlier", model_file(earlier, f"vocab_{prefix}s.txt")),
            )
        }
        matched = (
            streams
            | "JoinIds" >> beam.CoGroupByKey()
            | "Match" >> beam.ParDo(_Match(part_rows)).with_outputs("matched", main="pairs")
        )
        _ = (
            matched.matched
            | "CountMatched" >> beam.CombineGlobally(sum)
            | "WriteMatched"
            >> beam.Map(lambda n: files.write_warm_matches(spec.checkpoint_dir, side, n))
        )
        path = model_file(earlier, f"{prefix}_factors.npy")
        return (
            matched.pairs
            | "GroupByEarlierPart" >> beam.GroupByKey()
            | "ReadEarlierFactors" >> beam.ParDo(_ReadEarlier(path, spec, side))
        )
