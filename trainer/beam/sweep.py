"""The distributed WALS trainer: one Beam pipeline that unrolls every iteration.

    python -m trainer.task --distributed --input_dir D --output_dir M \
        [--factor_exchange broadcast|join] [--block_rows 16384] [any Beam pipeline option]

Elements are blocks of thousands of whole rows (`trainer.beam.layout.RowBlock`), never single rows or
cells, so Beam's per-element cost is paid a few hundred times per sweep. Each half-sweep solves
every block of one side against the other side's factors, with the math of the local trainer:
`trainer.core.problem.define_rows` per block, then `trainer.core.solver.solve_planned`.

    once:   rows of each side | StashRows      (each block's ratings to the checkpoint dir)
            initial factors of each block       (iter-0000 files)
    iteration t:
      users_t = users_{t-1} | SolveUsers(G = Σ_b Y_bᵀY_b,  Y = items_{t-1})  | CheckpointUsers
      items_t = items_{t-1} | SolveItems(G = Σ_b X_bᵀX_b,  X = users_t)      | CheckpointItems

Factors travel through the checkpoint files, which every half-sweep writes anyway: a solve
writes its block's new factors to `iter-NNNN/<side>/block-NNNNN-<sha>.npz` and emits only a
`FactorRef` (the file's name, size and SHA-256, and the block's Gramian term F_bᵀF_b, k x k).
So Beam moves a few kilobytes per block between stages, never factor tables, and a reader checks
every file it reads against its SHA-256. The ratings stay where they are, as Spark's ALS caches
its in-blocks: a worker keeps each block's problem and solve plan after building it once
(`_block_problem`) and rebuilds it from the stashed rows file on a miss (a new or restarted
worker, or an evicted entry).

After each half-sweep, `Checkpoint` combines the side's references into a `SideState`: the
Gramian G = Σ_b F_bᵀF_b (k x k partial sums, merged) and every block's file record. It writes
the half-sweep's completion marker and is the singleton side input of every solve of the other
side. The fixed factors reach a solving block in one of two ways (`--factor_exchange`):

    broadcast   every worker reads the whole fixed table ([n_fixed, k] float32) from the block
                files the state names, once per process and half-sweep, and holds one copy.
                Simple and fast while n_fixed · k · 4 bytes fits easily in a worker.
    join        Spark ALS's block join: once per launch, each solving block lists the fixed rows
                its cells touch, grouped by the fixed block that owns them (a requests file
                per fixed block). Every sweep, each fixed block reads its own factors and
                requests and sends exactly those vectors to the solving blocks that asked, in
                the stage that solved it; a GroupByKey gathers each solving block's vectors.
                Shuffles Σ_b |cols(b)| · k · 4 bytes per sweep; no worker needs the whole table.

Every DoFn is a pure function of its inputs (initial factors are keyed by the rows' original IDs,
`trainer.core.seeding`), so bundle retries cannot double count and the result does not depend on the
runner, the number of workers or the block size beyond float round-off.

Checkpoints (`trainer.beam.checkpoints`) go to `<output_dir>.checkpoints/`, outside the staged
output, so a crashed run keeps them; the same command resumes from the last complete iteration.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import logging
import threading
import time

import apache_beam as beam
import numpy as np
import tensorflow as tf
from apache_beam.io.filesystem import CompressionTypes

from trainer.beam import checkpoints
from trainer.beam import layout as blocks_lib
from trainer.beam.layout import FactorRef, RowBlock
from trainer.core import loss as wals_loss
from trainer.core import problem, seeding
from trainer.core import solver as wals_solver
from trainer.core.config import WALSConfig
from trainer.core.xla import configure_xla
from transforms import features

logger = logging.getLogger(__name__)

BROADCAST = "broadcast"
JOIN = "join"
EXCHANGES = (BROADCAST, JOIN)
_SIDE_NAMES = {problem.USERS: "users", problem.ITEMS: "items"}
_METRICS = "wals_beam"


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """What the pipeline trains; everything a worker needs, picklable.

    Attributes:
        input_dir: the preprocessed dataset.
        checkpoint_dir: where factor blocks, markers and losses go.
        config: the hyperparameters.
        shape: (n_users, n_items).
        block_rows: rows per block.
        exchange: BROADCAST or JOIN.
        start_iteration: iterations already in the checkpoint (0 for a fresh run).
        fingerprint: identifies (data, config, block_rows); written into every marker.
        loss_every: evaluate the loss every this many iterations and after the last (0: never).
        fail_after: test-only fault injection: raise after writing the marker of this
            half-sweep (2·iteration − 1 for users, 2·iteration for items); 0 never.
        start_loss: compute the loss of start_iteration too (a crash lost it).
        warm_start: initial factors come from `checkpoints.write_initial` files (a warm
            start from an earlier model), not from the seeded initialisation.
    """

    input_dir: str
    checkpoint_dir: str
    config: WALSConfig
    shape: tuple[int, int]
    block_rows: int
    exchange: str = BROADCAST
    start_iteration: int = 0
    fingerprint: str = ""
    loss_every: int = 1
    fail_after: int = 0
    start_loss: bool = False
    warm_start: bool = False

    def layout(self, side: int) -> blocks_lib.BlockLayout:
        """How the rows of `side` are dealt into blocks."""
        return blocks_lib.BlockLayout(self.side_shape(side)[0], self.block_rows)

    def side_shape(self, side: int) -> tuple[int, int]:
        n_users, n_items = self.shape
        return (n_users, n_items) if side == problem.USERS else (n_items, n_users)

    def loss_due(self, iteration: int) -> bool:
        if self.loss_every <= 0:
            return False
        return iteration % self.loss_every == 0 or iteration == self.config.num_iters


# --- reading ------------------------------------------------------------------------------------


def _parse_record(
    record: bytes, layout: blocks_lib.BlockLayout
) -> tuple[int, tuple[int, np.ndarray, np.ndarray]]:
    """A `key/indices/values` Example -> (block_id, (row, column indices, ratings))."""
    example = tf.train.Example.FromString(record)
    feature = example.features.feature
    key = int(feature[features.KEY].int64_list.value[0])
    indices = np.asarray(feature[features.INDICES].int64_list.value, dtype=np.int64)
    values = np.asarray(feature[features.VALUES].float_list.value, dtype=np.float32)
    if indices.size != values.size:
        raise ValueError(f"row {key}: {indices.size} indices but {values.size} values")
    return int(layout.block_of(key)), (key, indices, values)


class ReadRowBlocks(beam.PTransform):
    """Reads one side's rows from the preprocessed TFRecords into blocks.

    Input: the pipeline root. Output: PCollection[RowBlock], one per block, including blocks
    whose rows have no cells.
    """

    def __init__(self, spec: TrainSpec, side: int):
        super().__init__()
        self._spec = spec
        self._side = side

    def expand(self, root):
        spec, side = self._spec, self._side
        name = features.ITEMS_FOR_USER if side == problem.USERS else features.USERS_FOR_ITEM
        pattern = f"{spec.input_dir}/{features.TRAIN_DIR}/{name}-*{features.TFRECORD_SUFFIX}"
        shape = spec.side_shape(side)
        layout = spec.layout(side)
        rows = (
            root
            | "ReadRecords"
            >> beam.io.ReadFromTFRecord(pattern, compression_type=CompressionTypes.GZIP)
            | "KeyByBlock" >> beam.Map(_parse_record, layout)
        )
        block_ids = (
            root
            | "BlockIds" >> beam.Create(range(layout.n_blocks))
            | "KeyBlockIds" >> beam.Map(lambda block_id: (block_id, None))
        )
        return (
            {"rows": rows, "ids": block_ids}
            | "GroupRows" >> beam.CoGroupByKey()
            | "Assemble"
            >> beam.MapTuple(
                lambda block_id, grouped: blocks_lib.assemble(
                    side, block_id, list(grouped["rows"]), layout, shape[1]
                )
            )
        )


class _CountItems(beam.CombineFn):
    """Item blocks -> c_i, int64 [n_items]: the observed cells of each item (column)."""

    def __init__(self, n_items: int):
        self._n_items = n_items

    def create_accumulator(self):
        return np.zeros(self._n_items, dtype=np.int64)

    def add_input(self, counts, block: RowBlock):
        counts[block.row_ids] += block.rows.row_counts()
        return counts

    def merge_accumulators(self, accumulators):
        accumulators = list(accumulators)
        total = accumulators[0]
        for other in accumulators[1:]:
            total = total + other
        return total

    def extract_output(self, counts):
        return counts


# --- initialisation and checkpoints ------------------------------------------------------------


def _publish(
    spec: TrainSpec, iteration: int, side: int, block_id: int, row_ids, factors
) -> FactorRef:
    """Writes a block's factors of `iteration` to the checkpoint directory; returns the
    reference the next sweeps read them by. Same inputs, same bytes: safe to retry."""
    factors = np.asarray(factors, dtype=np.float32)
    record = checkpoints.write_block(
        spec.checkpoint_dir, iteration, side, block_id, row_ids, factors
    )
    return FactorRef(side, block_id, iteration, record, _gramian_term(factors))


def _gramian_term(factors: np.ndarray) -> np.ndarray:
    """A block's term of its side's Gramian: F_bᵀ F_b, float64 [k, k] (the solver's kernel,
    on TensorFlow's thread pool rather than NumPy's BLAS)."""
    return wals_solver.gramian(factors, tf.float64).numpy()


def _read_ref(spec: TrainSpec, ref: FactorRef) -> tuple[np.ndarray, np.ndarray]:
    """(row_ids int64 [b], factors float32 [b, k]) of a reference, its SHA-256 checked."""
    return checkpoints.read_record(spec.checkpoint_dir, ref.iteration, ref.side, ref.record)


class _StashRows(beam.DoFn):
    """RowBlock -> (block_id, row_ids), after writing the block's ratings to the checkpoint
    directory (`checkpoints.write_rows_block`): the sweeps then move only factors, and a worker
    rebuilds a block's problem from that file when it has not cached it.

    With the CG solver, also emits (tag "kernels") the block's CG kernel shapes, a frozenset
    of (n_other, T, B, W, R, multi_line), n_other the length of the fixed table it is solved
    against (`_warm_up`).
    """

    def __init__(self, spec: TrainSpec):
        self._spec = spec

    def process(self, block: RowBlock):
        spec = self._spec
        checkpoints.write_rows_block(spec.checkpoint_dir, block.side, block.block_id, block.rows)
        yield block.block_id, block.row_ids
        if spec.config.solver == wals_solver.CG:
            n_other = spec.side_shape(block.side)[1]
            if spec.exchange == JOIN:
                n_other = _padded_length(np.unique(block.rows.indices).size)
            shapes = wals_solver.kernel_shapes(block.rows.row_counts(), wals_solver.CG)
            yield beam.pvalue.TaggedOutput(
                "kernels", frozenset((n_other, *shape) for shape in shapes)
            )


def _union(sets) -> frozenset:
    return frozenset().union(*sets)


# Sides whose kernels this process has compiled: {(fingerprint, exchange, side)}.
_WARMED: set = set()
_WARMED_LOCK = threading.Lock()


def _warm_up(spec: TrainSpec, side: int, kernels: frozenset) -> None:
    """Compiles the CG kernel for every tile shape of every block of `side`, once per process.

    Each tile shape costs an XLA compile (about 0.3 s) the first time a process meets it. Beam
    hands a worker different blocks in different sweeps, and blocks have some shapes of their
    own, so compiling on demand put a second of compiles into whichever later sweep first gave
    a worker a new block. Compiling the side's whole set (about ten shapes) before the first
    solve moves that cost to the first iteration, where it is paid once.
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
            wals_solver.warm_up(
                shapes, n_other, spec.config.latent_factors, tf.float32, spec.config.cg_steps
            )
        _WARMED.add(key)
    logger.info(
        "compiled %d %s kernel shapes in %.1f s",
        len(kernels),
        _SIDE_NAMES[side],
        time.perf_counter() - began,
    )


