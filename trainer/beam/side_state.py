"""A side's factors between half-sweeps: published block files, and the state that names them.

A block's factors are written to a checkpoint file (`publish`) and travel as a `FactorRef`.
After each half-sweep, the side's references are combined into one `SideState`: the Gramian
G = Σ_b F_bᵀF_b (k x k partial sums, merged) and every block file's entry. It is the singleton
side input of every solve of the other side.

    PCollection[tuple[int, np.ndarray]]  (block_id, row_ids)
        | InitialFactors / ResumedFactors        -> PCollection[FactorRef]  (iteration 0 / t)
    PCollection[FactorRef]
        | CombineSideState                       -> PCollection[SideState], one element
        | CheckpointHalfSweep                    -> the same, after writing the half-sweep's
                                                    completion marker
"""

from __future__ import annotations

import dataclasses

import apache_beam as beam
import numpy as np
import tensorflow as tf

from common import worker_threads
from trainer.beam import checkpoint_files as files
from trainer.beam import checkpoints, seed_keys, warm_start
from trainer.beam.layout import FactorRef
from trainer.beam.spec import TrainSpec
from trainer.core import seeding
from trainer.core import solver as wals_solver
from trainer.core.sides import Side


def gramian_term(factors: np.ndarray) -> np.ndarray:
    """A block's term of its side's Gramian: F_bᵀ F_b, float64 [k, k] (the solver's kernel,
    on TensorFlow's thread pool rather than NumPy's BLAS)."""
    return wals_solver.gramian(factors, tf.float64).numpy()


def publish(
    spec: TrainSpec, iteration: int, side: Side, block_id: int, row_ids, factors
) -> FactorRef:
    """Writes a block's factors (float32 [b, k]) of `iteration` to the checkpoint directory;
    returns the reference the next sweeps read them by. Same inputs, same bytes: safe to retry."""
    factors = np.asarray(factors, dtype=np.float32)
    entry = files.write_factor_block(
        spec.checkpoint_dir, iteration, side, block_id, row_ids, factors
    )
    return FactorRef(Side(side), block_id, iteration, entry, gramian_term(factors))


def read_ref(spec: TrainSpec, ref: FactorRef) -> tuple[np.ndarray, np.ndarray]:
    """(row_ids int64 [b], factors float32 [b, k]) of a reference, its SHA-256 checked."""
    return files.read_factor_block(spec.checkpoint_dir, ref.iteration, ref.side, ref.entry)


class _InitFactors(beam.DoFn):
    """(block_id, {"rows": [row_ids], "keys": [(rows, keys)], "warm": [(rows, factors)]}) ->
    the FactorRef of the block's initial factors (iteration 0): each row seeded by the key
    of its original ID (`trainer.core.seeding`; the keys from `seed_keys.SeedKeys`), and the
    rows a warm start matched (`warm_start.WarmStartRows`) overwritten with the earlier
    model's factors."""

    def __init__(self, spec: TrainSpec, side: Side):
        self._spec = spec
        self._side = side

    def setup(self):
        worker_threads.apply_in_worker()  # before this worker's TensorFlow runtime starts

    def process(self, element):
        block_id, grouped = element
        spec, config, side = self._spec, self._spec.config, self._side
        (row_ids,) = grouped["rows"]
        keys = seed_keys.block_keys(block_id, row_ids, list(grouped["keys"]))
        initial = seeding.initial_factors(
            keys, config.latent_factors, config.init_stddev, config.seed, side
        )
        for rows, factors in grouped.get("warm", ()):
            initial[spec.layout(side).position(rows)] = factors
        yield publish(spec, 0, side, block_id, row_ids, initial)


class InitialFactors(beam.PTransform):
    """PCollection[tuple[int, np.ndarray]] (block_id, row_ids int64 [b]) of one side ->
    PCollection[FactorRef], each block's initial factors (iteration 0) written to the
    checkpoint directory: seeded by each row's ID, read from the side's vocabulary file on a
    worker (`seed_keys.SeedKeys`, joined with the blocks by block), or, with `spec.warm_start`,
    for the rows an earlier model knew, its factors (`warm_start.WarmStartRows`, joined too)."""

    def __init__(self, spec: TrainSpec, side: Side):
        super().__init__()
        self._spec = spec
        self._side = side

    def expand(self, blocks):
        spec, side, root = self._spec, self._side, blocks.pipeline
        inputs = {
            "rows": blocks,
            "keys": root
            | "SeedKeys" >> seed_keys.SeedKeys(spec.vocabularies[side], spec.layout(side)),
        }
        if spec.warm_start:
            inputs["warm"] = root | "WarmStart" >> warm_start.WarmStartRows(spec, side)
        return (
            inputs
            | "JoinByBlock" >> beam.CoGroupByKey()
            | "Initialise" >> beam.ParDo(_InitFactors(spec, side))
        )


