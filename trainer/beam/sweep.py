"""The half-sweep: every block of one side solved against the other side's fixed factors.

    (solving PCollection[FactorRef], fixed PCollection[FactorRef], fixed PCollection[SideState])
        | HalfSweep    -> PCollection[FactorRef] of the new factors (+ the incoming loss terms)
        | LossTerms    -> PCollection[LossSums], the loss terms only (no solve)
    (user PCollection[LossSums], item PCollection[FactorRef]) | WriteLoss -> the loss

Each block is solved with the math of the local trainer: its cached problem
(`trainer.beam.block_problems`, `trainer.core.problem.define_rows`), then
`trainer.core.solver.solve_planned` against the fixed table the exchange delivers
(`trainer.beam.exchange`) and the fixed side's Gramian G from its `SideState`. The new factors
go to a checkpoint file, and only their `FactorRef` moves on.

Every DoFn is a pure function of its inputs, so bundle retries cannot double count and the
result does not depend on the runner, the number of workers or the block size beyond float
round-off.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import logging
import threading
import time

import apache_beam as beam
import numpy as np

from common import worker_threads
from trainer.beam import block_problems, checkpoint_files, exchange
from trainer.beam.layout import FactorRef
from trainer.beam.side_state import SideState, publish, read_ref
from trainer.beam.spec import JOIN, METRICS_NAMESPACE, TrainSpec
from trainer.core import loss
from trainer.core.fixed_table import FixedTable
from trainer.core.sides import Side
from trainer.core.xla import configure_xla

logger = logging.getLogger(__name__)

# Sides whose kernels this process has compiled: {(fingerprint, exchange, side)}.
_WARMED: set = set()
_WARMED_LOCK = threading.Lock()


def _warm_up(spec: TrainSpec, side: Side, kernels: frozenset) -> None:
    """Compiles the CG kernel for every tile shape of every block of `side`, once per process.

    Each tile shape costs an XLA compile (about 0.3 s) the first time a process meets it. Beam
    hands a worker different blocks in different sweeps, and blocks have some shapes of their
    own, so compiling on demand put a second of compiles into whichever later sweep first gave
    a worker a new block. Compiling the side's whole set (about ten shapes, from
    `trainer.beam.reading.StashRatings`) before the first solve moves that cost to the first
    iteration, where it is paid once.
    """
    key = (spec.fingerprint, spec.exchange, side)
    with _WARMED_LOCK:
        if key in _WARMED:
            return
        began = time.perf_counter()
        by_length = collections.defaultdict(set)
        for n_other, *shape in kernels:
            by_length[n_other].add(tuple(shape))
        for n_other, shapes in sorted(by_length.items()):
            spec.solver().warm_up(shapes, n_other, spec.config.latent_factors)
        _WARMED.add(key)
    logger.info(
        "compiled %d %s kernel shapes in %.1f s",
        len(kernels),
        Side(side).label,
        time.perf_counter() - began,
    )


@contextlib.contextmanager
def _gc_paused():
    """Pauses Python's cyclic garbage collector during a block's solve.

    A solve allocates many small objects (eager tensors, futures), which trigger collections,
    and in a Beam worker a full collection walks the harness's half a million objects: with it
    paused, the block solves of the large benchmark took 20% less time (in-memory DirectRunner).
    Reference counting still frees what a solve drops; collection resumes right after.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _receive(spec: TrainSpec, side: Side, element, item_counts, fixed_state, solving_refs):
    """A solving block's main input -> (its FactorRef, its BlockProblem, the fixed table
    float32 [n, k] its problem's columns index).

    broadcast: the element is the block's FactorRef, and the table the whole fixed side, the
    process's one `FixedTable` of the half-sweep (`exchange.fixed_table`), which the solves of
    all its threads read without copying it.
    join: the element is (block_id, [(fixed rows, factors)]) from `SendFixedFactors`, and the
    table the rows received, padded to the problem's column count.
    """
    if spec.exchange != JOIN:
        table = exchange.fixed_table(spec, fixed_state)
        return (
            element,
            block_problems.block_problem(spec, side, element.block_id, item_counts),
            table,
        )
    k = spec.config.latent_factors
    ref, received, table = exchange.received_factors(element, solving_refs, k)
    solving = block_problems.block_problem(spec, side, ref.block_id, item_counts)
    if not np.array_equal(received, solving.needed):
        raise RuntimeError(
            f"{Side(side).label} block {ref.block_id} received the factors of "
            f"{received.size} rows, but its cells touch {solving.needed.size}"
        )
    return ref, solving, exchange.pad_rows(table, solving.problem.targets.shape[1])