class _InitFactors(beam.DoFn):
    """(block_id, row_ids) -> the FactorRef of the block's initial factors (iteration 0):
    seeded (`trainer.core.seeding`), or a warm start's."""

    def __init__(self, spec: TrainSpec, side: int):
        self._spec = spec
        self._side = side

    def process(self, element):
        block_id, row_ids = element
        spec, config, side = self._spec, self._spec.config, self._side
        if spec.warm_start:
            initial = checkpoints.read_initial(
                spec.checkpoint_dir, side, spec.layout(side), block_id, config.latent_factors
            )
        else:
            keys = checkpoints.read_keys(spec.checkpoint_dir, side, spec.layout(side), block_id)
            initial = seeding.initial_factors(
                keys, config.latent_factors, config.init_stddev, config.seed, side
            )
        yield _publish(spec, 0, side, block_id, row_ids, initial)


class _LoadFactors(beam.DoFn):
    """(block_id, row_ids) -> the FactorRef of the block in a verified checkpoint."""

    def __init__(self, spec: TrainSpec, side: int, marker: dict):
        self._spec = spec
        self._side = side
        self._marker = marker

    def process(self, element):
        block_id, row_ids = element
        records = {record["block"]: record for record in self._marker["blocks"]}
        stored_ids, factors = checkpoints.read_block(
            self._spec.checkpoint_dir, self._marker, block_id
        )
        if not np.array_equal(stored_ids, row_ids):
            raise ValueError(f"checkpoint block {block_id} holds other rows")
        yield FactorRef(
            self._side,
            block_id,
            self._spec.start_iteration,
            records[block_id],
            _gramian_term(factors),
        )


