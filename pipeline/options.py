"""Flags of the preprocessing pipeline, as a `PipelineOptions` view."""

from __future__ import annotations

import math

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from common import locations
from common.cli import UsageError
from pipeline import records
from pipeline.events import (
    FORMAT_CSV,
    FORMAT_GA360,
    FORMAT_MOVIELENS,
    INPUT_FORMATS,
    SUM_BUCKETS,
)
from transforms import features

# Default keys of WriteSparseMatrix's shuffles (`pipeline.matrix_io`): row (column) index mod
# shards. Defined here, not in matrix_io, so that parsing flags does not import TensorFlow.
GROUP_SHARDS = 32
# --shuffle_keys 0: one key per PAIRS_PER_SHUFFLE_KEY pairs. A SumPerPair key holds the totals of
# its pairs as a Python dict (about 300 bytes a pair), a WriteSparseMatrix group its cells as
# arrays (20 bytes a cell, a few copies while sorting and encoding): 1M pairs keep both well inside
# a Dataflow worker's memory per core (3.75 GB on n1-standard-1, 4 GB on n2-standard-4).
PAIRS_PER_SHUFFLE_KEY = 1_000_000
# Fewest input bytes per (visitor, content) pair, to estimate pairs from the input's size: an
# overestimate of pairs only adds keys. Synthetic GA360 sessions (pipeline.synthetic), whose hits
# hold far fewer fields than a real export's, take 69 gzip bytes a pair; a CSV or MovieLens line
# takes 20-50 bytes, 5-6 gzipped.
MIN_INPUT_BYTES_PER_PAIR = {FORMAT_GA360: 32, FORMAT_CSV: 4, FORMAT_MOVIELENS: 4}
MAX_SHUFFLE_KEYS = 1 << 16  # The most keys --shuffle_keys 0 picks.
BIGQUERY_SHUFFLE_KEYS = 1024  # Keys of --shuffle_keys 0 for BigQuery input (size unknown).


class PreprocessOptions(PipelineOptions):
    """`python -m pipeline.preprocess` flags; every other flag goes to the Beam runner."""

    @classmethod
    def _add_argparse_args(cls, parser):
        group = parser.add_argument_group("preprocessing")
        group.add_argument(
            "--input",
            help="Input file pattern (local or any Beam filesystem, e.g. gs://b/ga/*.json.gz); "
            "plain or gzip. Several patterns separated by commas are read together.",
        )
        group.add_argument(
            "--bigquery_table",
            help="Read GA360 sessions from this BigQuery table (project:dataset.ga_sessions_*) "
            "instead of --input.",
        )
        group.add_argument(
            "--bigquery_query",
            help="Read GA360 sessions from this standard-SQL query instead of --input.",
        )
        group.add_argument("--output_dir", help="Where the preprocessed dataset goes.")
        group.add_argument(
            "--input_format",
            default=FORMAT_GA360,
            help=f"One of {', '.join(INPUT_FORMATS)} (default ga360).",
        )
        group.add_argument(
            "--content_id_source",
            default=records.DEFAULT_CONTENT_ID_SOURCE,
            help="Where a PAGE hit's contentId comes from: customDimension:N (hit-level custom "
            "dimension index N) or pagePath (default customDimension:10).",
        )
        group.add_argument(
            "--eval_fraction",
            type=float,
            default=0.1,
            help="Fraction of (visitor, content) pairs held out for evaluation, in [0, 1) "
            "(default 0.1).",
        )
        group.add_argument(
            "--holdout_visitors",
            type=float,
            default=0.0,
            help="Fraction of visitors (by a hash of visitorId) held out whole, in [0, 1): they "
            "stay out of the vocabularies and the train/eval matrices, and their cells go to "
            "heldout/ to evaluate fold-in of new visitors (default 0: off).",
        )
        group.add_argument(
            "--holdout_foldin_fraction",
            type=float,
            default=0.8,
            help="Share of each held-out visitor's cells (by a hash of the pair) in the fold-in "
            "part; the rest is the target part, in (0, 1) (default 0.8).",
        )
        group.add_argument(
            "--scaling",
            default=None,
            help="Rating scaling: median (0.3 * duration / median, capped at 1), log1p "
            "(log1p(duration / median)), unit (min-max to [0, 1]) or raw. Default: median, or "
            "unit for movielens.",
        )
        for side, what in (("user", "visitors"), ("item", "content")):
            group.add_argument(
                f"--{side}_top_k",
                type=int,
                default=None,
                help=f"Keep only the most frequent {what} in the vocabulary (default: all).",
            )
            group.add_argument(
                f"--{side}_min_count",
                type=int,
                default=0,
                help=f"Keep only {what} with at least this many train pairs (default: all).",
            )
        group.add_argument(
            "--max_time_gap_s",
            type=float,
            default=records.DEFAULT_MAX_TIME_GAP_MS / 1000,
            help="A session with a gap between page views longer than this many seconds is "
            "rejected as corrupt (default 14400, GA's longest session timeout).",
        )
        group.add_argument(
            "--max_id_length",
            type=int,
            default=records.DEFAULT_MAX_ID_LENGTH,
            help="Visitor or content IDs longer than this many characters are rejected "
            "(default 256).",
        )
        group.add_argument(
            "--quantile_epsilon",
            type=float,
            default=1e-3,
            help="Rank error bound of the approximate median (default 0.001).",
        )
        group.add_argument(
            "--num_shards",
            type=int,
            default=0,
            help="Shards per TFRecord output (default 0: the runner decides).",
        )
        group.add_argument(
            "--shuffle_keys",
            type=int,
            default=0,
            help="Keys of each grouping shuffle (the per-pair sums by visitor bucket, the rows and "
            "columns by index): each key's data is held in one worker's memory. Default 0: "
            f"about one key per {PAIRS_PER_SHUFFLE_KEY:,} pairs, estimated from the input's size "
            f"(at least {SUM_BUCKETS} and {GROUP_SHARDS}; {BIGQUERY_SHUFFLE_KEYS} for BigQuery "
            "input).",
        )
        group.add_argument(
            "--overwrite",
            action="store_true",
            default=False,
            help="Replace a dataset this project wrote in --output_dir (never other files).",
        )


