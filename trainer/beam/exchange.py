"""How a solving block receives the fixed side's factors (`--factor_exchange`).

    broadcast   every worker reads the whole fixed table ([n_fixed, k] float32) from the block
                files the `SideState` names, once per process and half-sweep, and holds one
                copy (`fixed_table`, a `trainer.core.fixed_table.FixedTable` that every solve
                and thread of the process reads without a copy of its own). Simple and fast
                while n_fixed · k · 4 bytes fits easily in a worker.
    join        Spark ALS's block join: once per launch, each solving block lists the fixed rows
                its cells touch, grouped by the fixed block that owns them, in a requests file
                per fixed block (`WriteRequests`). Every sweep, each fixed block reads its own
                factors and requests and sends exactly those vectors to the solving blocks
                that asked, in the stage that solved it; a GroupByKey gathers each solving
                block's vectors (`SendFixedFactors`, then `received_factors`). Shuffles
                Σ_b |cols(b)| · k · 4 bytes per sweep; no worker needs the whole table.

With the join, a solving block's fixed table holds only the m rows it received, padded with
zero rows to `trainer.core.tiling.padded_fixed_length(m)`, and its problem's columns are
positions in those rows.
"""

from __future__ import annotations

import threading

import apache_beam as beam
import numpy as np

from trainer.beam import checkpoint_files as files
from trainer.beam import layout as blocks_lib
from trainer.beam.layout import FactorRef, RowBlock
from trainer.beam.side_state import SideState, read_ref
from trainer.beam.spec import TrainSpec
from trainer.core.fixed_table import FixedTable
from trainer.core.sides import Side

# --- broadcast -----------------------------------------------------------------------------------

# Each worker process holds one fixed table: the one of the half-sweep it is solving, read from
# the checkpoint files by the first solve that needs it and replaced (dropped first, then read)
# when a solve of the next half-sweep asks for its table. (key, FixedTable) or None.
_TABLE: tuple[tuple, FixedTable] | None = None
_TABLE_LOCK = threading.Lock()
TABLES_KEPT = 1


def fixed_table(spec: TrainSpec, state: SideState) -> FixedTable:
    """The whole table of `state`'s side, float32 [n, k], read from its block files once per
    process and half-sweep; every solve and thread of the process shares it."""
    global _TABLE
    key = (spec.checkpoint_dir, state.side, state.iteration) + tuple(
        entry["sha256"] for entry in state.entries
    )
    with _TABLE_LOCK:
        if _TABLE is not None and _TABLE[0] == key:
            return _TABLE[1]
        _TABLE = None  # the previous half-sweep's table goes before the next one is read
        n = spec.side_shape(state.side)[0]
        seen = 0

        def fill(table: np.ndarray) -> None:
            nonlocal seen
            for entry in state.entries:
                row_ids, factors = files.read_factor_block(
                    spec.checkpoint_dir, state.iteration, state.side, entry
                )
                table[row_ids] = factors
                seen += row_ids.size

        table = FixedTable.filled(n, spec.config.latent_factors, fill)
        if seen != n:
            raise RuntimeError(f"{Side(state.side).label} factor table has {seen} of {n} rows")
        _TABLE = (key, table)
        return table


# --- join ----------------------------------------------------------------------------------------


def pad_rows(table: np.ndarray, length: int) -> np.ndarray:
    """float32 [m, k] -> [length, k], the added rows zero."""
    m, k = table.shape
    if length == m:
        return table
    return np.concatenate([table, np.zeros((length - m, k), table.dtype)])


def _needs(block: RowBlock, fixed_layout: blocks_lib.BlockLayout):
    """RowBlock -> (fixed block, (solving block, fixed rows int64 [m] it needs, ascending)).

    A block without cells asks fixed block 0 for nothing, so that it still receives one
    (empty) part and is solved (to zeros) and checkpointed like every other block.
    """
    cols = np.unique(block.rows.indices).astype(np.int64)
    if cols.size == 0:
        yield 0, (block.block_id, cols)
        return
    owners = fixed_layout.block_of(cols)
    for owner in np.unique(owners):
        yield int(owner), (block.block_id, cols[owners == owner])


class _WriteRequestsFile(beam.DoFn):
    """(fixed block, [(solving block, rows)]) -> (fixed block, the entry of its requests file
    `checkpoint_files.write_requests`), once per launch."""

    def __init__(self, spec: TrainSpec, solving_side: Side):
        self._spec = spec
        self._solving_side = solving_side

    def process(self, element):
        fixed_block, requests = element
        entry = files.write_requests(
            self._spec.checkpoint_dir, self._solving_side, fixed_block, list(requests)
        )
        yield fixed_block, entry


class WriteRequests(beam.PTransform):
    """PCollection[RowBlock] of the solving side -> PCollection[tuple[int, dict]]: (fixed
    block, the entry of its requests file) for each fixed block that some solving block needs
    rows of. The file lists [(solving block, fixed rows int64 [m] ascending)]; a solving block
    without cells asks fixed block 0 for no rows."""

    def __init__(self, spec: TrainSpec, solving_side: Side):
        super().__init__()
        self._spec = spec
        self._side = Side(solving_side)

    def expand(self, blocks):
        return (
            blocks
            | "ListNeededRows" >> beam.FlatMap(_needs, self._spec.layout(self._side.other))
            | "GroupByFixedBlock" >> beam.GroupByKey()
            | "WriteFiles" >> beam.ParDo(_WriteRequestsFile(self._spec, self._side))
        )


def _send(ref: FactorRef, spec: TrainSpec, request_entries: dict):
    """A fixed block's FactorRef -> (solving block, (fixed rows int64 [m], their factors float32
    [m, k])) for each solving block that asked (its requests file, read with its factors)."""
    entry = request_entries.get(ref.block_id)
    if entry is None:
        return
    solving_side = Side(ref.side).other
    requests = files.read_requests(spec.checkpoint_dir, solving_side, ref.block_id, entry)
    _, factors = read_ref(spec, ref)
    position = spec.layout(ref.side).position
    for destination, rows in requests:
        yield destination, (rows, factors[position(rows)])


class SendFixedFactors(beam.PTransform):
    """PCollection[FactorRef] of the fixed side -> PCollection[tuple[int, Iterable[tuple[
    np.ndarray, np.ndarray]]]]: (solving block, [(fixed rows int64 [m], factors float32 [m, k])]),
    what each solving block asked for in the requests files, grouped by solving block.

    `requests` is the solving side's PCollection[tuple[int, dict]] from `WriteRequests`,
    taken as a dict side input.
    """

    def __init__(self, spec: TrainSpec, requests):
        super().__init__()
        self._spec = spec
        self._requests = requests

    def expand(self, fixed):
        return (
            fixed
            | "SendFactors" >> beam.FlatMap(_send, self._spec, beam.pvalue.AsDict(self._requests))
            | "JoinFactors" >> beam.GroupByKey()
        )


def received_factors(element, solving_refs: dict, k: int):
    """(block_id, [(fixed rows, factors)]) from `SendFixedFactors` -> (the block's FactorRef,
    the fixed rows it received int64 [m] ascending, their factors float32 [m, k])."""
    block_id, parts = element
    ref = solving_refs[block_id]
    parts = list(parts)
    if not parts:
        return ref, np.zeros(0, np.int64), np.zeros((0, k), np.float32)
    ids = np.concatenate([rows for rows, _ in parts])
    vectors = np.concatenate([factors for _, factors in parts])
    order = np.argsort(ids, kind="stable")
    return ref, ids[order], vectors[order]