@dataclasses.dataclass(frozen=True)
class SideState:
    """One side's factors after a half-sweep, as the other side's solves see them.

    A singleton side input of a few kilobytes per block: the Gramian and where the factors are.

    Attributes:
        side: USERS or ITEMS.
        iteration: the iteration of the factors (0: initial).
        records: the checkpoint records of every block's file, by block.
        gramian: float64 [k, k], G = Σ_b F_bᵀ F_b.
    """

    side: int
    iteration: int
    records: tuple[dict, ...]
    gramian: np.ndarray


class _CombineState(beam.CombineFn):
    """FactorRef -> SideState: the blocks' records gathered and their Gramian terms added."""

    def __init__(self, k: int):
        self._k = k

    def create_accumulator(self):
        return [], np.zeros((self._k, self._k), dtype=np.float64)

    def add_input(self, accumulator, ref: FactorRef):
        refs, gram = accumulator
        refs.append((ref.side, ref.iteration, ref.record))
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
        records = tuple(sorted((record for _, _, record in refs), key=lambda r: r["block"]))
        return SideState(side, iteration, records, gram)


class _WriteMarker(beam.DoFn):
    """SideState -> writes the half-sweep's completion marker (every block file is written
    before its reference reaches the state)."""

    def __init__(self, spec: TrainSpec):
        self._spec = spec

    def process(self, state: SideState):
        spec = self._spec
        expected = spec.layout(state.side).n_blocks
        if len(state.records) != expected:
            raise RuntimeError(f"{len(state.records)} of {expected} blocks written")
        checkpoints.write_marker(
            spec.checkpoint_dir, state.iteration, state.side, spec.fingerprint, state.records
        )
        sweep = 2 * state.iteration - (1 if state.side == problem.USERS else 0)
        if spec.fail_after and sweep == spec.fail_after:
            raise RuntimeError(f"test fault injected after half-sweep {sweep}")
        yield sweep


