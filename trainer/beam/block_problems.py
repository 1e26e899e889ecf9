"""Each block's problem and solve plan, built once per worker and kept.

A block's problem (f, targets and λ of its rows: `trainer.core.problem.define_rows`) and its
solve plan are pure functions of (run, exchange, side, block), so a worker keeps the ones it
built, as Spark's ALS caches its in-blocks: later sweeps over the same block skip reading its
ratings, `define_rows` and `plan_rows`. On a miss (a new or restarted worker, or an evicted
entry) the problem is rebuilt from the ratings file the launch stashed
(`checkpoint_files.read_ratings`). The cache is bounded by padded tile slots (least recently
used out first) and never changes a result, so it is safe under retries and any assignment of
blocks to workers.
"""

from __future__ import annotations

import collections
import dataclasses
import threading

import numpy as np

from trainer.beam import checkpoint_files as files
from trainer.beam.spec import JOIN, TrainSpec
from trainer.core import problem
from trainer.core import solver as wals_solver
from trainer.core.sides import Side
from trainer.core.tiling import padded_fixed_length

_PLAN_CACHE: collections.OrderedDict = collections.OrderedDict()
_PLAN_CACHE_LOCK = threading.Lock()
# About 2 GB of problems per worker process: ~16 bytes a slot (`benchmarks.worker_bounds`); the
# tensors the kernels keep of a cached plan's tiles read its arrays in place (no second copy).
PLAN_CACHE_SLOTS = 1 << 27


@dataclasses.dataclass(frozen=True)
class BlockProblem:
    """A block's problem, ready to solve.

    Attributes:
        problem: f, targets and λ of the block's rows; with the join exchange the targets'
            columns are positions in `needed`, else global indices of the fixed side.
        plan: the solver's tiles for `problem`.
        needed: join: int64 [m], the fixed rows the block's cells touch, ascending (the rows
            whose factors it receives; the problem's column count is `padded_fixed_length(m)`);
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


def block_problem(spec: TrainSpec, side: Side, block_id: int, item_counts) -> BlockProblem:
    """The cached problem of a block, built from its ratings file on a miss.

    The problem is defined on global columns (f looks up c_i, int64 [n_items], by item), then,
    with the join exchange, its columns are renumbered to positions in the fixed rows it
    receives.
    """

    def build():
        ratings = files.read_ratings(spec.checkpoint_dir, side, block_id)
        row_items = spec.layout(side).rows_of(block_id) if side == Side.ITEMS else None
        defined = problem.define_rows(ratings, side, item_counts, spec.config, row_items)
        needed = None
        if spec.exchange == JOIN:
            needed = np.unique(ratings.indices).astype(np.int64)
            targets = dataclasses.replace(
                defined.targets,
                indices=np.searchsorted(needed, ratings.indices),
                shape=(ratings.shape[0], padded_fixed_length(needed.size)),
            )
            defined = dataclasses.replace(defined, targets=targets)
        return BlockProblem(defined, spec.solver().plan(defined), needed)

    return _cached((spec.fingerprint, spec.exchange, side, block_id), build)
