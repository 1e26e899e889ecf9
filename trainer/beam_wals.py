"""The distributed WALS trainer: one Beam pipeline that unrolls every iteration.

    python -m trainer.task --distributed --input_dir D --output_dir M \
        [--factor_exchange broadcast|join] [--block_rows 4096] [any Beam pipeline option]

Elements are blocks of thousands of whole rows (`trainer.blocks.RowBlock`), never single rows or
cells, so Beam's per-element cost is paid a few hundred times per sweep. Each half-sweep solves
every block of one side against the other side's factors, with the math of the local trainer:
`trainer.problem.define_rows` per block, then `trainer.solver.solve_planned`.

    once:   rows of each side | StashRows      (each block's ratings to the checkpoint dir)
    iteration t:
      users_t = users_{t-1} | SolveUsers(G = Σ_blocks Y_bᵀY_b,  Y = items_{t-1})
      items_t = items_{t-1} | SolveItems(G = Σ_blocks X_bᵀX_b,  X = users_t)
      users_t, items_t | WriteCheckpoint      (one file per block, the marker last)

Only factors move between sweeps (`FactorBlock`: row IDs and float32 [b, k]); the ratings stay
where they are, as Spark's ALS caches its in-blocks. A worker keeps each block's problem and solve
plan after building it once (`_block_problem`) and rebuilds it from the stashed rows file on a
miss (a new or restarted worker, or an evicted entry).

The Gramian G is a CombineFn over factor blocks (k x k partial sums), a singleton side input of
every solve. The fixed factors reach a solving block in one of two ways (`--factor_exchange`):

    broadcast   the whole fixed table ([n_fixed, k] float32) is a singleton side input; every
                worker holds one copy. Simple and fast while n_fixed · k · 4 bytes fits easily.
    join        Spark ALS's block join: once per run, each solving block lists the fixed rows
                its cells touch, grouped by the fixed block that owns them. Every sweep, each
                fixed block sends exactly those vectors to the solving blocks that asked, and
                a CoGroupByKey joins them with the solving block. Shuffles Σ_b |cols(b)| · k · 4
                bytes per sweep; no worker needs the whole table.

Every DoFn is a pure function of its inputs (initial factors are keyed by the rows' original IDs,
`trainer.seeding`), so bundle retries cannot double count and the result does not depend on the
runner, the number of workers or the block size beyond float round-off.

Checkpoints (`trainer.checkpoints`) go to `<output_dir>.checkpoints/`, outside the staged
output, so a crashed run keeps them; the same command resumes from the last complete iteration.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading

import apache_beam as beam
import numpy as np
import tensorflow as tf
from apache_beam.io.filesystem import CompressionTypes

from trainer import blocks as blocks_lib
from trainer import checkpoints, problem, seeding
from trainer import solver as wals_solver
from trainer.blocks import FactorBlock, RowBlock
from trainer.config import WALSConfig
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


class _StashRows(beam.DoFn):
    """RowBlock -> its FactorBlock, after writing the block's ratings to the checkpoint
    directory (`checkpoints.write_rows_block`): the sweeps then move only factors, and a worker
    rebuilds a block's problem from that file when it has not cached it."""

    def __init__(self, spec: TrainSpec):
        self._spec = spec

    def process(self, block: RowBlock):
        checkpoints.write_rows_block(
            self._spec.checkpoint_dir, block.side, block.block_id, block.rows
        )
        yield block.factor_block()


class _InitFactors(beam.DoFn):
    """FactorBlock -> the same block with its initial factors: seeded (`trainer.seeding`), or
    a warm start's."""

    def __init__(self, spec: TrainSpec, side: int):
        self._spec = spec
        self._side = side

    def process(self, block: FactorBlock):
        config = self._spec.config
        if self._spec.warm_start:
            yield block.with_factors(
                checkpoints.read_initial(
                    self._spec.checkpoint_dir,
                    self._side,
                    self._spec.layout(self._side),
                    block.block_id,
                    config.latent_factors,
                )
            )
            return
        keys = checkpoints.read_keys(
            self._spec.checkpoint_dir, self._side, self._spec.layout(self._side), block.block_id
        )
        yield block.with_factors(
            seeding.initial_factors(
                keys, config.latent_factors, config.init_stddev, config.seed, self._side
            )
        )