def _loss_terms(solving, side: Side, factors, table) -> loss.LossSums:
    """A block's loss terms of its incoming factors: observed terms (counted on the user side
    only, against the fixed item table) and regularisation terms."""
    if side != Side.USERS:
        return loss.loss_sums(solving.problem, factors, None)
    fixed = table.factors if isinstance(table, FixedTable) else table
    return loss.loss_sums(solving.problem, factors, fixed)


class _Solve(beam.DoFn):
    """Solves a block against the fixed side: main input (`_receive`) -> the FactorRef of its
    new factors (written to the checkpoint directory as iteration `iteration`).

    With `with_loss`, also emits (tag "loss") the block's `LossSums` of its *incoming* factors
    against the fixed factors: the observed and regularisation terms of the previous iteration.
    """

    def __init__(self, spec: TrainSpec, side: Side, iteration: int, with_loss: bool):
        self._spec = spec
        self._side = side
        self._iteration = iteration
        self._with_loss = with_loss

    def setup(self):
        worker_threads.apply_in_worker()  # before this worker's TensorFlow runtime starts
        configure_xla()  # before this worker's first XLA compile

    def process(
        self, element, item_counts, fixed_state: SideState, kernels=frozenset(), solving_refs=None
    ):
        spec, side = self._spec, self._side
        if kernels:
            _warm_up(spec, side, kernels)
        ref, solving, table = _receive(spec, side, element, item_counts, fixed_state, solving_refs)
        row_ids, factors = read_ref(spec, ref)
        if self._with_loss:
            yield beam.pvalue.TaggedOutput("loss", _loss_terms(solving, side, factors, table))
        beam.metrics.Metrics.counter(METRICS_NAMESPACE, f"solved_{Side(side).label}").inc(
            row_ids.size
        )
        with _gc_paused():
            solved = (
                spec.solver()
                .solve(solving.plan, table, fixed_state.gramian.astype(np.float32), x0=factors)
                .numpy()
            )
        yield publish(spec, self._iteration, side, ref.block_id, row_ids, solved)


class _MeasureLoss(beam.DoFn):
    """A block's main input (`_receive`) -> its `LossSums` against the fixed side; no solve."""

    def __init__(self, spec: TrainSpec, side: Side):
        self._spec = spec
        self._side = side

    def setup(self):
        worker_threads.apply_in_worker()  # before this worker's TensorFlow runtime starts
        configure_xla()  # before this worker's first XLA compile

    def process(self, element, item_counts, fixed_state: SideState, solving_refs=None):
        spec, side = self._spec, self._side
        ref, solving, table = _receive(spec, side, element, item_counts, fixed_state, solving_refs)
        _, factors = read_ref(spec, ref)
        yield _loss_terms(solving, side, factors, table)


def _main_input(spec: TrainSpec, solving, fixed, fixed_state, item_counts, requests):
    """(the main input of the block DoFns, their side inputs) for the spec's exchange."""
    side_inputs = {
        "item_counts": beam.pvalue.AsSingleton(item_counts),
        "fixed_state": beam.pvalue.AsSingleton(fixed_state),
    }
    if spec.exchange != JOIN:
        return solving, side_inputs
    main = fixed | "Exchange" >> exchange.SendFixedFactors(spec, requests)
    keyed = solving | "KeySolving" >> beam.Map(lambda ref: (ref.block_id, ref))
    side_inputs["solving_refs"] = beam.pvalue.AsDict(keyed)
    return main, side_inputs


