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

The initial factors are seeded on the workers from the vocabularies (`trainer.beam.seed_keys`,
and an earlier model's factors with a warm start, `trainer.beam.warm_start`), and the model's
directory is written from the final factor files by the workers too (`WriteModel`,
`trainer.beam.model_writer`), appended to the same pipeline:

    after the last iteration:  final factor files + train rows | WriteModel   -> <out>/model/

`train` claims (or checks) the checkpoint directory, finds the iteration to resume from, runs
the pipeline (`build`) for the remaining iterations on whatever runner the Beam flags name (or,
when the checkpoint already holds the last iteration, a pipeline that only writes the model),
and reads the loss history back. The launcher holds nothing that grows with the data: it reads
summary.json, run.json, the markers and the losses.
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
from trainer.beam.model_writer import (
    ModelSpec,
    WriteModel,
    factor_files_of_markers,
    factor_files_of_state,
)
from trainer.beam.reading import CountItems, ReadRowBlocks, StashRatings
from trainer.beam.side_state import (
    CheckpointHalfSweep,
    CombineSideState,
    InitialFactors,
    ResumedFactors,
)
from trainer.beam.spec import BROADCAST, EXCHANGES, JOIN, TrainSpec
from trainer.beam.sweep import HalfSweep, LossTerms, WriteLoss
from trainer.core.objective import WALSConfig
from trainer.core.sides import ITEMS, SIDES, USERS, Side
from transforms.dataset_info import DatasetInfo

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistributedResult:
    """What a distributed run hands back to `trainer.training`: small metadata only (the model
    itself is on disk, written by the workers).

    Attributes:
        history: the loss history, one dict per evaluated iteration.
        resumed_from: the iteration the run resumed from (0 for a fresh run).
        checkpoint_dir: where the checkpoints are (removed by the caller once published).
        iteration_seconds: {t: wall seconds of iteration t} for the iterations after the first
            of this launch (`checkpoints.iteration_seconds`): the steady-state speed.
        warm_matched: with a warm start, {side: rows that took the earlier model's factors}
            (None for a side whose count is missing).
    """

    history: list[dict]
    resumed_from: int
    checkpoint_dir: str
    iteration_seconds: dict[int, float] = dataclasses.field(default_factory=dict)
    warm_matched: dict[Side, int | None] | None = None


def _fingerprint_config(config: WALSConfig) -> dict:
    """The config fields that determine the factors after t iterations (not num_iters)."""
    fields = dataclasses.asdict(config)
    fields.pop("num_iters")
    return fields


def train(
    info: DatasetInfo,
    config: WALSConfig,
    output_dir: str,
    beam_argv: list[str],
    model: ModelSpec | None = None,
    exchange: str = BROADCAST,
    block_rows: int = blocks_lib.DEFAULT_TRAIN_BLOCK_ROWS,
    loss_every: int = 1,
    fail_after: int = 0,
    warm_start: tuple[str, str] | None = None,
) -> DistributedResult:
    """Trains with the Beam trainer, resuming from a checkpoint when there is one, and writes
    the model from the final factors on the workers.

    The launcher reads only small files: summary.json (`info`), run.json, the completion
    markers and the losses. The rows' seed keys, a warm start's factors and the model's arrays
    are all Beam stages (`InitialFactors`, `trainer.beam.model_writer`).

    Args:
        info: the dataset's summary and vocabulary paths (`transforms.dataset_info`).
        config: the hyperparameters.
        output_dir: the run's --output_dir; checkpoints go to `<output_dir>.checkpoints`.
        beam_argv: Beam pipeline flags (--runner, --direct_num_workers, ...).
        model: where and how to write the model (appended to the training pipeline, or a
            pipeline of its own when the checkpoint already holds the last iteration); None
            writes none.
        exchange: "broadcast" or "join" (`trainer.beam.exchange`).
        block_rows: rows per block.
        loss_every: loss every N iterations and after the last; 0 never.
        fail_after: test-only fault injection (`TrainSpec.fail_after`).
        warm_start: (earlier model directory, its digest from `warm_start.describe`) to start
            the rows it knows from its factors; the digest is part of the fingerprint.

    Raises:
        checkpoints.CheckpointError: an unusable checkpoint, named in the message.
    """
    if exchange not in EXCHANGES:
        raise ValueError(f"factor exchange must be one of {EXCHANGES}, got {exchange!r}")
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    shape = info.shape
    checkpoint_dir = checkpoints.checkpoint_dir_for(output_dir)
    fields = _fingerprint_config(config)
    if warm_start is not None:
        fields["warm_start"] = warm_start[1]
    run_fingerprint = checkpoints.fingerprint(info.summary, fields, block_rows)
    checkpoints.prepare(
        checkpoint_dir,
        run_fingerprint,
        {
            **fields,
            "block_rows": block_rows,
            "data": checkpoints.fingerprint(info.summary, {}, 0),
        },
    )
    layouts = {side: blocks_lib.BlockLayout(n, block_rows) for side, n in zip(SIDES, shape)}
    block_counts = {side: layout.n_blocks for side, layout in layouts.items()}
    start, markers = checkpoints.find_resume(
        checkpoint_dir, run_fingerprint, block_counts, config.num_iters
    )
    if start:
        logger.info("resuming from the checkpoint of iteration %d in %s", start, checkpoint_dir)
    recorded = {loss["iteration"] for loss in checkpoint_files.read_losses(checkpoint_dir)}
    spec = TrainSpec(
        input_dir=info.directory,
        checkpoint_dir=checkpoint_dir,
        config=config,
        shape=shape,
        block_rows=block_rows,
        exchange=exchange,
        start_iteration=start,
        fingerprint=run_fingerprint,
        loss_every=loss_every,
        fail_after=fail_after,
        vocabularies=info.vocabularies,
        warm_start=warm_start[0] if warm_start is not None else "",
    )
    spec = dataclasses.replace(
        spec, start_loss=start > 0 and spec.loss_due(start) and start not in recorded
    )
    # num_iters = 0: the initial factors are the model; their markers are written once.
    to_train = start < config.num_iters or markers is None
    if to_train or model is not None:
        runner = PipelineOptions(beam_argv).get_all_options().get("runner") or "DirectRunner"
        if to_train:
            logger.info(
                "training %d x %d in blocks of %d rows (%d + %d blocks), %s exchange, "
                "iterations %d-%d, on %s",
                *shape,
                block_rows,
                block_counts[USERS],
                block_counts[ITEMS],
                exchange,
                start + 1,
                config.num_iters,
                runner,
            )
        else:
            logger.info("writing the model of the checkpoint's iteration %d, on %s", start, runner)
        began = time.monotonic()
        options = PipelineOptions(beam_argv)
        with worker_threads.local_budget(options), beam.Pipeline(options=options) as pipeline:
            if to_train:
                build(pipeline, spec, markers, model)
            else:
                _ = (
                    pipeline
                    | "FinalFactorFiles" >> beam.Create(factor_files_of_markers(markers))
                    | "WriteModel" >> WriteModel(model)
                )
        logger.info("the Beam pipeline took %.1f s", time.monotonic() - began)
    final, markers = checkpoints.find_resume(
        checkpoint_dir, run_fingerprint, block_counts, config.num_iters
    )
    if final != config.num_iters or markers is None:
        raise checkpoints.CheckpointError(
            f"the pipeline finished but {checkpoint_dir} holds iteration {final} of "
            f"{config.num_iters}"
        )
    history = [
        loss
        for loss in checkpoint_files.read_losses(checkpoint_dir)
        if loss["iteration"] <= config.num_iters
    ]
    seconds = checkpoints.iteration_seconds(checkpoint_dir, start + 1, config.num_iters)
    matched = None
    if warm_start is not None:
        matched = {side: checkpoint_files.read_warm_matches(checkpoint_dir, side) for side in SIDES}
    return DistributedResult(history, start, checkpoint_dir, seconds, matched)


def build(
    root, spec: TrainSpec, markers: dict | None = None, model: ModelSpec | None = None
) -> None:
    """Adds the whole training to a pipeline: reading, initialisation, every iteration's two
    half-sweeps and checkpoints, the losses that `spec.loss_due`, and the model's files.

    Args:
        root: the pipeline.
        spec: what to train.
        markers: {side: marker} of the checkpoint to resume from (spec.start_iteration), or
            None to start from the seeded (or warm-start) initialisation.
        model: the model to write from the final factors (`WriteModel`), or None.
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
    users_state = None
    if config.num_iters == 0:  # the initial factors are the model: checkpoint them
        users_state = users | "CheckpointInitialUsers" >> CheckpointHalfSweep(spec)
        items_state = items | "CheckpointInitialItems" >> CheckpointHalfSweep(spec)
    else:
        items_state = items | f"{start}ItemsState" >> CombineSideState(k)
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
    if model is not None:
        final_files = factor_files_of_state(spec.checkpoint_dir)
        _ = (
            (users_state, items_state)
            | "FinalStates" >> beam.Flatten()
            | "FinalFactorFiles" >> beam.FlatMap(final_files)
            | "WriteModel" >> WriteModel(model, column_counts=item_counts)
        )