def effective_scaling(options: PreprocessOptions) -> str:
    if options.scaling:
        return options.scaling
    return (
        features.SCALING_UNIT
        if options.input_format == FORMAT_MOVIELENS
        else (features.SCALING_MEDIAN)
    )


def input_patterns(options: PreprocessOptions) -> list[str]:
    """The file patterns of --input: one, or several separated by commas."""
    return [pattern for pattern in (options.input or "").split(",") if pattern]


def auto_shuffle_keys(input_bytes: int, input_format: str) -> int:
    """Keys per shuffle for an input of `input_bytes`: about one per PAIRS_PER_SHUFFLE_KEY pairs
    of its largest possible number of pairs, at most MAX_SHUFFLE_KEYS (the floors are applied by
    `shuffle_keys`)."""
    pairs = input_bytes / MIN_INPUT_BYTES_PER_PAIR[input_format]
    return min(MAX_SHUFFLE_KEYS, max(1, math.ceil(pairs / PAIRS_PER_SHUFFLE_KEY)))


def shuffle_keys(options: PreprocessOptions) -> tuple[int, int]:
    """(SumPerPair's visitor buckets, WriteSparseMatrix's row and column groups).

    --shuffle_keys N gives N to both; 0 derives them from the total size of the --input files
    (`auto_shuffle_keys`), at least SUM_BUCKETS and GROUP_SHARDS (the counts that are fastest
    on one machine), or BIGQUERY_SHUFFLE_KEYS for BigQuery input. The output does not depend on
    them.
    """
    if options.shuffle_keys:
        return options.shuffle_keys, options.shuffle_keys
    patterns = input_patterns(options)
    if patterns:
        matches = FileSystems.match(patterns)
        size = sum(m.size_in_bytes for match in matches for m in match.metadata_list)
        keys = auto_shuffle_keys(size, options.input_format)
    else:
        keys = BIGQUERY_SHUFFLE_KEYS
    return max(SUM_BUCKETS, keys), max(GROUP_SHARDS, keys)


def validate(options: PreprocessOptions) -> None:
    """Checks the flags and the input and output locations before the pipeline starts
    (`common.locations`: paths the runner's workers can reach, schemes Beam and TensorFlow
    have).

    Raises:
        UsageError: naming the first problem found.
    """
    sources = [s for s in (options.input, options.bigquery_table, options.bigquery_query) if s]
    if len(sources) != 1:
        raise UsageError("give exactly one of --input, --bigquery_table, --bigquery_query")
    if not options.output_dir:
        raise UsageError("--output_dir is required")
    if options.input_format not in INPUT_FORMATS:
        raise UsageError(
            f"--input_format {options.input_format!r} is not one of {', '.join(INPUT_FORMATS)}"
        )
    if (options.bigquery_table or options.bigquery_query) and options.input_format != FORMAT_GA360:
        raise UsageError("--bigquery_table/--bigquery_query read GA360 sessions only")
    try:
        records.parse_content_id_source(options.content_id_source)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if not 0 <= options.eval_fraction < 1:
        raise UsageError(f"--eval_fraction must be in [0, 1), got {options.eval_fraction}")
    if not 0 <= options.holdout_visitors < 1:
        raise UsageError(f"--holdout_visitors must be in [0, 1), got {options.holdout_visitors}")
    if not 0 < options.holdout_foldin_fraction < 1:
        raise UsageError(
            f"--holdout_foldin_fraction must be in (0, 1), got {options.holdout_foldin_fraction}"
        )
    if effective_scaling(options) not in features.SCALINGS:
        raise UsageError(
            f"--scaling {options.scaling!r} is not one of {', '.join(features.SCALINGS)}"
        )
    for flag in ("user_top_k", "item_top_k"):
        value = getattr(options, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag} must be >= 1, got {value}")
    for flag in ("user_min_count", "item_min_count", "num_shards", "shuffle_keys"):
        if getattr(options, flag) < 0:
            raise UsageError(f"--{flag} must be >= 0, got {getattr(options, flag)}")
    if not options.max_time_gap_s > 0:
        raise UsageError(f"--max_time_gap_s must be > 0, got {options.max_time_gap_s}")
    if options.max_id_length < 1:
        raise UsageError(f"--max_id_length must be >= 1, got {options.max_id_length}")
    if not 0 < options.quantile_epsilon < 0.5:
        raise UsageError(f"--quantile_epsilon must be in (0, 0.5), got {options.quantile_epsilon}")
    # TF Transform writes part of --output_dir (transform_fn/), so TensorFlow must reach it.
    locations.check_locations(
        options,
        [
            locations.Location("--output_dir", options.output_dir, tensorflow=True),
            *(locations.Location("--input", pattern) for pattern in input_patterns(options)),
        ],
    )
    for pattern in input_patterns(options):
        try:
            matched = FileSystems.match([pattern])[0].metadata_list
        except Exception as error:  # Beam raises BeamIOError and others for bad patterns.
            raise UsageError(f"cannot read --input {pattern}: {error}") from None
        if not matched:
            raise UsageError(f"--input {pattern} matches no files")
