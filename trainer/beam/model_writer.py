r"""The trained model's directory written by Beam workers: the launcher holds none of its arrays.

    factor files | WriteModel(spec)   -> PCollection[list[str]], one element: the files written

`factor files` is PCollection[tuple[int, str, dict]], (side, path, entry) of every final factor
block file (`factor_files_of_state` in the training pipeline, `factor_files_of_markers` from a
complete checkpoint's markers). The output is `<model_dir>/model/` in `trainer.serving.model`'s
format, the same bytes `model.save` writes for the same factors and data (the launcher writes
config.json itself, `model.write_config`):

    factor block files ─ split by part ─ GroupByKey(part) ─> user_factors / item_factors parts
    train/items_for_user-* ─ packed and grouped by part (`row_groups`) ─> seen_counts /
        seen_indices / seen_values parts, and each part's item counts ─ GroupByKey(item
        part) ─> item_counts
    parts (side input, complete once every part is written) ─> one DoFn per array streams
        its parts in order into <model_dir>/model/<array>.npy: the .npy header of the full
        shape, then the parts' bytes (seen_indptr: 0 and the running sum of seen_counts)
    vocab_users / vocab_items of the dataset ─> vocab_users.txt / vocab_items.txt: checked
        line by line (UTF-8, no '\r', i.e. what `model.vocabulary_from_bytes` and
        `vocabulary_to_bytes` round-trip), then `FileSystems.copy` (a final '\n' added if
        the file lacks one)
    everything written ─> the scratch parts removed; with `spec.export_k`, the SavedModel
        exported by one worker (`trainer.serving.export`, which streams the model's files
        chunk by chunk: the worker holds one chunk, never the model)

Parts are contiguous rows, part = row // part_rows, of about `model_parts.PART_BYTES` each, so a
worker holds one part at a time. Cost: the factors and the train cells are shuffled once, and
one worker streams each array once (user_factors: n_users · k · 4 bytes, seen_indices and
seen_values: 4 bytes per train cell each), each array on its own worker, in parallel.

Checks: the train cells in items_for_user against summary.json's train_interactions, and the
`trainer.local.dataset.read_sparse` checks on every record (`model_parts.seen_part`); with
`column_counts` (the training pipeline's c_i from users_for_item), each item's count from the
rows against it: rows and columns that disagree fail with `DatasetError`.
"""

from __future__ import annotations

import dataclasses
import logging

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from common import atomic, staging
from trainer.beam import checkpoint_files as files
from trainer.beam import model_parts as parts_lib
from trainer.beam.layout import BlockLayout
from trainer.beam.model_blocks import model_file
from trainer.beam.row_groups import GroupRowsByBlock, PackRows
from trainer.core.sides import ITEMS, SIDES, USERS, Side
from trainer.serving import export
from trainer.serving import model as model_lib
from transforms import features
from transforms.dataset_info import DatasetError

logger = logging.getLogger(__name__)