class Checkpoint(beam.PTransform):
    """PCollection[FactorRef] of one side after a half-sweep -> PCollection[SideState], one
    element, the other side's side input; with `marker`, also writes the half-sweep's
    completion marker `iter-NNNN/<side>/_COMPLETE` naming every block file with its size and
    SHA-256, so that a reader can tell a complete checkpoint.
    """

    def __init__(self, spec: TrainSpec, marker: bool = True):
        super().__init__()
        self._spec = spec
        self._marker = marker

    def expand(self, refs):
        state = (
            refs
            | "State"
            >> beam.CombineGlobally(
                _CombineState(self._spec.config.latent_factors)
            ).without_defaults()
        )
        if self._marker:
            _ = state | "WriteMarker" >> beam.ParDo(_WriteMarker(self._spec))
        return state


# --- the sweeps --------------------------------------------------------------------------------

# The broadcast exchange's fixed tables: each worker process reads a side's whole table from the
# checkpoint files once per half-sweep and keeps the newest few (one per side is in use).
_TABLES: collections.OrderedDict = collections.OrderedDict()
_TABLES_LOCK = threading.Lock()
TABLES_KEPT = 2


def _fixed_table(spec: TrainSpec, state: SideState) -> np.ndarray:
    """The whole table of `state`'s side, float32 [n, k], read from its block files."""
    key = (spec.checkpoint_dir, state.side, state.iteration) + tuple(
        record["sha256"] for record in state.records
    )
    with _TABLES_LOCK:
        if key in _TABLES:
            _TABLES.move_to_end(key)
            return _TABLES[key]
        n = spec.side_shape(state.side)[0]
        table = np.zeros((n, spec.config.latent_factors), dtype=np.float32)
        seen = 0
        for record in state.records:
            row_ids, factors = checkpoints.read_record(
                spec.checkpoint_dir, state.iteration, state.side, record
            )
            table[row_ids] = factors
            seen += row_ids.size
        if seen != n:
            raise RuntimeError(f"{_SIDE_NAMES[state.side]} factor table has {seen} of {n} rows")
        _TABLES[key] = table
        while len(_TABLES) > TABLES_KEPT:
            _TABLES.popitem(last=False)
        return table