class HalfSweep(beam.PTransform):
    """Solves every block of one side against the other side's current factors.

    Input: (solving PCollection[FactorRef], fixed PCollection[FactorRef], the fixed side's
    PCollection[SideState] (one element)). Output: (PCollection[FactorRef] of the new factors,
    PCollection[LossSums] of the incoming factors with `with_loss`, else None).

    Args:
        spec, side, iteration: what is trained, the solving side, the iteration solved.
        item_counts: PCollection[np.ndarray] singleton, c_i int64 [n_items] (`CountItems`).
        kernels: PCollection[frozenset] singleton, the solving side's CG kernel shapes
            (`StashRatings`; empty for Cholesky), which every worker compiles before its
            first solve of the side (`_warm_up`).
        requests: join only: the solving side's PCollection[tuple[int, dict]] (fixed block,
            requests file entry) from `exchange.WriteRequests`.
        with_loss: also emit the loss terms of the incoming factors.

    broadcast: each worker reads the fixed table from the files the state names (once per
    process and half-sweep). join: each fixed block sends every solving block the rows it asked
    for (fused into the stage that produced the fixed block); one GroupByKey by solving block
    gathers them, and the solving blocks' references come as a side input, so the only
    shuffle is the vectors.
    """

    def __init__(self, spec, side, iteration, item_counts, kernels, requests=None, with_loss=False):
        super().__init__()
        self._spec = spec
        self._side = Side(side)
        self._iteration = iteration
        self._item_counts = item_counts
        self._kernels = kernels
        self._requests = requests
        self._with_loss = with_loss

    def expand(self, pcolls):
        solving, fixed, fixed_state = pcolls
        spec = self._spec
        main, side_inputs = _main_input(
            spec, solving, fixed, fixed_state, self._item_counts, self._requests
        )
        side_inputs["kernels"] = beam.pvalue.AsSingleton(self._kernels)
        solve = _Solve(spec, self._side, self._iteration, self._with_loss)
        outputs = main | "Solve" >> beam.ParDo(solve, **side_inputs).with_outputs(
            "loss", main="blocks"
        )
        return outputs.blocks, (outputs.loss if self._with_loss else None)


class LossTerms(beam.PTransform):
    """The loss terms of one side's current factors, without solving (the loss of the last
    iteration, which no later sweep computes on its way).

    Input: as `HalfSweep`'s. Output: PCollection[LossSums], one per solving block: with the
    user side solving, the observed terms of its rows against the fixed item factors and the
    users' regularisation terms.
    """

    def __init__(self, spec, side, item_counts, requests=None):
        super().__init__()
        self._spec = spec
        self._side = Side(side)
        self._item_counts = item_counts
        self._requests = requests

    def expand(self, pcolls):
        solving, fixed, fixed_state = pcolls
        main, side_inputs = _main_input(
            self._spec, solving, fixed, fixed_state, self._item_counts, self._requests
        )
        return main | "Measure" >> beam.ParDo(_MeasureLoss(self._spec, self._side), **side_inputs)


def _regularization_sums(ref: FactorRef, spec: TrainSpec, item_counts) -> loss.LossSums:
    solving = block_problems.block_problem(spec, ref.side, ref.block_id, item_counts)
    _, factors = read_ref(spec, ref)
    return loss.loss_sums(solving.problem, factors, None)


def _sum_losses(parts):
    total = loss.LossSums()
    for part in parts:
        total = total + part
    return total


class _FinishLoss(beam.DoFn):
    """LossSums of all blocks -> writes the iteration's loss with the two Gramians."""

    def __init__(self, spec: TrainSpec, iteration: int):
        self._spec = spec
        self._iteration = iteration

    def process(self, sums, users: SideState, items: SideState):
        result = sums.finish(users.gramian, items.gramian, self._spec.config.unobserved_weight)
        checkpoint_files.write_loss(self._spec.checkpoint_dir, self._iteration, result)
        yield result


class WriteLoss(beam.PTransform):
    """The loss of one iteration, written to `loss-NNNN.json`.

    Input: (PCollection[LossSums] of the user blocks (`HalfSweep` with_loss, or `LossTerms`),
    PCollection[FactorRef] of the item blocks of the same iteration). Output:
    PCollection[dict], one element, the loss (`trainer.core.loss.LossSums.finish`), which
    adds the unobserved terms from the users' and items' Gramians (the SideState singletons
    `users_state` and `items_state`).
    """

    def __init__(self, spec, iteration, item_counts, users_state, items_state):
        super().__init__()
        self._spec = spec
        self._iteration = iteration
        self._item_counts = item_counts
        self._users_state = users_state
        self._items_state = items_state

    def expand(self, pcolls):
        user_sums, items = pcolls
        spec = self._spec
        regularization = items | "ItemRegularization" >> beam.Map(
            _regularization_sums, spec, beam.pvalue.AsSingleton(self._item_counts)
        )
        return (
            (user_sums, regularization)
            | "Flatten" >> beam.Flatten()
            | "Sum" >> beam.CombineGlobally(_sum_losses).without_defaults()
            | "Write"
            >> beam.ParDo(
                _FinishLoss(spec, self._iteration),
                beam.pvalue.AsSingleton(self._users_state),
                beam.pvalue.AsSingleton(self._items_state),
            )
        )