SEEN_INDPTR = "seen_indptr"
# The dtype of each array of `trainer.serving.model`'s files.
_DTYPES = {**parts_lib.DTYPES, SEEN_INDPTR: np.dtype("<i8")}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What `WriteModel` writes, everything a worker needs (plain values: it pickles).

    Attributes:
        model_dir: the run's output directory; the model goes to `<model_dir>/model/`.
        input_dir: the preprocessed dataset (its train/items_for_user-* TFRecords).
        shape: (n_users, n_items).
        k: latent factors.
        vocabularies: the dataset's (user, item) vocabulary files.
        train_interactions: summary.json's train cells.
        export_k: > 0: also export the SavedModel to `<model_dir>/export` with k
            recommendations; 0: no export.
        serving_model: the export's `trainer.serving.export.SERVING_MODELS` name.
        part_bytes: the target size of a part (`model_parts.PART_BYTES`).
    """

    model_dir: str
    input_dir: str
    shape: tuple[int, int]
    k: int
    vocabularies: tuple[str, str]
    train_interactions: int
    export_k: int = 0
    serving_model: str = export.FULL
    part_bytes: int = dataclasses.field(default_factory=lambda: parts_lib.PART_BYTES)

    @property
    def scratch(self) -> str:
        """The parts' directory, inside the output and removed once the arrays are written."""
        return f"{self.model_dir.rstrip('/')}/{model_lib.MODEL_SUBDIR}{atomic.TEMPORARY_INFIX}parts"

    @property
    def factor_rows(self) -> int:
        return parts_lib.part_rows_for(4 * self.k, self.part_bytes)

    @property
    def seen_rows(self) -> int:
        """Users per seen part: 8 bytes per cell (item and rating) and 8 per user."""
        cells_per_user = -(-8 * self.train_interactions // max(self.shape[0], 1))
        return parts_lib.part_rows_for(8 + cells_per_user, self.part_bytes)

    @property
    def count_rows(self) -> int:
        return parts_lib.part_rows_for(8, self.part_bytes)


def factor_files_of_state(checkpoint_dir: str):
    """SideState -> its blocks' (side, path, entry): the factor files a half-sweep wrote."""

    def files_of(state):
        directory = files.half_dir(checkpoint_dir, state.iteration, state.side)
        return [(int(state.side), f"{directory}/{e['file']}", e) for e in state.entries]

    return files_of


def factor_files_of_markers(markers: dict) -> list[tuple[int, str, dict]]:
    """The (side, path, entry) of every block named by a complete iteration's markers
    (`checkpoints.find_resume`: each carries its directory)."""
    return [
        (int(side), f"{marker['_dir']}/{entry['file']}", entry)
        for side, marker in markers.items()
        for entry in marker["blocks"]
    ]


def _read_block(element, part_rows: int):
    """(side, path, entry) -> (part, (rows, factors)) for each part the block's rows touch."""
    _, path, entry = element
    row_ids, factors = files.read_verified_block(path, entry)
    for part, positions in parts_lib.split_rows(row_ids, part_rows):
        yield part, (row_ids[positions], factors[positions])


def _group_by_part(pieces, n_parts: int, label: str):
    """PCollection[(part, piece)] -> PCollection[(part, list of pieces)] for every part in
    [0, n_parts), parts without pieces included; a part outside raises in the writers."""
    ids = pieces.pipeline | f"{label}Ids" >> beam.Create([(p, None) for p in range(n_parts)])
    return (
        (pieces, ids)
        | f"{label}All" >> beam.Flatten()
        | f"{label}Group" >> beam.GroupByKey()
        | f"{label}Pieces" >> beam.MapTuple(lambda p, got: (p, [g for g in got if g is not None]))
    )


class _WriteFactorPart(beam.DoFn):
    """(part, pieces) -> writes the part's factors; emits (part, rows, 0)."""

    def __init__(self, spec: ModelSpec, side: Side):
        self._spec, self._side = spec, Side(side)

    def process(self, element):
        part, pieces = element
        spec, n_rows = self._spec, self._spec.shape[self._side]
        table = parts_lib.factor_part(part, pieces, spec.factor_rows, n_rows, spec.k)
        name = parts_lib.USER_FACTORS if self._side == USERS else parts_lib.ITEM_FACTORS
        parts_lib.write_part(spec.scratch, name, part, table)
        yield part, table.shape[0], 0


class _WriteSeenPart(beam.DoFn):
    """(part, {"rows": the part's rows, `row_groups.SparseRow`}) -> writes the part's
    seen_counts, seen_indices and seen_values; emits (part, rows, cells), and (tag "counts") its
    item counts by item part."""

    def __init__(self, spec: ModelSpec):
        self._spec = spec

    def process(self, element):
        part, records = element[0], element[1]["rows"]
        spec = self._spec
        if not 0 <= part < parts_lib.n_parts(spec.shape[0], spec.seen_rows):
            raise DatasetError(f"items_for_user: a key outside the vocabulary of {spec.shape[0]}")
        counts, items, values = parts_lib.seen_part(part, records, spec.seen_rows, spec.shape)
        for name, array in (
            (parts_lib.SEEN_COUNTS, counts),
            (parts_lib.SEEN_INDICES, items),
            (parts_lib.SEEN_VALUES, values),
        ):
            parts_lib.write_part(spec.scratch, name, part, array)
        yield part, counts.size, items.size
        for piece in parts_lib.item_count_pieces(items, spec.count_rows):
            yield beam.pvalue.TaggedOutput("counts", piece)


class _WriteCountPart(beam.DoFn):
    """(item part, pieces) -> writes the part's c_i, checked against the columns' counts when
    there are some; emits (part, rows, 0)."""

    def __init__(self, spec: ModelSpec):
        self._spec = spec

    def process(self, element, column_counts=None):
        part, pieces = element
        spec = self._spec
        counts = parts_lib.count_part(part, pieces, spec.count_rows, spec.shape[1])
        if column_counts is not None:
            start, stop = parts_lib.part_bounds(part, spec.count_rows, spec.shape[1])
            if not np.array_equal(counts, column_counts[start:stop]):
                raise DatasetError(
                    "train rows (items_for_user) and columns (users_for_item) disagree"
                )
        parts_lib.write_part(spec.scratch, parts_lib.ITEM_COUNTS, part, counts)
        yield part, counts.size, 0


def _in_order(written: list, n_rows: int, part_rows: int, what: str) -> list:
    """The parts' (part, rows, cells), by part, checked to be every part of the array."""
    written = sorted(written)
    if [p for p, _, _ in written] != list(range(parts_lib.n_parts(n_rows, part_rows))):
        raise RuntimeError(f"{what}: parts {[p for p, _, _ in written]} written")
    return written


class _WriteArray(beam.DoFn):
    """An array's name -> streams its parts into `<model_dir>/model/<name>.npy` (their list
    is the side input: every part is written); emits the name."""

    def __init__(self, spec: ModelSpec):
        self._spec = spec

    def _parts(self, array: str, written: list):
        """The parts of `array`, in order, one at a time."""
        for part, _, _ in written:
            yield parts_lib.read_part(self._spec.scratch, array, part)

    def process(self, name: str, written: list):
        spec = self._spec
        n_users, n_items = spec.shape
        path = model_file(spec.model_dir, f"{name}.npy")
        if name in (parts_lib.USER_FACTORS, parts_lib.ITEM_FACTORS):
            n_rows = n_users if name == parts_lib.USER_FACTORS else n_items
            written = _in_order(written, n_rows, spec.factor_rows, name)
            shape = (n_rows, spec.k)
            chunks = self._parts(name, written)
        elif name == parts_lib.ITEM_COUNTS:
            written = _in_order(written, n_items, spec.count_rows, name)
            shape, chunks = (n_items,), self._parts(name, written)
        else:  # seen_indptr, seen_indices, seen_values: from the seen parts
            written = _in_order(written, n_users, spec.seen_rows, "seen")
            cells = sum(c for _, _, c in written)
            if cells != spec.train_interactions:
                raise DatasetError(
                    f"train TFRecords hold {cells} cells but summary.json says "
                    f"{spec.train_interactions}"
                )
            if name == SEEN_INDPTR:
                shape = (n_users + 1,)
                chunks = _indptr(self._parts(parts_lib.SEEN_COUNTS, written))
            else:
                shape, chunks = (cells,), self._parts(name, written)
        parts_lib.write_npy(path, _DTYPES[name], shape, chunks)
        yield name


def _indptr(counts_by_part):
    """The CSR row pointers from the users' cells, part by part: 0, then their running sum."""
    yield np.zeros(1, np.int64)
    offset = 0
    for counts in counts_by_part:
        ends = offset + np.cumsum(counts, dtype=np.int64)
        yield ends
        offset = int(ends[-1]) if ends.size else offset


class _CopyVocabulary(beam.DoFn):
    """(source, destination) -> the vocabulary checked and copied (`check_vocabulary`); emits
    the destination's name."""

    def process(self, element):
        source, destination = element
        if parts_lib.check_vocabulary(source):
            FileSystems.copy([source], [destination])
        else:  # the last ID lacks its '\n': add it, as vocabulary_to_bytes would
            with (
                FileSystems.open(source, compression_type=CompressionTypes.UNCOMPRESSED) as lines,
                atomic.write_atomically(destination) as handle,
            ):
                for line in lines:
                    handle.write(line if line.endswith(b"\n") else line + b"\n")
        yield destination.rsplit("/", 1)[-1]


class _Finish(beam.DoFn):
    """Runs once everything is written (the side input): removes the scratch parts, then
    exports the SavedModel when `spec.export_k` asks for it."""

    def __init__(self, spec: ModelSpec):
        self._spec = spec

    def process(self, _, written: list):
        spec = self._spec
        staging.delete_tree(spec.scratch)
        if spec.export_k:
            export_dir = f"{spec.model_dir.rstrip('/')}/export"
            try:
                export.export_saved_model(
                    spec.model_dir, export_dir, spec.export_k, serving_model=spec.serving_model
                )
            except FileExistsError:  # an earlier attempt of this step published it
                logger.info("%s was exported by an earlier attempt", export_dir)
        yield sorted(written)


class WriteModel(beam.PTransform):
    """PCollection[tuple[int, str, dict]] (side, path, entry) of every final factor block file
    -> PCollection[list[str]], one element once `<model_dir>/model/` is complete (and exported
    with `spec.export_k`): the names written. See the module docstring.

    Args:
        spec: what to write.
        column_counts: optional singleton PCollection[np.ndarray], c_i int64 [n_items] counted
            from the columns (users_for_item), to check the rows' counts against.
    """

    def __init__(self, spec: ModelSpec, column_counts=None):
        super().__init__()
        self._spec = spec
        self._column_counts = column_counts

    def expand(self, factor_files):
        spec, root = self._spec, factor_files.pipeline
        lists = {}
        for side in SIDES:
            name = Side(side).label.capitalize()
            n_parts = parts_lib.n_parts(spec.shape[side], spec.factor_rows)
            pieces = (
                factor_files
                | f"{name}Files" >> beam.Filter(lambda f, side=side: f[0] == side)
                | f"Spread{name}" >> beam.Reshuffle()
                | f"Split{name}" >> beam.FlatMap(_read_block, spec.factor_rows)
            )
            lists[side] = (
                _group_by_part(pieces, n_parts, f"{name}Part")
                | f"Write{name}Parts" >> beam.ParDo(_WriteFactorPart(spec, side))
                | f"{name}Parts" >> beam.combiners.ToList()
            )
        pattern = (
            f"{spec.input_dir}/{features.TRAIN_DIR}/{features.ITEMS_FOR_USER}-*"
            f"{features.TFRECORD_SUFFIX}"
        )
        seen_parts = BlockLayout(spec.shape[0], spec.seen_rows, interleaved=False)
        packed = (
            root
            | "ReadSeen"
            >> beam.io.ReadFromTFRecord(pattern, compression_type=CompressionTypes.GZIP)
            | "PackSeen" >> PackRows(seen_parts, "model_rows")
        )
        seen = (
            {"rows": packed}
            | "SeenPart" >> GroupRowsByBlock(seen_parts.n_blocks)
            | "WriteSeenParts"
            >> beam.ParDo(_WriteSeenPart(spec)).with_outputs("counts", main="parts")
        )
        columns = (
            () if self._column_counts is None else (beam.pvalue.AsSingleton(self._column_counts),)
        )
        counts = _group_by_part(
            seen.counts, parts_lib.n_parts(spec.shape[1], spec.count_rows), "CountPart"
        ) | "WriteCountParts" >> beam.ParDo(_WriteCountPart(spec), *columns)
        seen_list = seen.parts | "SeenParts" >> beam.combiners.ToList()
        sources = {
            parts_lib.USER_FACTORS: lists[USERS],
            parts_lib.ITEM_FACTORS: lists[ITEMS],
            SEEN_INDPTR: seen_list,
            parts_lib.SEEN_INDICES: seen_list,
            parts_lib.SEEN_VALUES: seen_list,
            parts_lib.ITEM_COUNTS: counts | "CountParts" >> beam.combiners.ToList(),
        }
        written = [
            root
            | f"Name{name}" >> beam.Create([name])
            | f"Write{name}" >> beam.ParDo(_WriteArray(spec), beam.pvalue.AsSingleton(parts))
            for name, parts in sources.items()
        ]
        vocabularies = [
            (source, model_file(spec.model_dir, f"{vocabulary}.txt"))
            for source, vocabulary in zip(
                spec.vocabularies, (features.USER_VOCAB, features.ITEM_VOCAB)
            )
        ]
        written.append(
            root
            | "Vocabularies" >> beam.Create(vocabularies)
            | "CopyVocabularies" >> beam.ParDo(_CopyVocabulary())
        )
        done = written | "Written" >> beam.Flatten() | "AllWritten" >> beam.combiners.ToList()
        return (
            root
            | "Finish" >> beam.Create([None])
            | "RemovePartsAndExport" >> beam.ParDo(_Finish(spec), beam.pvalue.AsSingleton(done))
        )
