"""What an SDK worker of each stage of `pipeline.run --distributed` may hold more when the data
grows, from its flags.

A worker's memory should be bounded by the flags of the job it runs (block sizes, shuffle keys,
k, the factor exchange), with the data's shape entering only where those flags say it does
(README, "Sizing"). Between two sizes of the data run with the same flags, a job's worker may
therefore grow by at most

    allowed growth = SLACK_MB + Σ over the job's terms of (term at the larger size - at the smaller)

where the terms (bytes; U users, I items, C training cells, P all (visitor, item) pairs, k
latent factors) are, per job:

    preprocess   per-pair sums      PAIR_BYTES · P / buckets        (one key's dict at a time)
                 bundle sums        PAIR_BYTES · min(P, MAX_BUFFERED_PAIRS) (a bundle's partial
                                    sums before the shuffle; on the local runner a stage is one
                                    bundle, so they hold every pair up to the cap)
                 matrix groups      CELL_BYTES · C / groups         (one group's cells, copies)
                 bundle cells       CELL_BYTES · min(C, MAX_BUFFERED_CELLS) (the same, cells)
                 vocabularies       VOCAB_ENTRY_BYTES · (U + I + held-out visitors)
    train        broadcast tables   TABLES_KEPT · max(U, I) · k · 4 (the fixed side, cached)
                 (join: received    k · 4 · C · block_rows / min(U, I), a block's vectors)
                 cached problems    SLOT_BYTES · min(PLAN_CACHE_SLOTS, PAD · 2C)
                 row packs          PARSED_CELL_BYTES · min(C + ROW_WEIGHT · rows, MAX_PACKED_CELLS)
                                    (a bundle's parsed rows before `row_groups.PackRows` packs
                                    them; rows = U or I, whichever side is read)
                 seen part          SEEN_CELL_BYTES · min(C, PART_BYTES / 8) (one part of the
                                    model's seen items, `model_parts.seen_part`, from its rows)
    evaluate,    scores             SCORE_COPIES · min(min(B, rows) · I · 4, S): a block × a
                                    chunk of items, S = `chunked_topk.DEFAULT_SCORE_BYTES`
    new visitors item table         I · k · 4
    predict      (the same, rows = U; B = the block of those jobs, 4096)
    evaluate     row packs          (as train's, C + eval cells, rows = U)
                 item counts        8 · I (the popularity counts, `ReadEvalBlocks`)

One more term is the runner's, not the job's, and is named apart (`runner_terms`): Beam's
local portable runner (the FnApiRunner in `local_job_service_main`) hands a stage whose input
is a GroupByKey's output that whole input as one data-channel message, which the worker holds
about RUNNER_COPIES times while it reads it (README, "What the local portable runner holds"):

    preprocess   redistributed lines   RUNNER_COPIES · R   (R: the bytes of the packed batches
                                    of lines `ParseEvents` reshuffles before parsing them)
    train        grouped rows       RUNNER_COPIES · G   (G: the larger side's packed rows,
                                    `trainer.beam.row_groups`; the sides are grouped one after
                                    the other)
    evaluate     grouped rows       RUNNER_COPIES · G   (G: the packed train and eval rows,
                                    grouped together)

On Dataflow and Flink a shuffle's output reaches a worker in bounded bundles, and the term is 0.

Whatever a worker holds regardless of the data (the interpreter, TensorFlow, Beam's harness,
traced graphs) cancels out in the difference. The constants are first-order estimates of the
data structures the modules' docstrings name; the allowance is a model, printed with its terms
so that a miss can be read.
"""

from __future__ import annotations

SLACK_MB = 64.0
# The worker's RSS rise per byte of a stage's grouped input on the local portable runner: gRPC's
# received message, the parsed protobuf and its data as Python bytes are alive at once, plus the
# allocator's slack. Measured before the lines were packed: the reshuffle's stage rose by 156 MB
# at S and 3,118 MB at 8S (`python -m benchmarks.runner_memory`), 2,962 MB more for 632 MiB more
# lines, less ~230 MB more partial sums: 4.3 a byte.
RUNNER_COPIES = 4.3
LOCAL_PORTABLE = "local portable"  # the runner `benchmarks.scale` runs on
PAIR_BYTES = 300  # pipeline.options: a SumPerPair key holds ~300 bytes a pair
CELL_BYTES = 60  # pipeline.options: 20 bytes a cell, a few copies while sorting and encoding
VOCAB_ENTRY_BYTES = 200  # a Python str and its count in an analyzer's accumulator
# A cached block problem holds ~16 bytes a padded tile slot (its tiles and f, targets and λ:
# tracemalloc of 8 blocks of 512 rows a side of the 8S sample of `benchmarks.scale`, 15.3 and
# 16.4 bytes), and 3.12 slots a cell on the users' side, 2.05 on the items' (the same blocks).
SLOT_BYTES = 16
PAD = 3.2
PARSED_CELL_BYTES = 12  # trainer.beam.row_groups: a parsed cell (a row weighs ROW_WEIGHT cells)
# A seen part's cell while `model_parts.seen_part` builds it: its unpacked rows (24 bytes a cell
# with their framing), the part's items and ratings (8) and a chunk's work arrays: 38 bytes a cell
# (tracemalloc, the 8S sample of `benchmarks.scale`, one part of 801,087 cells).
SEEN_CELL_BYTES = 38
SCORE_COPIES = 3  # a block's float32 scores, the seen items masked, the top-k partition
# The Beam jobs of each stage, in the order they run (one SDK worker each on the portable runner).
# The gate runs the candidate's evaluation on the runner; with a published model (not in the
# benchmark's one-date runs) a second job folds it in.
JOBS = {
    "preprocess": ("preprocess",),
    "train": ("train", "evaluate", "new visitors"),
    "gate": ("evaluate",),
    "predict": ("predict",),
}


