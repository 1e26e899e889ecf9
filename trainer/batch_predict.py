r"""Batch prediction: top-K unseen content for every visitor, in the visitors' own IDs.

    python -m trainer.batch_predict --model_dir runs/local/model --output recs.tsv --k 10
    python -m trainer.batch_predict ... --targeting      # top-K visitors per content instead
    python -m trainer.batch_predict ... --format jsonl   # JSON lines instead of TSV

The file formats (a TSV with a header line, or JSON lines; both lossless for every ID that
preprocessing accepts) and how to read them back are `trainer.serving.predictions`.

Items a visitor has already seen are never recommended to them (and, with --targeting, visitors
who have seen a content are never targeted with it). Scores and lists are `trainer.core.topk`'s
(float32 x_u · y_i, ties to the lower ID): the lists metrics.json and the quality gate score.
The file is written by `common.atomic.write_atomically`: readers see the previous file or the
whole new one, never a part.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator

import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions
from tqdm import tqdm

from common import cli, locations, staging
from common.atomic import write_atomically
from trainer.beam import predict as beam_predict
from trainer.core.chunked_topk import DEFAULT_SCORE_BYTES, FactorScores, chunked_top_k
from trainer.core.sparse import CsrMatrix
from trainer.core.xla import configure_xla
from trainer.serving import model as model_lib
from trainer.serving.predictions import FORMATS, format_line, header_line

logger = logging.getLogger(__name__)


def _rows(
    query: np.ndarray,
    candidates: np.ndarray,
    seen: CsrMatrix,
    k: int,
    batch_size: int,
    progress: bool,
    item_chunk: int = 0,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(row, top-k candidate ids, scores) for every row of `query`, seen candidates excluded.

    Rows are ranked `batch_size` at a time against `item_chunk` candidates at a time
    (`chunked_top_k`: memory O(batch_size · item_chunk + batch_size · k)).

    Args:
        query: float32 [n, k_factors], e.g. user factors.
        candidates: float32 [m, k_factors], e.g. item factors.
        seen: CsrMatrix [n, m], the candidates each row must not get.
        item_chunk: candidates scored at once; 0: automatic (`chunked_topk.item_chunk_for`).
    """
    n = query.shape[0]
    with tqdm(total=n, disable=not progress, unit="rows", desc="predicting") as bar:
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            scores = FactorScores(query[start:stop], candidates)
            ids, top = chunked_top_k(scores, seen.row_slice(start, stop), k, item_chunk)
            for offset in range(stop - start):
                valid = ids[offset] >= 0
                yield start + offset, ids[offset][valid], top[offset][valid]
            bar.update(stop - start)


def predict(
    model: model_lib.WALSModel,
    k: int,
    targeting: bool = False,
    batch_size: int = 1024,
    progress: bool = False,
    item_chunk: int = 0,
) -> Iterator[tuple[str, list, list]]:
    """(key, ranked original IDs, scores) for every visitor (or content, with targeting)."""
    seen = model.seen_matrix()
    if targeting:
        query, candidates, keys, names = (
            model.item_factors,
            model.user_factors,
            model.items,
            model.users,
        )
        seen = seen.transpose()
    else:
        query, candidates, keys, names = (
            model.user_factors,
            model.item_factors,
            model.users,
            model.items,
        )
    for row, ids, scores in _rows(query, candidates, seen, k, batch_size, progress, item_chunk):
        yield keys[row], [names[i] for i in ids], scores.tolist()