class _LoadFactors(beam.DoFn):
    """FactorBlock -> the same block with its factors from a verified checkpoint."""

    def __init__(self, spec: TrainSpec, side: int, marker: dict):
        self._spec = spec
        self._side = side
        self._marker = marker

    def process(self, block: FactorBlock):
        row_ids, factors = checkpoints.read_block(
            self._spec.checkpoint_dir, self._marker, block.block_id
        )
        if not np.array_equal(row_ids, block.row_ids):
            raise ValueError(f"checkpoint block {block.block_id} holds other rows")
        yield block.with_factors(factors)


class _WriteBlock(beam.DoFn):
    """FactorBlock -> (block_id, file record) after writing its factors (retry-safe: same
    bytes)."""

    def __init__(self, spec: TrainSpec, iteration: int, side: int):
        self._spec = spec
        self._iteration = iteration
        self._side = side

    def process(self, block: FactorBlock):
        yield checkpoints.write_block(
            self._spec.checkpoint_dir,
            self._iteration,
            self._side,
            block.block_id,
            block.row_ids,
            block.factors,
        )


class _WriteMarker(beam.DoFn):
    """[file records] -> writes the half-sweep's completion marker, last."""

    def __init__(self, spec: TrainSpec, iteration: int, side: int):
        self._spec = spec
        self._iteration = iteration
        self._side = side

    def process(self, records: list[dict]):
        spec = self._spec
        expected = spec.layout(self._side).n_blocks
        if len(records) != expected:
            raise RuntimeError(f"{len(records)} of {expected} blocks written")
        checkpoints.write_marker(
            spec.checkpoint_dir, self._iteration, self._side, spec.fingerprint, records
        )
        sweep = 2 * self._iteration - (1 if self._side == problem.USERS else 0)
        if spec.fail_after and sweep == spec.fail_after:
            raise RuntimeError(f"test fault injected after half-sweep {sweep}")
        yield sweep


class WriteCheckpoint(beam.PTransform):
    """PCollection[FactorBlock] -> PCollection[int] (the half-sweep's number, once complete).

    Writes `iter-NNNN/<side>/block-NNNNN.npz` per block, then the marker `_COMPLETE` naming
    every file with its size and SHA-256, so a reader can tell a complete checkpoint.
    """

    def __init__(self, spec: TrainSpec, iteration: int, side: int):
        super().__init__()
        self._args = (spec, iteration, side)

    def expand(self, blocks):
        return (
            blocks
            | "WriteBlocks" >> beam.ParDo(_WriteBlock(*self._args))
            | "Gather" >> beam.combiners.ToList()
            | "WriteMarker" >> beam.ParDo(_WriteMarker(*self._args))
        )


# --- the sweeps --------------------------------------------------------------------------------


class _Gramian(beam.CombineFn):
    """FactorBlock -> G = Σ_blocks F_bᵀ F_b, float64 [k, k]."""

    def __init__(self, k: int):
        self._k = k

    def create_accumulator(self):
        return np.zeros((self._k, self._k), dtype=np.float64)

    def add_input(self, gram, block: FactorBlock):
        f = block.factors.astype(np.float64)
        return gram + f.T @ f

    def merge_accumulators(self, accumulators):
        return sum(accumulators, np.zeros((self._k, self._k), dtype=np.float64))

    def extract_output(self, gram):
        return gram


class _GramianAndTable(beam.CombineFn):
    """FactorBlock -> (G = Σ_blocks F_bᵀ F_b float64 [k, k], the whole table float32 [n, k]).

    The broadcast exchange needs both of the fixed side; one combine makes them in one stage.
    """

    def __init__(self, n: int, k: int):
        self._gramian = _Gramian(k)
        self._table = _Table(n, k)

    def create_accumulator(self):
        return self._gramian.create_accumulator(), self._table.create_accumulator()

    def add_input(self, accumulator, block: FactorBlock):
        gram, parts = accumulator
        return self._gramian.add_input(gram, block), self._table.add_input(parts, block)

    def merge_accumulators(self, accumulators):
        grams, parts = zip(*accumulators)
        return (
            self._gramian.merge_accumulators(grams),
            self._table.merge_accumulators(parts),
        )

    def extract_output(self, accumulator):
        gram, parts = accumulator
        return gram, self._table.extract_output(parts)


class _Table(beam.CombineFn):
    """FactorBlock -> the whole side's factor table, float32 [n, k] (the broadcast side
    input)."""

    def __init__(self, n: int, k: int):
        self._n = n
        self._k = k

    def create_accumulator(self):
        return []

    def add_input(self, parts, block: FactorBlock):
        parts.append((block.row_ids, block.factors))
        return parts

    def merge_accumulators(self, accumulators):
        return [part for parts in accumulators for part in parts]

    def extract_output(self, parts):
        table = np.zeros((self._n, self._k), dtype=np.float32)
        seen = 0
        for row_ids, factors in parts:
            table[row_ids] = factors
            seen += row_ids.size
        if seen != self._n:
            raise RuntimeError(f"factor table has {seen} of {self._n} rows")
        return table