class _LoadFactors(beam.DoFn):
    """(block_id, row_ids) -> the FactorRef of the block in a verified checkpoint."""

    def __init__(self, spec: TrainSpec, side: Side, marker: dict):
        self._spec = spec
        self._side = side
        self._marker = marker

    def setup(self):
        worker_threads.apply_in_worker()  # before this worker's TensorFlow runtime starts

    def process(self, element):
        block_id, row_ids = element
        entries = {entry["block"]: entry for entry in self._marker["blocks"]}
        stored_ids, factors = checkpoints.read_marked_block(self._marker, block_id)
        if not np.array_equal(stored_ids, row_ids):
            raise ValueError(f"checkpoint block {block_id} holds other rows")
        yield FactorRef(
            Side(self._side),
            block_id,
            self._spec.start_iteration,
            entries[block_id],
            gramian_term(factors),
        )


class ResumedFactors(beam.PTransform):
    """PCollection[tuple[int, np.ndarray]] (block_id, row_ids int64 [b]) of one side ->
    PCollection[FactorRef] of the blocks in the checkpoint of `spec.start_iteration` that
    `marker` (from `checkpoints.find_resume`) describes; each block file is read and checked
    against its SHA-256 and its rows."""

    def __init__(self, spec: TrainSpec, side: Side, marker: dict):
        super().__init__()
        self._spec = spec
        self._side = side
        self._marker = marker

    def expand(self, blocks):
        return blocks | "Load" >> beam.ParDo(_LoadFactors(self._spec, self._side, self._marker))


@dataclasses.dataclass(frozen=True)
class SideState:
    """One side's factors after a half-sweep, as the other side's solves see them.

    A singleton side input of a few kilobytes per block: the Gramian and where the factors are.

    Attributes:
        side: USERS or ITEMS.
        iteration: the iteration of the factors (0: initial).
        entries: every block file's entry {block, file, bytes, sha256}, by block.
        gramian: float64 [k, k], G = Σ_b F_bᵀ F_b.
    """

    side: Side
    iteration: int
    entries: tuple[dict, ...]
    gramian: np.ndarray


class _CombineState(beam.CombineFn):
    """FactorRef -> SideState: the blocks' entries gathered and their Gramian terms added."""

    def __init__(self, k: int):
        self._k = k

    def create_accumulator(self):
        return [], np.zeros((self._k, self._k), dtype=np.float64)

    def add_input(self, accumulator, ref: FactorRef):
        refs, gram = accumulator
        refs.append((ref.side, ref.iteration, ref.entry))
        return refs, gram + ref.gramian

    def merge_accumulators(self, accumulators):
        refs, gram = [], np.zeros((self._k, self._k), dtype=np.float64)
        for more, part in accumulators:
            refs.extend(more)
            gram = gram + part
        return refs, gram

    def extract_output(self, accumulator):
        refs, gram = accumulator
        halves = {(side, iteration) for side, iteration, _ in refs}
        if len(halves) != 1:
            raise RuntimeError(f"one side state from the factors of {sorted(halves)}")
        ((side, iteration),) = halves
        entries = tuple(sorted((entry for _, _, entry in refs), key=lambda e: e["block"]))
        return SideState(Side(side), iteration, entries, gram)


class CombineSideState(beam.PTransform):
    """PCollection[FactorRef] of one side's blocks, all of one iteration ->
    PCollection[SideState], one element: their entries and Gramian G = Σ_b F_bᵀF_b. Writes
    nothing (the state of factors already checkpointed, or of the initial ones)."""

    def __init__(self, k: int):
        super().__init__()
        self._k = k

    def expand(self, refs):
        return refs | "Combine" >> beam.CombineGlobally(_CombineState(self._k)).without_defaults()


class _WriteMarker(beam.DoFn):
    """SideState -> writes the half-sweep's completion marker (every block file is written
    before its reference reaches the state); emits the half-sweep's number."""

    def __init__(self, spec: TrainSpec):
        self._spec = spec

    def process(self, state: SideState):
        spec = self._spec
        expected = spec.layout(state.side).n_blocks
        if len(state.entries) != expected:
            raise RuntimeError(f"{len(state.entries)} of {expected} blocks written")
        checkpoints.write_marker(
            spec.checkpoint_dir, state.iteration, state.side, spec.fingerprint, state.entries
        )
        sweep = 2 * state.iteration - (1 if state.side == Side.USERS else 0)
        if spec.fail_after and sweep == spec.fail_after:
            raise RuntimeError(f"test fault injected after half-sweep {sweep}")
        yield sweep


class CheckpointHalfSweep(beam.PTransform):
    """PCollection[FactorRef] of one side after a half-sweep -> PCollection[SideState], one
    element, the other side's side input (`CombineSideState`); also writes the half-sweep's
    completion marker `iter-NNNN/<side>/_COMPLETE` naming every block file with its size and
    SHA-256, so that a reader can tell a complete checkpoint.
    """

    def __init__(self, spec: TrainSpec):
        super().__init__()
        self._spec = spec

    def expand(self, refs):
        state = refs | "State" >> CombineSideState(self._spec.config.latent_factors)
        _ = state | "WriteMarker" >> beam.ParDo(_WriteMarker(self._spec))
        return state
