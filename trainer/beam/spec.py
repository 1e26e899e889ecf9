"""`TrainSpec`: what the distributed trainer's pipeline trains, everything a worker needs.

The launcher (`trainer.beam.train`) fills it in once; every composite and DoFn of the Beam
trainer takes it, so a worker needs nothing else. It is a frozen dataclass of plain values, so
it pickles to every worker.
"""

from __future__ import annotations

import dataclasses

from trainer.beam import layout as blocks_lib
from trainer.core.objective import WALSConfig
from trainer.core.sides import Side

# How a solving block receives the fixed side's factors (`trainer.beam.exchange`).
BROADCAST = "broadcast"
JOIN = "join"
EXCHANGES = (BROADCAST, JOIN)

# The namespace of the trainer's Beam metrics (counters of solved rows).
METRICS_NAMESPACE = "wals_beam"


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
        vocabularies: the dataset's (user, item) vocabulary files, whose lines are the rows'
            original IDs: the seeds of the initial factors (`trainer.beam.seed_keys`).
        warm_start: an earlier model's output directory whose factors the rows it knows start
            from (`trainer.beam.warm_start`); "" for the seeded initialisation alone.
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
    vocabularies: tuple[str, str] = ("", "")
    warm_start: str = ""

    def solver(self):
        """The solver the config names (`trainer.core.solver.solver_for`), float32, its kernels
        XLA-compiled; chosen here once for every block of the run."""
        from trainer.core.solver import solver_for  # TensorFlow: only where blocks are solved

        return solver_for(self.config)

    def layout(self, side: Side) -> blocks_lib.BlockLayout:
        """How the rows of `side` are dealt into blocks (interleaved)."""
        return blocks_lib.BlockLayout(self.side_shape(side)[0], self.block_rows)

    def side_shape(self, side: Side) -> tuple[int, int]:
        """(rows of `side`, rows of the other side): the shape of its rating matrix."""
        n_users, n_items = self.shape
        return (n_users, n_items) if side == Side.USERS else (n_items, n_users)

    def loss_due(self, iteration: int) -> bool:
        """Whether the loss of `iteration` is evaluated (every `loss_every`, and the last)."""
        if self.loss_every <= 0:
            return False
        return iteration % self.loss_every == 0 or iteration == self.config.num_iters