def _needs(block: RowBlock, fixed_layout: blocks_lib.BlockLayout):
    """RowBlock -> (fixed block, (solving block, fixed rows it needs)) for the join exchange."""
    cols = np.unique(block.rows.indices).astype(np.int64)
    owners = fixed_layout.block_of(cols)
    for owner in np.unique(owners):
        yield int(owner), (block.block_id, cols[owners == owner])


def _send(element, fixed_layout: blocks_lib.BlockLayout):
    """(fixed block, {block: [FactorBlock], requests}) -> (solving block, (fixed rows int64
    [m], their factors float32 [m, k])) for each solving block that asked."""
    _, grouped = element
    (fixed,) = grouped["block"]
    for destination, rows in grouped["requests"]:
        yield destination, (rows, fixed.factors[fixed_layout.position(rows)])


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
    """Solves a block against the fixed side: FactorBlock -> FactorBlock with new factors.

    With `loss` set, also emits (tag "loss") the block's `LossSums` of its *incoming* factors
    against the fixed factors: the observed and regularisation terms of the previous iteration.
    With `solve` off, emits only those sums.
    """

    def __init__(self, spec: TrainSpec, side: int, loss: bool, solve: bool = True):
        self._spec = spec
        self._side = side
        self._loss = loss
        self._solve = solve

    def process(self, element, item_counts, gramian=None, table=None, fixed_state=None):
        spec, config = self._spec, self._spec.config
        if fixed_state is not None:  # broadcast: (G, the whole fixed table)
            gramian, table = fixed_state
        if spec.exchange == JOIN:
            block, received, table = _joined(element)
            solving = _block_problem(spec, self._side, block.block_id, item_counts)
            if not np.array_equal(received, solving.needed):
                raise RuntimeError(
                    f"{_SIDE_NAMES[self._side]} block {block.block_id} received the factors of "
                    f"{received.size} rows, but its cells touch {solving.needed.size}"
                )
            table = _pad_rows(table, solving.problem.targets.shape[1])
        else:
            block = element
            solving = _block_problem(spec, self._side, block.block_id, item_counts)
        if self._loss:
            fixed = table if self._side == problem.USERS else None
            yield beam.pvalue.TaggedOutput(
                "loss", problem.loss_sums(solving.problem, block.factors, fixed)
            )
        if not self._solve:
            return
        beam.metrics.Metrics.counter(_METRICS, f"solved_{_SIDE_NAMES[self._side]}").inc(
            block.row_ids.size
        )
        solved = wals_solver.solve_planned(
            solving.plan,
            table,
            gramian.astype(np.float32),
            config.solver,
            x0=block.factors,
            cg_steps=config.cg_steps,
            jit_compile=True,
        )
        yield block.with_factors(solved.numpy())


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


def _joined(element):
    """(block_id, {block: [FactorBlock], parts: [(fixed rows, factors)]}) -> (the block, the
    fixed rows it received int64 [m] ascending, their factors float32 [m, k])."""
    _, grouped = element
    (block,) = grouped["block"]
    parts = list(grouped["parts"])
    if not parts:
        k = block.factors.shape[1]
        return block, np.zeros(0, np.int64), np.zeros((0, k), np.float32)
    ids = np.concatenate([rows for rows, _ in parts])
    vectors = np.concatenate([factors for _, factors in parts])
    order = np.argsort(ids, kind="stable")
    return block, ids[order], vectors[order]


