"""Launches the distributed trainer (`trainer.beam.sweep`) and collects its result.

`python -m trainer.task --distributed` calls `train`: it claims (or checks) the checkpoint
directory, writes the rows' ID keys, finds the iteration to resume from, runs one Beam pipeline
for the remaining iterations on whatever runner the Beam flags name, and reads the final
factors and the loss history back from the checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from common import worker_threads
from trainer.beam import checkpoints
from trainer.beam import layout as blocks_lib
from trainer.beam import sweep as beam_wals
from trainer.core import problem, seeding
from trainer.core.config import WALSConfig
from trainer.core.factors import WALSFactors

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
    exchange: str = beam_wals.BROADCAST,
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
        exchange: "broadcast" or "join" (`trainer.beam.sweep`).
        block_rows: rows per block.
        loss_every: loss every N iterations and after the last; 0 never.
        fail_after: test-only fault injection (`beam_wals.TrainSpec.fail_after`).
        warm_start: a `trainer.local.warm_start.WarmStart` to start from instead of the seeded
            initialisation; part of the checkpoint's fingerprint.

    Raises:
        checkpoints.CheckpointError: an unusable checkpoint, named in the message.
    """
    if exchange not in beam_wals.EXCHANGES:
        raise ValueError(f"factor exchange must be one of {beam_wals.EXCHANGES}, got {exchange!r}")
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
    layouts = {side: blocks_lib.BlockLayout(n, block_rows) for side, n in zip(problem.SIDES, shape)}
    block_counts = {side: layout.n_blocks for side, layout in layouts.items()}
    start, markers = checkpoints.find_resume(
        checkpoint_dir, run_fingerprint, block_counts, config.num_iters
    )
    if start:
        logger.info("resuming from the checkpoint of iteration %d in %s", start, checkpoint_dir)
    for side, ids in ((problem.USERS, dataset.users), (problem.ITEMS, dataset.items)):
        checkpoints.write_keys(checkpoint_dir, side, seeding.id_keys(ids), layouts[side])
    if warm_start is not None and start == 0:
        for side, factors in (
            (problem.USERS, warm_start.factors.user_factors),
            (problem.ITEMS, warm_start.factors.item_factors),
        ):
            checkpoints.write_initial(checkpoint_dir, side, factors, layouts[side])
    recorded = {loss["iteration"] for loss in checkpoints.read_losses(checkpoint_dir)}
    spec = beam_wals.TrainSpec(
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
            block_counts[problem.USERS],
            block_counts[problem.ITEMS],
            exchange,
            start + 1,
            config.num_iters,
            PipelineOptions(beam_argv).get_all_options().get("runner") or "DirectRunner",
        )
        began = time.monotonic()
        options = PipelineOptions(beam_argv)
        with worker_threads.local_budget(options), beam.Pipeline(options=options) as pipeline:
            beam_wals.build(pipeline, spec, markers)
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
            for side, ids in ((problem.USERS, dataset.users), (problem.ITEMS, dataset.items))
        )
    else:
        x, y = checkpoints.read_factors(markers, shape, config.latent_factors)
    history = [
        loss
        for loss in checkpoints.read_losses(checkpoint_dir)
        if loss["iteration"] <= config.num_iters
    ]
    seconds = checkpoints.iteration_seconds(checkpoint_dir, start + 1, config.num_iters)
    return DistributedResult(WALSFactors(x, y, history), start, checkpoint_dir, seconds)