def _needs(block: RowBlock, fixed_layout: blocks_lib.BlockLayout):
    """RowBlock -> (fixed block, (solving block, fixed rows it needs)) for the join exchange.

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


class _WriteRequests(beam.DoFn):
    """(fixed block, [(solving block, rows)]) -> (fixed block, the record of its requests file
    `checkpoints.write_requests`), once per launch."""

    def __init__(self, spec: TrainSpec, solving_side: int):
        self._spec = spec
        self._solving_side = solving_side

    def process(self, element):
        fixed_block, requests = element
        yield (
            fixed_block,
            checkpoints.write_requests(
                self._spec.checkpoint_dir, self._solving_side, fixed_block, list(requests)
            ),
        )


def _send(ref: FactorRef, spec: TrainSpec, request_records: dict):
    """A fixed block's FactorRef -> (solving block, (fixed rows int64 [m], their factors float32
    [m, k])) for each solving block that asked (its requests file, read with its factors)."""
    record = request_records.get(ref.block_id)
    if record is None:
        return
    requests = checkpoints.read_requests(spec.checkpoint_dir, 1 - ref.side, ref.block_id, record)
    _, factors = _read_ref(spec, ref)
    position = spec.layout(ref.side).position
    for destination, rows in requests:
        yield destination, (rows, factors[position(rows)])


# A block's problem and plan are pure functions of (run, exchange, side, block), so a worker keeps
# the ones it built: later sweeps over the same block skip reading its rows, `define_rows` and
# `plan_rows`. The cache is bounded by padded tile slots (least recently used out first) and never
# changes a result, so it is safe under retries and any assignment of blocks to workers.
_PLAN_CACHE: collections.OrderedDict = collections.OrderedDict()
_PLAN_CACHE_LOCK = threading.Lock()
PLAN_CACHE_SLOTS = 1 << 27  # about 1.5 GB of float32 tiles per worker process


@dataclasses.dataclass(frozen=True)
class _BlockProblem:
    """A block's problem, ready to solve.

    Attributes:
        problem: f, targets and λ of the block's rows; with the join exchange the targets'
            columns are positions in `needed`, else global indices of the fixed side.
        plan: the solver's tiles for `problem`.
        needed: join: int64 [m], the fixed rows the block's cells touch, ascending (the rows
            whose factors it receives; the problem's column count is `_padded_length(m)`);
            broadcast: None.
    """

    problem: problem.RowProblem
    plan: wals_solver.RowPlan
    needed: np.ndarray | None


def _cached(key, build):
    """`build()` once per key and process, LRU-bounded by PLAN_CACHE_SLOTS."""
    with _PLAN_CACHE_LOCK:
        if key in _PLAN_CACHE:
            _PLAN_CACHE.move_to_end(key)
            return _PLAN_CACHE[key]
    value = build()
    with _PLAN_CACHE_LOCK:
        _PLAN_CACHE[key] = value
        total = sum(cached.plan.padded_slots for cached in _PLAN_CACHE.values())
        while total > PLAN_CACHE_SLOTS and len(_PLAN_CACHE) > 1:
            _, evicted = _PLAN_CACHE.popitem(last=False)
            total -= evicted.plan.padded_slots
    return value


def _block_problem(spec: TrainSpec, side: int, block_id: int, item_counts) -> _BlockProblem:
    """The cached problem of a block, built from its rows file on a miss.

    The problem is defined on global columns (f looks up c_i by item), then, with the join
    exchange, its columns are renumbered to positions in the fixed rows it receives.
    """

    def build():
        rows = checkpoints.read_rows_block(spec.checkpoint_dir, side, block_id)
        row_items = spec.layout(side).rows_of(block_id) if side == problem.ITEMS else None
        defined = problem.define_rows(rows, side, item_counts, spec.config, row_items)
        needed = None
        if spec.exchange == JOIN:
            needed = np.unique(rows.indices).astype(np.int64)
            targets = dataclasses.replace(
                defined.targets,
                indices=np.searchsorted(needed, rows.indices),
                shape=(rows.shape[0], _padded_length(needed.size)),
            )
            defined = dataclasses.replace(defined, targets=targets)
        return _BlockProblem(defined, defined.plan(spec.config.solver), needed)

    return _cached((spec.fingerprint, spec.exchange, side, block_id), build)


class _Solve(beam.DoFn):
    """Solves a block against the fixed side: FactorRef -> the FactorRef of its new factors
    (written to the checkpoint directory as iteration `iteration`).

    With `loss` set, also emits (tag "loss") the block's `LossSums` of its *incoming* factors
    against the fixed factors: the observed and regularisation terms of the previous iteration.
    With `solve` off, emits only those sums.
    """

    def __init__(self, spec: TrainSpec, side: int, iteration: int, loss: bool, solve: bool):
        self._spec = spec
        self._side = side
        self._iteration = iteration
        self._loss = loss
        self._solve = solve

    def setup(self):
        configure_xla()  # before this worker's first XLA compile

    def process(
        self, element, item_counts, fixed_state: SideState, kernels=frozenset(), solving_refs=None
    ):
        spec, config = self._spec, self._spec.config
        if self._solve and kernels:
            _warm_up(spec, self._side, kernels)
        if spec.exchange == JOIN:
            ref, received, table = _joined(element, solving_refs, config.latent_factors)
            solving = _block_problem(spec, self._side, ref.block_id, item_counts)
            if not np.array_equal(received, solving.needed):
                raise RuntimeError(
                    f"{_SIDE_NAMES[self._side]} block {ref.block_id} received the factors of "
                    f"{received.size} rows, but its cells touch {solving.needed.size}"
                )
            table = _pad_rows(table, solving.problem.targets.shape[1])
        else:
            ref = element
            table = _fixed_table(spec, fixed_state)
            solving = _block_problem(spec, self._side, ref.block_id, item_counts)
        row_ids, factors = _read_ref(spec, ref)
        if self._loss:
            fixed = table if self._side == problem.USERS else None
            yield beam.pvalue.TaggedOutput(
                "loss", wals_loss.loss_sums(solving.problem, factors, fixed)
            )
        if not self._solve:
            return
        beam.metrics.Metrics.counter(_METRICS, f"solved_{_SIDE_NAMES[self._side]}").inc(
            row_ids.size
        )
        with _gc_paused():
            solved = wals_solver.solve_planned(
                solving.plan,
                table,
                fixed_state.gramian.astype(np.float32),
                config.solver,
                x0=factors,
                cg_steps=config.cg_steps,
                jit_compile=True,
            ).numpy()
        yield _publish(spec, self._iteration, self._side, ref.block_id, row_ids, solved)


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


def _padded_length(m: int) -> int:
    """The join's local fixed table length for m received rows: the next power of two ≥ m.

    The XLA-compiled kernel is specialised to its inputs' shapes, the fixed table's included:
    each join block receives a table of its own length, and unpadded every block would compile
    its own kernels (seconds each). Its columns index only the first m rows, so zero rows
    after them change nothing.
    """
    return 1 << max(m - 1, 0).bit_length()


def _pad_rows(table: np.ndarray, length: int) -> np.ndarray:
    """float32 [m, k] -> [length, k], the added rows zero."""
    m, k = table.shape
    if length == m:
        return table
    return np.concatenate([table, np.zeros((length - m, k), table.dtype)])


def _joined(element, solving_refs: dict, k: int):
    """(block_id, [(fixed rows, factors)]) -> (the block's reference, the fixed rows it received
    int64 [m] ascending, their factors float32 [m, k])."""
    block_id, parts = element
    ref = solving_refs[block_id]
    parts = list(parts)
    if not parts:
        return ref, np.zeros(0, np.int64), np.zeros((0, k), np.float32)
    ids = np.concatenate([rows for rows, _ in parts])
    vectors = np.concatenate([factors for _, factors in parts])
    order = np.argsort(ids, kind="stable")
    return ref, ids[order], vectors[order]


class HalfSweep(beam.PTransform):
    """Solves every block of one side against the other side's current factors.

    Inputs: (solving PCollection[FactorRef], fixed PCollection[FactorRef], the fixed side's
    PCollection[SideState] (one element)); item_counts a singleton int64 [n_items]; kernels a
    singleton, the solving side's CG kernel shapes (`_StashRows`; empty for Cholesky), which
    every worker compiles before its first solve of the side (`_warm_up`); with the join
    exchange, the records of the solving side's requests files, (fixed block, record).
    Output: (PCollection[FactorRef] of the new factors, PCollection[LossSums] of the incoming
    factors, or None).

    broadcast: each worker reads the fixed table from the files the state names (once per
    process and half-sweep, `_fixed_table`). join: each fixed block reads its own file and its
    requests file and sends every solving block the rows it asked for (fused into the stage
    that produced the fixed block); one GroupByKey by solving block gathers them, and the
    solving blocks' references come as a side input, so the only shuffle is the vectors.
    """

    def __init__(
        self,
        spec,
        side,
        iteration,
        item_counts,
        kernels,
        requests=None,
        loss=False,
        solve=True,
    ):
        super().__init__()
        self._spec = spec
        self._side = side
        self._iteration = iteration
        self._item_counts = item_counts
        self._kernels = kernels
        self._requests = requests
        self._loss = loss
        self._solve = solve

    def expand(self, pcolls):
        solving, fixed, fixed_state = pcolls
        spec = self._spec
        main = solving
        side_inputs = {
            "item_counts": beam.pvalue.AsSingleton(self._item_counts),
            "fixed_state": beam.pvalue.AsSingleton(fixed_state),
            "kernels": beam.pvalue.AsSingleton(self._kernels),
        }
        if spec.exchange == JOIN:
            main = (
                fixed
                | "SendFactors" >> beam.FlatMap(_send, spec, beam.pvalue.AsDict(self._requests))
                | "JoinFactors" >> beam.GroupByKey()
            )
            keyed = solving | "KeySolving" >> beam.Map(lambda ref: (ref.block_id, ref))
            side_inputs["solving_refs"] = beam.pvalue.AsDict(keyed)
        outputs = main | "Solve" >> beam.ParDo(
            _Solve(spec, self._side, self._iteration, self._loss, self._solve), **side_inputs
        ).with_outputs("loss", main="blocks")
        return outputs.blocks, (outputs.loss if self._loss else None)


class _FinishLoss(beam.DoFn):
    """LossSums of all blocks -> writes the iteration's loss with the two Gramians."""

    def __init__(self, spec: TrainSpec, iteration: int):
        self._spec = spec
        self._iteration = iteration

    def process(self, sums, users: SideState, items: SideState):
        loss = sums.finish(users.gramian, items.gramian, self._spec.config.unobserved_weight)
        checkpoints.write_loss(self._spec.checkpoint_dir, self._iteration, loss)
        yield loss


