r"""The preprocessing pipeline: GA360 sessions -> TF Transform -> sparse rating-matrix TFRecords.

    python -m pipeline.preprocess --input 'data/sessions-*.json.gz' --output_dir out/ \
        [--input_format ga360|csv|movielens] [--content_id_source customDimension:10|pagePath] \
        [--eval_fraction 0.1] [--holdout_visitors 0] [--scaling median|log1p|unit|raw] \
        [any Beam pipeline option]

Graph (the collections hold batches: lists of lines, events or pairs, Arrow RecordBatches,
arrays):
    ReadInput (`pipeline.reading`) | ParseEvents -> events, rejected
    events | SumPerPair [| SplitHeldOutVisitors] -> pairs[, held-out pairs]
    pairs | SplitTrainEval -> train pairs, eval pairs
    each split | ToRecordBatches -> raw rows (TF Transform's TFXIO input)
    train | AnalyzeAndTransform (vocabularies, median) -> transformed train, transform_fn
    eval | TransformEval (with the train transform_fn) -> transformed eval
    each split | DropOutOfVocabulary | WriteSparseMatrix -> items_for_user-*, users_for_item-*
    held-out pairs | TransformHeldOut | WriteHeldOut -> heldout/foldin-*, heldout/target-*
    counts of ParseEvents, SumPerPair, DropOutOfVocabulary, held-out pairs, WriteHeldOut
        | WriteCounts -> tmp/counts.json

Output under --output_dir: transform_fn/, transformed_metadata/, train/, eval/, rejected/,
heldout/ (with --holdout_visitors), summary.json (written last; its presence means the output is
complete).

Every count in summary.json (its top-level counts and "counters") is pipeline output, exact on
every runner: the steps that count emit {name: count} dicts per bundle (`common.counts`), summed
by one CombineGlobally into tmp/counts.json, which `make_summary` reads. The outputs of a
retried bundle are discarded, whereas Beam metrics may count it again (a runner without
committed metrics reports attempted ones), and the trainer's consistency check, which compares
summary.json with the data it reads, would then reject a valid dataset. The same counts are
still Beam counters (namespace 'preprocess'), for monitoring only.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
import time

import apache_beam as beam
import tensorflow_transform as tft
import tensorflow_transform.beam as tft_beam
from apache_beam.io.filesystems import FileSystems

from common import cli, counts, staging, worker_threads
from pipeline import events, holdout, records
from pipeline import options as preprocess_options
from pipeline.matrix_io import CELLS_TAG, DropOutOfVocabulary, WriteSparseMatrix
from pipeline.reading import ReadInput, ReadLineBatches
from transforms import features, preprocessing

logger = logging.getLogger(__name__)

_STAT_NAMES = {
    features.SCALE_MEDIAN: "median",
    features.SCALE_MIN: "min",
    features.SCALE_MAX: "max",
}
SCALE_STATS_FILE = "scale_stats.json"
COUNTS_FILE = "counts.json"


def _first(values):
    return next((value for value in values if value is not None), None)


def freeze_long_lived() -> None:
    """Takes every object alive now out of the cyclic garbage collector's sight (`gc.freeze`).

    A process that imported TF Transform holds about 460,000 GC-tracked objects (modules,
    functions, TensorFlow's registries) that live until it exits. Every full collection
    traverses all of them (0.25 s each), the interpreter's shutdown included: after
    `import tensorflow_transform.beam`, exiting took 1.1 s more than with them frozen (4.4 s
    against 3.3 s), and a local multi-process run waits for its workers' exits one after the
    other. Frozen objects are still freed by reference counting; only cyclic garbage among
    them stays until exit.

    On the 2-worker benchmark (1M PAGE hits), freezing in the launcher before the run and in
    each worker at `_ScaleStatsFn.setup` took the run from 23.2 s to 20.7 s; an atexit
    `gc.freeze` in the same processes, which leaves the collections during the run as they
    were, did not (23.4-24.0 s). Called by `main` (the command-line launcher, not by `run`,
    which `pipeline.run` calls before it trains in the same process) and by
    `_ScaleStatsFn.setup`, which runs in a worker where TF Transform has loaded TensorFlow.
    """
    gc.freeze()


class _ScaleStatsFn(beam.DoFn):
    """A transformed batch -> its scaling statistics (`_scale_stats`); its setup freezes the
    worker's long-lived objects (`freeze_long_lived`), TensorFlow's among them."""

    def setup(self):
        freeze_long_lived()

    def process(self, batch_and_passthrough):
        yield _scale_stats(batch_and_passthrough)


def _scale_stats(batch_and_passthrough) -> dict | None:
    """The scaling statistics of a transformed batch: those of its first row (all rows hold the
    same), or None for an empty batch."""
    batch = batch_and_passthrough[0]
    if batch.num_rows == 0:
        return None
    stats = {}
    for key, name in _STAT_NAMES.items():
        index = batch.schema.get_field_index(key)
        if index >= 0:
            column = batch.column(index)
            if hasattr(column, "flatten"):
                column = column.flatten()
            stats[name] = float(column[0].as_py())
    return stats


def build_pipeline(
    p: beam.Pipeline,
    opts: preprocess_options.PreprocessOptions,
    output_dir: str,
    workers: int | None = 1,
) -> None:
    """Adds the whole preprocessing graph to `p`, writing under `output_dir`.

    `workers`: the DirectRunner's number of workers (`worker_threads.direct_workers`), or None
    on a distributed runner. Locally, --input files are read by `ReadLineBatches` with one
    reader per worker; elsewhere by `ReadInput`, and batches of lines are redistributed before
    parsing.
    """
    session_config = records.SessionConfig(
        content_id_source=opts.content_id_source,
        max_time_gap_ms=opts.max_time_gap_s * 1000.0,
        max_id_length=opts.max_id_length,
    )
    transform_config = preprocessing.TransformConfig(
        scaling=preprocess_options.effective_scaling(opts),
        user_top_k=opts.user_top_k,
        item_top_k=opts.item_top_k,
        user_min_count=opts.user_min_count,
        item_min_count=opts.item_min_count,
        quantile_epsilon=opts.quantile_epsilon,
    )
    sum_buckets, write_groups = preprocess_options.shuffle_keys(opts)
    logger.info(
        "shuffle keys: %d visitor buckets for the per-pair sums, %d row and column groups",
        sum_buckets,
        write_groups,
    )
    patterns = preprocess_options.input_patterns(opts)
    if patterns and workers is not None:
        lines = p | "ReadInput" >> ReadLineBatches(patterns, workers)
        parse = events.ParseEvents(opts.input_format, session_config, batched=True)
    else:
        lines = p | "ReadInput" >> ReadInput(opts)
        parse = events.ParseEvents(opts.input_format, session_config, redistribute=True)
    parsed = lines | "ParseEvents" >> parse
    _ = parsed[events.REJECTED_TAG] | "WriteRejected" >> beam.io.WriteToText(
        f"{output_dir}/{features.REJECTED_DIR}/rejected", file_name_suffix=".jsonl"
    )
    summed = parsed[events.EVENTS_TAG] | "SumPerPair" >> events.SumPerPair(
        opts.input_format, sum_buckets
    )
    pairs = summed[events.PAIRS_TAG]
    counted = [parsed[counts.COUNTS_TAG], summed[counts.COUNTS_TAG]]
    heldout_pairs = None
    if opts.holdout_visitors > 0:
        pairs, heldout_pairs = pairs | "HoldOutVisitors" >> holdout.SplitHeldOutVisitors(
            opts.holdout_visitors
        )
    train_pairs, eval_pairs = pairs | "SplitTrainEval" >> events.SplitTrainEval(opts.eval_fraction)
    train_rows = train_pairs | "TrainToRecordBatches" >> beam.Map(preprocessing.raw_record_batch)
    eval_rows = eval_pairs | "EvalToRecordBatches" >> beam.Map(preprocessing.raw_record_batch)

    raw_config = preprocessing.raw_tensor_adapter_config()
    with tft_beam.Context(temp_dir=f"{output_dir}/tmp", force_tf_compat_v1=False):
        transformed_train, transform_fn = (
            train_rows,
            raw_config,
        ) | "AnalyzeAndTransform" >> tft_beam.AnalyzeAndTransformDataset(
            preprocessing.make_preprocessing_fn(transform_config), output_record_batches=True
        )
        transformed_eval = (
            (eval_rows, raw_config),
            transform_fn,
        ) | "TransformEval" >> tft_beam.TransformDataset(output_record_batches=True)
        _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(output_dir)

    train_data, _ = transformed_train
    eval_data, _ = transformed_eval
    for split, data in ((features.TRAIN_DIR, train_data), (features.EVAL_DIR, eval_data)):
        label = split.capitalize()
        kept = data | f"DropOutOfVocabulary{label}" >> DropOutOfVocabulary(split)
        _ = kept[CELLS_TAG] | f"Write{label}Matrix" >> WriteSparseMatrix(
            f"{output_dir}/{split}", opts.num_shards, write_groups
        )
        counted.append(kept[counts.COUNTS_TAG])
    if heldout_pairs is not None:
        transform_fn_dir, _ = transform_fn
        counted.append(heldout_pairs | "CountHeldOutPairs" >> beam.Map(holdout.count_pairs))
        counted.append(
            heldout_pairs
            | "TransformHeldOut"
            >> holdout.TransformHeldOut(transform_fn_dir, opts.holdout_foldin_fraction)
            | "WriteHeldOut"
            >> holdout.WriteHeldOut(f"{output_dir}/{features.HELDOUT_DIR}", opts.num_shards)
        )
    _ = tuple(counted) | "WriteCounts" >> counts.WriteCounts(f"{output_dir}/tmp/{COUNTS_FILE}")
    _ = (
        train_data
        | "ExtractScaleStats" >> beam.ParDo(_ScaleStatsFn())
        | "TakeOneScaleStats" >> beam.CombineGlobally(_first)
        | "EncodeScaleStats" >> beam.Map(json.dumps)
        | "WriteScaleStats"
        >> beam.io.WriteToText(f"{output_dir}/tmp/{SCALE_STATS_FILE}", shard_name_template="")
    )


def read_counters(output_dir: str) -> dict[str, int]:
    """The exact counts a finished run of `build_pipeline(.., output_dir)` wrote to
    tmp/counts.json (non-zero ones only), heldout_dropped_unknown_content derived
    (`holdout.dropped_unknown`)."""
    return holdout.dropped_unknown(counts.read_counts(f"{output_dir}/tmp/{COUNTS_FILE}"))


def _read_text(path: str) -> str:
    with FileSystems.open(path) as handle:
        return handle.read().decode("utf-8")


def make_summary(opts, output_dir: str, counters: dict[str, int], seconds: float) -> dict:
    """summary.json: sizes, scaling statistics and counts of a finished run.

    `counters`: {name: count} as `read_counters` gives them; "counters" holds those whose name
    has no ':', and rejected_by_reason the `rejected:<reason>` ones.
    """
    transform_output = tft.TFTransformOutput(output_dir)
    stats_text = _read_text(f"{output_dir}/tmp/{SCALE_STATS_FILE}").strip()
    stats = json.loads(stats_text) if stats_text and stats_text != "null" else None
    rejected = {
        name.split(":", 1)[1]: value
        for name, value in sorted(counters.items())
        if name.startswith("rejected:")
    }
    plain = {name: value for name, value in sorted(counters.items()) if ":" not in name}
    return {
        "input": opts.input or opts.bigquery_table or opts.bigquery_query,
        "input_format": opts.input_format,
        "content_id_source": opts.content_id_source,
        "eval_fraction": opts.eval_fraction,
        "scaling": preprocess_options.effective_scaling(opts),
        "scale_stats": stats,
        "median": stats.get("median") if stats else None,
        "nusers": transform_output.vocabulary_size_by_name(features.USER_VOCAB),
        "nitems": transform_output.vocabulary_size_by_name(features.ITEM_VOCAB),
        "train_interactions": counters.get("train_interactions", 0),
        "eval_interactions": counters.get("eval_interactions", 0),
        "eval_dropped_unknown": counters.get("eval_dropped_out_of_vocabulary", 0),
        "holdout_visitors": opts.holdout_visitors,
        "holdout_foldin_fraction": opts.holdout_foldin_fraction,
        "heldout_visitors": counters.get("heldout_visitors", 0),
        "heldout_foldin_interactions": counters.get("heldout_foldin_interactions", 0),
        "heldout_target_interactions": counters.get("heldout_target_interactions", 0),
        "heldout_dropped_unknown": counters.get("heldout_dropped_unknown_content", 0),
        "counters": {**plain, "rejected_by_reason": rejected},
        "seconds": round(seconds, 3),
    }


def finish_output(out: str, summary: dict) -> None:
    """Removes the run's scratch files under `out`/tmp/, then writes summary.json last."""
    staging.delete_tree(f"{out}/tmp")
    with FileSystems.create(f"{out}/{features.SUMMARY_FILE}") as handle:
        handle.write(json.dumps(summary, indent=2, sort_keys=True).encode("utf-8"))


def run(argv: list[str] | None = None) -> dict:
    """Runs the preprocessing pipeline to completion and returns its summary.

    Raises:
        cli.UsageError: bad flags or input, before anything runs.
        RuntimeError: the input produced no train interactions.
    """
    options = cli.parse_options(argv, preprocess_options.PreprocessOptions)
    opts = options.view_as(preprocess_options.PreprocessOptions)
    preprocess_options.validate(opts)
    try:
        staging.check_writable(opts.output_dir, opts.overwrite, features.SUMMARY_FILE)
    except staging.OutputExistsError as error:
        raise cli.UsageError(str(error)) from None

    start = time.monotonic()
    try:
        with staging.staged_output(opts.output_dir, opts.overwrite, features.SUMMARY_FILE) as out:
            pipeline = beam.Pipeline(options=options)
            build_pipeline(pipeline, opts, out, worker_threads.direct_workers(options))
            with worker_threads.local_budget(options):
                result = pipeline.run()
                result.wait_until_finish()
            counters = read_counters(out)
            summary = make_summary(opts, out, counters, time.monotonic() - start)
            if summary["train_interactions"] == 0:
                raise RuntimeError(
                    "the input produced no train interactions: check --input_format and "
                    f"--content_id_source (counters: {summary['counters']})"
                )
            finish_output(out, summary)
    except staging.OutputExistsError as error:  # output_dir changed while the pipeline ran
        raise cli.UsageError(str(error)) from None
    logger.info(
        "preprocessed %d lines into %d users x %d items, %d train and %d eval interactions "
        "in %.1f s",
        counters.get("lines_read", 0),
        summary["nusers"],
        summary["nitems"],
        summary["train_interactions"],
        summary["eval_interactions"],
        summary["seconds"],
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    freeze_long_lived()
    return cli.main_with_usage_errors(
        run,
        argv,
        lambda: cli.print_help(
            "python -m pipeline.preprocess", __doc__, preprocess_options.PreprocessOptions
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
