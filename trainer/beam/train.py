"""The distributed WALS trainer: one Beam pipeline that unrolls every iteration, and its launch.

    python -m trainer.task --distributed --input_dir D --output_dir M \
        [--factor_exchange broadcast|join] [--block_rows 16384] [any Beam pipeline option]

Elements are blocks of thousands of whole rows (`trainer.beam.layout.RowBlock`), never single
rows or cells, so Beam's per-element cost is paid a few hundred times per sweep. Each
half-sweep solves every block of one side against the other side's factors, with the math of
the local trainer (`trainer.beam.sweep`):

    once:   rows of each side  | ReadRowBlocks | StashRatings   (`trainer.beam.reading`)
            initial factors of each block                       (iter-0000 files)
    iteration t:
      users_t = users_{t-1} | SolveUsers(G = Σ_b Y_bᵀY_b,  Y = items_{t-1})  | CheckpointUsers
      items_t = items_{t-1} | SolveItems(G = Σ_b X_bᵀX_b,  X = users_t)      | CheckpointItems

Factors travel through the checkpoint files, which every half-sweep writes anyway: a solve
writes its block's new factors to `iter-NNNN/<side>/block-NNNNN-<sha>.npz` and emits only a
`FactorRef` (the file's entry: name, size and SHA-256, and the block's Gramian term F_bᵀF_b,
k x k). So Beam moves a few kilobytes per block between stages, never factor tables, and a
reader checks every file it reads against its SHA-256. After each half-sweep,
`CheckpointHalfSweep` combines the side's references into a `SideState`
(`trainer.beam.side_state`), writes the half-sweep's completion marker, and is the singleton
side input of every solve of the other side. The fixed factors reach a solving block by
broadcast or by join (`--factor_exchange`, `trainer.beam.exchange`).

Checkpoints (`trainer.beam.checkpoints`) go to `<output_dir>.checkpoints/`, outside the staged
output, so a crashed run keeps them; the same command resumes from the last complete iteration.

`train` claims (or checks) the checkpoint directory, writes the rows' ID keys, finds the
iteration to resume from, runs the pipeline (`build`) for the remaining iterations on whatever
runner the Beam flags name, and reads the final factors and the loss history back.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from common import worker_threads
from trainer.beam import checkpoint_files, checkpoints
from trainer.beam import layout as blocks_lib
from trainer.beam.exchange import WriteRequests
from trainer.beam.reading import CountItems, ReadRowBlocks, StashRatings
from trainer.beam.side_state import (
    CheckpointHalfSweep,
    CombineSideState,
    InitialFactors,
    ResumedFactors,
)
from trainer.beam.spec import BROADCAST, EXCHANGES, JOIN, TrainSpec
from trainer.beam.sweep import HalfSweep, LossTerms, WriteLoss
from trainer.core import seeding
from trainer.core.factors import WALSFactors
from trainer.core.objective import WALSConfig
from trainer.core.sides import ITEMS, SIDES, USERS, Side

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistributedResult:
    """What a distributed run hands back to `trainer.task`.

    Attributes:
        factors: the final factors, with the loss history (one dict per evaluated iteration).
        resumed_from: the iteration the run resumed from (0 for a fresh run).
        checkpoint_dir: where the checkpoints are (removed by the caller once published).
        iteration_seconds: {t: wall seconds of iteration t} for the iterations after the first
            of this launch (`checkpoints.iteration_seconds`): the steady-state speed.
    """

    factors: WALSFactors
    resumed_from: int
    checkpoint_dir: str
    iteration_seconds: dict[int, float] = dataclasses.field(default_factory=dict)


def _fingerprint_config(config: WALSConfig) -> dict:
    """The config fields that determine the factors after t iterations (not num_iters)."""
    fields = dataclasses.asdict(config)
    fields.pop("num_iters")
    return fields


def train(
    dataset,
    input_dir: str,
    config: WALSConfig,
    output_dir: str,
    beam_argv: list[str],
    exchange: str = BROADCAST,
    block_rows: int = blocks_lib.DEFAULT_TRAIN_BLOCK_ROWS,
    loss_every: int = 1,
    fail_after: int = 0,
    warm_start=None,
) -> DistributedResult:
    """Trains with the Beam trainer, resuming from a checkpoint when there is one.

    Args:
        dataset: the loaded `trainer.local.dataset.Dataset` (its summary, vocabularies and shape).
        input_dir: the preprocessed dataset's directory, which the workers read.
        config: the hyperparameters.
        output_dir: the run's --output_dir; checkpoints go to `<output_dir>.checkpoints`.
        beam_argv: Beam pipeline flags (--runner, --direct_num_workers, ...).
        exchange: "broadcast" or "join" (`trainer.beam.exchange`).
        block_rows: rows per block.
        loss_every: loss every N iterations and after the last; 0 never.
        fail_after: test-only fault injection (`TrainSpec.fail_after`).
        warm_start: a `trainer.local.warm_start.WarmStart` to start from instead of the seeded
            initialisation; part of the checkpoint's fingerprint.

    Raises:
        checkpoints.CheckpointError: an unusable checkpoint, named in the message.
    """
    if exchange not in EXCHANGES:
        raise ValueError(f"factor exchange must be one of {EXCHANGES}, got {exchange!r}")
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    shape = (len(dataset.users), len(dataset.items))
    checkpoint_dir = checkpoints.checkpoint_dir_for(output_dir)
    fields = _fingerprint_config(config)
    if warm_start is not None:
        fields["warm_start"] = warm_start.digest
    run_fingerprint = checkpoints.fingerprint(dataset.summary, fields, block_rows)
    checkpoints.prepare(
        checkpoint_dir,
        run_fingerprint,
        {
            **fields,
            "block_rows": block_rows,
            "data": checkpoints.fingerprint(dataset.summary, {}, 0),
        },
    )
    layouts = {side: blocks_lib.BlockLayout(n, block_rows) for side, n in zip(SIDES, shape)}
    block_counts = {side: layout.n_blocks for side, layout in layouts.items()}
    start, markers = checkpoints.find_resume(
        checkpoint_dir, run_fingerprint, block_counts, config.num_iters
    )
    if start:
        logger.info("resuming from the checkpoint of iteration %d in %s", start, checkpoint_dir)
    for side, ids in ((USERS, dataset.users), (ITEMS, dataset.items)):
        checkpoint_files.write_keys(checkpoint_dir, side, seeding.id_keys(ids), layouts[side])
    if warm_start is not None and start == 0:
        for side, factors in (
            (USERS, warm_start.factors.user_factors),
            (ITEMS, warm_start.factors.item_factors),
        ):
            checkpoint_files.write_initial(checkpoint_dir, side, factors, layouts[side])
    recorded = {loss["iteration"] for loss in checkpoint_files.read_losses(checkpoint_dir)}
    spec = TrainSpec(
        input_dir=input_dir.rstrip("/"),
        checkpoint_dir=checkpoint_dir,
        config=config,
        shape=shape,
        block_rows=block_rows,
        exchange=exchange,
        start_iteration=start,
        fingerprint=run_fingerprint,
        loss_every=loss_every,
        fail_after=fail_after,
        warm_start=warm_start is not None,
    )
    spec = dataclasses.replace(
        spec, start_loss=start > 0 and spec.loss_due(start) and start not in recorded
    )
    if start < config.num_iters:
        logger.info(
            "training %d x %d in blocks of %d rows (%d + %d blocks), %s exchange, iterations "
            "%d-%d, on %s",
            *shape,
            block_rows,
            block_counts[USERS],
            block_counts[ITEMS],
            exchange,
            start + 1,
            config.num_iters,
            PipelineOptions(beam_argv).get_all_options().get("runner") or "DirectRunner",
        )
        began = time.monotonic()
        options = PipelineOptions(beam_argv)
        with worker_threads.local_budget(options), beam.Pipeline(options=options) as pipeline:
            build(pipeline, spec, markers)
        logger.info("the Beam pipeline took %.1f s", time.monotonic() - began)
    final, markers = checkpoints.find_resume(
        checkpoint_dir, run_fingerprint, block_counts, config.num_iters
    )
    if final != config.num_iters:
        raise checkpoints.CheckpointError(
            f"the pipeline finished but {checkpoint_dir} holds iteration {final} of "
            f"{config.num_iters}"
        )
    if config.num_iters == 0 and warm_start is not None:
        x, y = warm_start.factors.user_factors, warm_start.factors.item_factors
    elif config.num_iters == 0:
        x, y = (
            seeding.initial_factors(
                seeding.id_keys(ids), config.latent_factors, config.init_stddev, config.seed, side
            )
            for side, ids in ((USERS, dataset.users), (ITEMS, dataset.items))
        )
    else:
        x, y = checkpoints.read_factors(markers, shape, config.latent_factors)
    history = [
        loss
        for loss in checkpoint_files.read_losses(checkpoint_dir)
        if loss["iteration"] <= config.num_iters
    ]
    seconds = checkpoints.iteration_seconds(checkpoint_dir, start + 1, config.num_iters)
    return DistributedResult(WALSFactors(x, y, history), start, checkpoint_dir, seconds)


def build(root, spec: TrainSpec, markers: dict | None = None) -> None:
    """Adds the whole training to a pipeline: reading, initialisation, every iteration's two
    half-sweeps and checkpoints, and the losses that `spec.loss_due`.

    Args:
        root: the pipeline.
        spec: what to train.
        markers: {side: marker} of the checkpoint to resume from (spec.start_iteration), or
            None to start from the seeded (or warm-start) initialisation.
    """
    config = spec.config
    k = config.latent_factors
    sides, requests, kernels = {}, {}, {}
    item_counts = None
    for side in SIDES:
        name = Side(side).label.capitalize()
        rows = root | f"Read{name}" >> ReadRowBlocks(spec, side)
        if side == ITEMS:
            item_counts = rows | "CountItems" >> CountItems(spec.shape[1])
        if spec.exchange == JOIN:
            requests[side] = rows | f"WriteRequests{name}" >> WriteRequests(spec, side)
        stashed, kernels[side] = rows | f"Stash{name}Ratings" >> StashRatings(spec)
        if markers:
            sides[side] = stashed | f"Load{name}" >> ResumedFactors(spec, side, markers[side])
        else:
            sides[side] = stashed | f"Init{name}" >> InitialFactors(spec, side)
    users, items = sides[USERS], sides[ITEMS]
    start = "Resume" if markers else "Initial"
    items_state = items | f"{start}ItemsState" >> CombineSideState(k)
    users_state = None
    if spec.start_loss:
        users_state = users | f"{start}UsersState" >> CombineSideState(k)
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
        if last:
            sums = (users, items, items_state) | f"{label}/UserLossTerms" >> LossTerms(
                spec, USERS, item_counts, requests.get(USERS)
            )
        else:
            new_users, sums = (users, items, items_state) | f"{label}/SolveUsers" >> HalfSweep(
                spec,
                USERS,
                iteration,
                item_counts,
                kernels[USERS],
                requests.get(USERS),
                with_loss=previous_loss,
            )
        if previous_loss:
            _ = (sums, items) | f"{label}/WriteLoss" >> WriteLoss(
                spec, iteration - 1, item_counts, users_state, items_state
            )
        if last:
            break
        users = new_users
        users_state = users | f"{label}/CheckpointUsers" >> CheckpointHalfSweep(spec)
        items, _ = (items, users, users_state) | f"{label}/SolveItems" >> HalfSweep(
            spec, ITEMS, iteration, item_counts, kernels[ITEMS], requests.get(ITEMS)
        )
        items_state = items | f"{label}/CheckpointItems" >> CheckpointHalfSweep(spec)