def _sum_losses(parts):
    total = wals_loss.LossSums()
    for part in parts:
        total = total + part
    return total


def _regularization_sums(ref: FactorRef, spec: TrainSpec, item_counts) -> wals_loss.LossSums:
    solving = _block_problem(spec, ref.side, ref.block_id, item_counts)
    _, factors = _read_ref(spec, ref)
    return wals_loss.loss_sums(solving.problem, factors, None)


def build(root, spec: TrainSpec, markers: dict | None = None) -> None:
    """Adds the whole training to a pipeline.

    Args:
        root: the pipeline.
        spec: what to train.
        markers: {side: marker} of the checkpoint to resume from (spec.start_iteration), or
            None to start from the seeded initialisation.
    """
    config = spec.config
    sides = {}
    requests = {}
    kernels = {}
    item_counts = None
    for side in problem.SIDES:
        name = _SIDE_NAMES[side].capitalize()
        rows = root | f"Read{name}" >> ReadRowBlocks(spec, side)
        if side == problem.ITEMS:
            item_counts = (
                rows
                | "CountItems"
                >> beam.CombineGlobally(_CountItems(spec.shape[1])).without_defaults()
            )
        if spec.exchange == JOIN:
            requests[side] = (
                rows
                | f"Requests{name}" >> beam.FlatMap(_needs, spec.layout(1 - side))
                | f"GroupRequests{name}" >> beam.GroupByKey()
                | f"WriteRequests{name}" >> beam.ParDo(_WriteRequests(spec, side))
            )
        stash = rows | f"Stash{name}Rows" >> beam.ParDo(_StashRows(spec)).with_outputs(
            "kernels", main="stashed"
        )
        stashed = stash.stashed
        kernels[side] = stash.kernels | f"{name}Kernels" >> beam.CombineGlobally(_union)
        if markers:
            sides[side] = stashed | f"Load{name}" >> beam.ParDo(
                _LoadFactors(spec, side, markers[side])
            )
        else:
            sides[side] = stashed | f"Init{name}" >> beam.ParDo(_InitFactors(spec, side))
    users, items = sides[problem.USERS], sides[problem.ITEMS]
    start = "Resume" if markers else "Initial"
    items_state = items | f"{start}ItemsState" >> Checkpoint(spec, marker=False)
    users_state = None
    if spec.start_loss:
        users_state = users | f"{start}UsersState" >> Checkpoint(spec, marker=False)
    for iteration in range(spec.start_iteration + 1, config.num_iters + 2):
        last = iteration == config.num_iters + 1
        # The loss of iteration t is computed while solving users in iteration t + 1 (from the
        # incoming X_t and Y_t), or by a loss-only pass after the last iteration.
        previous_loss = spec.loss_due(iteration - 1) and (
            iteration - 1 > spec.start_iteration or (spec.start_loss and iteration - 1 > 0)
        )
        if last and not previous_loss:
            break
        label = "FinalLoss" if last else f"Iter{iteration:04d}"
        new_users, sums = (users, items, items_state) | f"{label}/SolveUsers" >> HalfSweep(
            spec,
            problem.USERS,
            iteration,
            item_counts,
            kernels[problem.USERS],
            requests.get(problem.USERS),
            loss=previous_loss,
            solve=not last,
        )
        if previous_loss:
            regs = items | f"{label}/ItemRegularization" >> beam.Map(
                _regularization_sums, spec, beam.pvalue.AsSingleton(item_counts)
            )
            (
                (sums, regs)
                | f"{label}/FlattenLoss" >> beam.Flatten()
                | f"{label}/SumLoss" >> beam.CombineGlobally(_sum_losses).without_defaults()
                | f"{label}/WriteLoss"
                >> beam.ParDo(
                    _FinishLoss(spec, iteration - 1),
                    beam.pvalue.AsSingleton(users_state),
                    beam.pvalue.AsSingleton(items_state),
                )
            )
        if last:
            break
        users = new_users
        users_state = users | f"{label}/CheckpointUsers" >> Checkpoint(spec)
        items, _ = (items, users, users_state) | f"{label}/SolveItems" >> HalfSweep(
            spec,
            problem.ITEMS,
            iteration,
            item_counts,
            kernels[problem.ITEMS],
            requests.get(problem.ITEMS),
        )
        items_state = items | f"{label}/CheckpointItems" >> Checkpoint(spec)