def write_predictions(
    model_dir: str,
    output: str,
    k: int = 10,
    targeting: bool = False,
    output_format: str = "tsv",
    progress: bool = False,
    item_chunk: int = 0,
) -> int:
    """Writes predictions to `output` (local or any Beam filesystem).

    Returns:
        The number of visitors (contents, with targeting) written: the TSV's lines after its
        header, or the JSONL's lines.
    """
    if output_format not in FORMATS:
        raise ValueError(f"unknown format {output_format!r}; expected one of {FORMATS}")
    model = model_lib.load(model_dir)
    count = 0
    with write_atomically(output) as handle:
        header = header_line(targeting, output_format)
        if header is not None:
            handle.write(header.encode("utf-8"))
        rows = predict(model, k, targeting, progress=progress, item_chunk=item_chunk)
        for key, ranked, scores in rows:
            line = format_line(key, ranked, scores, targeting, output_format)
            handle.write(line.encode("utf-8"))
            count += 1
    logger.info("wrote %d predictions to %s", count, output)
    return count


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.batch_predict", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model_dir", required=True, help="a trainer.task --output_dir")
    parser.add_argument("--output", required=True, help="the predictions file to write")
    parser.add_argument("--k", type=int, default=10, help="recommendations per line (default 10)")
    parser.add_argument(
        "--targeting",
        action="store_true",
        help="top-K visitors per content instead of top-K content per visitor",
    )
    parser.add_argument("--format", dest="output_format", choices=FORMATS, default="tsv")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--score_item_chunk",
        type=int,
        default=0,
        help="candidates (contents; visitors with --targeting) scored at once per block of "
        "rows, which bounds the scores' memory at rows x chunk x 4 bytes (default 0: as many as "
        f"fit in {DEFAULT_SCORE_BYTES >> 20} MiB); the output does not depend on it",
    )
    dist = parser.add_argument_group(
        "distributed prediction (every other flag is a Beam pipeline option: --runner, "
        "--project, --region, --temp_location, --flink_master, --direct_num_workers, "
        "--workers_share_filesystem, ...)"
    )
    dist.add_argument(
        "--distributed",
        action="store_true",
        help="predict with the Beam pipeline of trainer.beam.predict; --output is then a "
        "directory of shards (predictions-SSSSS-of-NNNNN.tsv, each with the header) and "
        "predictions.json",
    )
    dist.add_argument(
        "--block_rows",
        type=int,
        default=4096,
        help="visitors per Beam element with --distributed (default 4096)",
    )
    args, beam_argv = parser.parse_known_args(argv)
    if beam_argv and not args.distributed:
        raise cli.UsageError(f"unknown flag(s): {', '.join(beam_argv)} (see --help)")
    unknown = cli.unknown_flags(beam_argv)
    if unknown:
        raise cli.UsageError(f"unknown flag(s): {', '.join(unknown)} (see --help)")
    if args.k <= 0:
        raise cli.UsageError(f"--k must be > 0, got {args.k}")
    if args.block_rows <= 0:
        raise cli.UsageError(f"--block_rows must be > 0, got {args.block_rows}")
    if args.score_item_chunk < 0:
        raise cli.UsageError(f"--score_item_chunk must be >= 0, got {args.score_item_chunk}")
    locations.check_locations(
        PipelineOptions(beam_argv) if args.distributed else None,
        [
            locations.Location("--model_dir", args.model_dir),
            locations.Location("--output", args.output),
        ],
    )
    if args.distributed:
        spec = beam_predict.PredictSpec(
            args.model_dir,
            args.k,
            args.targeting,
            args.output_format,
            args.block_rows,
            args.score_item_chunk,
        )
        try:
            return beam_predict.write_predictions(spec, args.output, beam_argv)
        except (FileNotFoundError, staging.OutputExistsError) as error:
            raise cli.UsageError(str(error)) from None
    try:
        return write_predictions(
            args.model_dir,
            args.output,
            args.k,
            args.targeting,
            args.output_format,
            progress=not args.no_progress,
            item_chunk=args.score_item_chunk,
        )
    except FileNotFoundError as error:
        raise cli.UsageError(str(error)) from None


def main(argv: list[str] | None = None) -> int:
    configure_xla()  # before the first XLA compile of this process
    return cli.main_with_usage_errors(run, argv)


if __name__ == "__main__":
    sys.exit(main())