def job_terms(job: str, shape: dict, flags: dict) -> dict[str, float]:
    """A job's terms (module doc), MB.

    Args:
        job: one of the values of JOBS.
        shape: "nusers", "nitems", "train_interactions", "pairs", "heldout_visitors", and
            "buckets", "groups" (the preprocessing's shuffle keys).
        flags: "latent_factors", "block_rows" (training), "factor_exchange", and
            "eval_block_rows" (the evaluation, new-visitor and prediction block).
    """
    from pipeline.events import MAX_BUFFERED_PAIRS
    from pipeline.matrix_io import MAX_BUFFERED_CELLS
    from trainer.beam.block_problems import PLAN_CACHE_SLOTS
    from trainer.beam.exchange import TABLES_KEPT
    from trainer.beam.model_parts import PART_BYTES
    from trainer.beam.row_groups import MAX_PACKED_CELLS, ROW_WEIGHT
    from trainer.core.chunked_topk import DEFAULT_SCORE_BYTES

    users, items, cells = shape["nusers"], shape["nitems"], shape["train_interactions"]
    k, mb = flags["latent_factors"], 2**20

    def row_packs(cells: int, rows: int) -> float:
        return PARSED_CELL_BYTES * min(cells + ROW_WEIGHT * rows, MAX_PACKED_CELLS) / mb

    if job == "preprocess":
        vocab = users + items + shape.get("heldout_visitors", 0)
        return {
            "per-pair sums": PAIR_BYTES * shape["pairs"] / shape["buckets"] / mb,
            "bundle sums": PAIR_BYTES * min(shape["pairs"], MAX_BUFFERED_PAIRS) / mb,
            "matrix groups": CELL_BYTES * cells / shape["groups"] / mb,
            "bundle cells": CELL_BYTES * min(cells, MAX_BUFFERED_CELLS) / mb,
            "vocabularies": VOCAB_ENTRY_BYTES * vocab / mb,
        }
    if job == "train":
        if flags["factor_exchange"] == "join":
            share = min(1.0, flags["block_rows"] / max(min(users, items), 1))
            exchange = {"received vectors": k * 4 * cells * share / mb}
        else:
            exchange = {"broadcast tables": TABLES_KEPT * max(users, items) * k * 4 / mb}
        cache = SLOT_BYTES * min(PLAN_CACHE_SLOTS, PAD * 2 * cells) / mb
        packs = row_packs(cells, max(users, items))
        seen = SEEN_CELL_BYTES * min(cells, PART_BYTES / 8) / mb
        return {**exchange, "cached problems": cache, "row packs": packs, "seen part": seen}
    rows = {"evaluate": users, "new visitors": shape.get("heldout_visitors", 0), "predict": users}
    if job not in rows:
        raise ValueError(f"unknown job {job!r}")
    block = min(flags["eval_block_rows"], rows[job])
    chunk_bytes = min(block * items * 4, DEFAULT_SCORE_BYTES)  # trainer.core.chunked_topk
    terms = {"scores": SCORE_COPIES * chunk_bytes / mb, "item table": items * k * 4 / mb}
    if job == "evaluate":
        terms["row packs"] = row_packs(cells + shape.get("eval_interactions", 0), users)
        terms["item counts"] = 8 * items / mb
    return terms


def runner_terms(job: str, shape: dict, runner: str | None) -> dict[str, float]:
    """What the runner makes a worker of `job` hold on top of the job's terms (module doc), MB:
    on LOCAL_PORTABLE, preprocessing's redistributed lines (shape "redistributed_bytes",
    `benchmarks.scale.redistributed_bytes`) and the train and evaluate jobs' grouped rows
    (shape "grouped_bytes": {job: bytes}, `benchmarks.scale.grouped_bytes`); nothing on any
    other runner."""
    if runner != LOCAL_PORTABLE:
        return {}
    if job == "preprocess" and "redistributed_bytes" in shape:
        return {"redistributed lines": RUNNER_COPIES * shape["redistributed_bytes"] / 2**20}
    grouped = shape.get("grouped_bytes", {})
    if job in grouped:
        return {"grouped rows": RUNNER_COPIES * grouped[job] / 2**20}
    return {}


def allowed_growth(
    job: str, small: dict, big: dict, flags: dict, runner: str | None = None
) -> dict:
    """How much a worker of `job` may grow from shape `small` to shape `big` on `runner`
    (module doc): {"job", "allowed_mb" (slack + the job's terms + the runner's), "slack_mb",
    "terms_mb": {term: growth MB}, "runner_mb": {term: growth MB}: the runner's (`runner_terms`)}.
    """
    before, after = job_terms(job, small, flags), job_terms(job, big, flags)
    terms = {name: after[name] - before[name] for name in after}
    held_before, held_after = runner_terms(job, small, runner), runner_terms(job, big, runner)
    held = {name: held_after[name] - held_before.get(name, 0.0) for name in held_after}
    return {
        "job": job,
        "allowed_mb": SLACK_MB + sum(terms.values()) + sum(held.values()),
        "slack_mb": SLACK_MB,
        "terms_mb": terms,
        "runner_mb": held,
    }