class HalfSweep(beam.PTransform):
    """Solves every block of one side against the other side's current factors.

    Inputs: (solving PCollection[FactorBlock], fixed PCollection[FactorBlock]); item_counts a
    singleton int64 [n_items]; with the join exchange, the solving side's requests
    (`_needs`). Output: (PCollection[FactorBlock] with new factors,
    PCollection[LossSums] of the incoming factors, or None), and the fixed side's Gramian.
    """

    def __init__(self, spec, side, item_counts, requests=None, loss=False, solve=True):
        super().__init__()
        self._spec = spec
        self._side = side
        self._item_counts = item_counts
        self._requests = requests
        self._loss = loss
        self._solve = solve

    def expand(self, pcolls):
        solving, fixed = pcolls
        spec = self._spec
        k = spec.config.latent_factors
        n_fixed = spec.side_shape(self._side)[1]
        side_inputs = {"item_counts": beam.pvalue.AsSingleton(self._item_counts)}
        if spec.exchange == BROADCAST:
            state = fixed | "GramianAndTable" >> beam.CombineGlobally(_GramianAndTable(n_fixed, k))
            gramian = state | "Gramian" >> beam.Map(lambda pair: pair[0])
            side_inputs["fixed_state"] = beam.pvalue.AsSingleton(state)
            main = solving
        else:
            gramian = fixed | "Gramian" >> beam.CombineGlobally(_Gramian(k))
            side_inputs["gramian"] = beam.pvalue.AsSingleton(gramian)
            sent = (
                {
                    "block": fixed | "KeyFixed" >> beam.Map(lambda b: (b.block_id, b)),
                    "requests": self._requests,
                }
                | "MatchRequests" >> beam.CoGroupByKey()
                | "SendFactors" >> beam.FlatMap(_send, spec.layout(1 - self._side))
            )
            main = {
                "block": solving | "KeySolving" >> beam.Map(lambda b: (b.block_id, b)),
                "parts": sent,
            } | "JoinFactors" >> beam.CoGroupByKey()
        outputs = main | "Solve" >> beam.ParDo(
            _Solve(spec, self._side, self._loss, self._solve), **side_inputs
        ).with_outputs("loss", main="blocks")
        return outputs.blocks, (outputs.loss if self._loss else None), gramian


class _FinishLoss(beam.DoFn):
    """LossSums of all blocks -> writes the iteration's loss with the two Gramians."""

    def __init__(self, spec: TrainSpec, iteration: int):
        self._spec = spec
        self._iteration = iteration

    def process(self, sums, gramian_users, gramian_items):
        loss = sums.finish(gramian_users, gramian_items, self._spec.config.unobserved_weight)
        checkpoints.write_loss(self._spec.checkpoint_dir, self._iteration, loss)
        yield loss


def _sum_losses(parts):
    total = problem.LossSums()
    for part in parts:
        total = total + part
    return total


def _regularization_sums(block: FactorBlock, spec: TrainSpec, item_counts) -> problem.LossSums:
    solving = _block_problem(spec, block.side, block.block_id, item_counts)
    return problem.loss_sums(solving.problem, block.factors, None)


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
    item_counts = None
    for side in problem.SIDES:
        name = _SIDE_NAMES[side].capitalize()
        rows = root | f"Read{name}" >> ReadRowBlocks(spec, side)
        if side == problem.ITEMS:
            item_counts = rows | "CountItems" >> beam.CombineGlobally(_CountItems(spec.shape[1]))
        if spec.exchange == JOIN:
            requests[side] = rows | f"Requests{name}" >> beam.FlatMap(_needs, spec.layout(1 - side))
        stashed = rows | f"Stash{name}Rows" >> beam.ParDo(_StashRows(spec))
        if markers:
            sides[side] = stashed | f"Load{name}" >> beam.ParDo(
                _LoadFactors(spec, side, markers[side])
            )
        else:
            sides[side] = stashed | f"Init{name}" >> beam.ParDo(_InitFactors(spec, side))
    users, items = sides[problem.USERS], sides[problem.ITEMS]

    gramian_users = None
    if spec.start_loss:
        k = config.latent_factors
        gramian_users = users | "StartGramian" >> beam.CombineGlobally(_Gramian(k))
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
        new_users, sums, gramian_items = (users, items) | f"{label}/SolveUsers" >> HalfSweep(
            spec,
            problem.USERS,
            item_counts,
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
                | f"{label}/SumLoss" >> beam.CombineGlobally(_sum_losses)
                | f"{label}/WriteLoss"
                >> beam.ParDo(
                    _FinishLoss(spec, iteration - 1),
                    beam.pvalue.AsSingleton(gramian_users),
                    beam.pvalue.AsSingleton(gramian_items),
                )
            )
        if last:
            break
        users = new_users
        _ = users | f"{label}/CheckpointUsers" >> WriteCheckpoint(spec, iteration, problem.USERS)
        items, _, gramian_users = (items, users) | f"{label}/SolveItems" >> HalfSweep(
            spec, problem.ITEMS, item_counts, requests.get(problem.ITEMS)
        )
        _ = items | f"{label}/CheckpointItems" >> WriteCheckpoint(spec, iteration, problem.ITEMS)
