"""Reading the ratings into blocks, once per launch.

    root | ReadRowBlocks(spec, side)   -> PCollection[RowBlock], every block of the side
         | StashRatings(spec)          -> (PCollection[tuple[int, np.ndarray]] (block_id,
                                           row_ids), PCollection[frozenset] CG kernel shapes)
    item blocks | CountItems(n_items)  -> PCollection[np.ndarray], c_i int64 [n_items]

The rows come from the preprocessed TFRecords (`transforms.examples.sparse_example`:
`items_for_user` holds whole rows of R, `users_for_item` whole columns). `StashRatings` writes
each block's ratings to the checkpoint directory, so the sweeps move only factors.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes

from trainer.beam import checkpoint_files as files
from trainer.beam import layout as blocks_lib
from trainer.beam.combiners import CountsCombineFn
from trainer.beam.layout import RowBlock
from trainer.beam.row_groups import GroupRowsByBlock, PackRows
from trainer.beam.spec import JOIN, TrainSpec
from trainer.core import solver as wals_solver
from trainer.core.sides import Side
from trainer.core.tiling import padded_fixed_length
from transforms import features


class ReadRowBlocks(beam.PTransform):
    """Reads one side's rows from the preprocessed TFRecords into blocks.

    Input: the pipeline root. Output: PCollection[RowBlock], one per block of
    `spec.layout(side)`, including blocks whose rows have no cells.
    """

    def __init__(self, spec: TrainSpec, side: Side):
        super().__init__()
        self._spec = spec
        self._side = Side(side)

    def expand(self, root):
        spec, side = self._spec, self._side
        name = features.ITEMS_FOR_USER if side == Side.USERS else features.USERS_FOR_ITEM
        pattern = f"{spec.input_dir}/{features.TRAIN_DIR}/{name}-*{features.TFRECORD_SUFFIX}"
        n_fixed = spec.side_shape(side)[1]
        layout = spec.layout(side)
        packed = (
            root
            | "ReadRecords"
            >> beam.io.ReadFromTFRecord(pattern, compression_type=CompressionTypes.GZIP)
            | "PackRows" >> PackRows(layout, "train_rows")
        )
        return (
            {"rows": packed}
            | "GroupRows" >> GroupRowsByBlock(layout.n_blocks)
            | "Assemble"
            >> beam.MapTuple(
                lambda block_id, grouped: blocks_lib.assemble(
                    side, block_id, grouped["rows"], layout, n_fixed
                )
            )
        )


class _CountItemsFn(CountsCombineFn):
    """Item blocks -> c_i, int64 [n_items]: the observed cells of each item (column)."""

    def add_input(self, counts, block: RowBlock):
        counts[block.row_ids] += block.rows.row_counts()
        return counts


class CountItems(beam.PTransform):
    """PCollection[RowBlock] of the item side -> PCollection[np.ndarray], one element: c_i,
    int64 [n_items], the observed cells of each item (what f depends on under the
    frequency-scaled weightings)."""

    def __init__(self, n_items: int):
        super().__init__()
        self._n_items = n_items

    def expand(self, item_blocks):
        return (
            item_blocks
            | "Count" >> beam.CombineGlobally(_CountItemsFn(self._n_items)).without_defaults()
        )


class _StashRatings(beam.DoFn):
    """RowBlock -> (block_id, row_ids), after writing the block's ratings to the checkpoint
    directory (`checkpoint_files.write_ratings`); with the CG solver, also (tag "kernels") the
    block's CG kernel shapes."""

    def __init__(self, spec: TrainSpec):
        self._spec = spec

    def process(self, block: RowBlock):
        spec = self._spec
        files.write_ratings(spec.checkpoint_dir, block.side, block.block_id, block.rows)
        yield block.block_id, block.row_ids
        if spec.config.solver == wals_solver.CG:
            n_other = spec.side_shape(block.side)[1]
            if spec.exchange == JOIN:
                n_other = padded_fixed_length(np.unique(block.rows.indices).size)
            shapes = spec.solver().kernel_shapes(block.rows.row_counts())
            yield beam.pvalue.TaggedOutput(
                "kernels", frozenset((n_other, *shape) for shape in shapes)
            )


def _union(sets) -> frozenset:
    return frozenset().union(*sets)


class StashRatings(beam.PTransform):
    """PCollection[RowBlock] of one side -> (PCollection[tuple[int, np.ndarray]] (block_id,
    row_ids int64 [b]) of every block, PCollection[frozenset] one element).

    Writes each block's ratings to the checkpoint directory (`checkpoint_files.write_ratings`):
    the sweeps then move only factors, and a worker rebuilds a block's problem from that file
    when it has not cached it. The second output is the side's CG kernel shapes, the union
    over its blocks of (n_other, T, B, W, R, multi_line), n_other the length of the fixed table
    each block is solved against (`trainer.beam.sweep` compiles them up front); empty with the
    Cholesky solver.
    """

    def __init__(self, spec: TrainSpec):
        super().__init__()
        self._spec = spec

    def expand(self, blocks):
        stash = blocks | "Write" >> beam.ParDo(_StashRatings(self._spec)).with_outputs(
            "kernels", main="stashed"
        )
        kernels = stash.kernels | "UnionKernels" >> beam.CombineGlobally(_union)
        return stash.stashed, kernels
