"""Batch prediction: top-K unseen content for every visitor, in the visitors' own IDs.

    python -m trainer.batch_predict --model_dir runs/local/model --output recs.tsv --k 10
    python -m trainer.batch_predict ... --targeting      # top-K visitors per content instead
    python -m trainer.batch_predict ... --format jsonl   # JSON lines instead of TSV

TSV: `visitorId<TAB>contentId1,contentId2,...` (best first); with --targeting
`contentId<TAB>visitorId1,visitorId2,...`. JSONL: {"visitorId": ..., "contentIds": [...],
"scores": [...]} (with --targeting {"contentId": ..., "visitorIds": [...], "scores": [...]}).
Items a visitor has already seen are never recommended to them (and, with --targeting, visitors
who have seen a content are never targeted with it). The file is written under a temporary name
and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterator

import numpy as np
from apache_beam.io.filesystems import FileSystems
from tqdm import tqdm

from pipeline import cli
from trainer import metrics
from trainer import model as model_lib
from trainer.sparse import CsrMatrix

logger = logging.getLogger(__name__)


def _rows(
    query: np.ndarray,
    candidates: np.ndarray,
    seen: CsrMatrix,
    k: int,
    batch_size: int,
    progress: bool,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(row, top-k candidate ids, scores) for every row of `query`, seen candidates excluded.

    Args:
        query: float32 [n, k_factors], e.g. user factors.
        candidates: float32 [m, k_factors], e.g. item factors.
        seen: CsrMatrix [n, m], the candidates each row must not get.
    """
    n = query.shape[0]
    with tqdm(total=n, disable=not progress, unit="rows", desc="predicting") as bar:
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            scores = query[start:stop] @ candidates.T
            ids, top = metrics.top_k_excluding(scores, seen.row_slice(start, stop), k)
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
) -> Iterator[tuple[str, list, list]]:
    """(key, ranked original IDs, scores) for every visitor (or content, with targeting)."""
    seen = CsrMatrix(
        model.seen_indptr,
        model.seen_indices,
        np.ones(model.seen_indices.size, np.float32),
        (len(model.users), len(model.items)),
    )
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
    for row, ids, scores in _rows(query, candidates, seen, k, batch_size, progress):
        yield keys[row], [names[i] for i in ids], scores.tolist()


def write_predictions(
    model_dir: str,
    output: str,
    k: int = 10,
    targeting: bool = False,
    output_format: str = "tsv",
    progress: bool = False,
) -> int:
    """Writes predictions to `output` (local or any Beam filesystem); returns the line count."""
    model = model_lib.load(model_dir)
    key_name, list_name = ("contentId", "visitorIds") if targeting else ("visitorId", "contentIds")
    partial = f"{output}.incomplete"
    count = 0
    with FileSystems.create(partial) as handle:
        for key, ranked, scores in predict(model, k, targeting, progress=progress):
            if output_format == "jsonl":
                record = {key_name: key, list_name: ranked, "scores": [round(s, 6) for s in scores]}
                line = json.dumps(record, ensure_ascii=False)
            else:
                line = f"{key}\t{','.join(ranked)}"
            handle.write((line + "\n").encode("utf-8"))
            count += 1
    FileSystems.rename([partial], [output]) if "://" in output else os.replace(partial, output)
    logger.info("wrote %d lines to %s", count, output)
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
    parser.add_argument("--format", dest="output_format", choices=("tsv", "jsonl"), default="tsv")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.k <= 0:
        raise cli.UsageError(f"--k must be > 0, got {args.k}")
    try:
        return write_predictions(
            args.model_dir,
            args.output,
            args.k,
            args.targeting,
            args.output_format,
            progress=not args.no_progress,
        )
    except FileNotFoundError as error:
        raise cli.UsageError(str(error)) from None


def main(argv: list[str] | None = None) -> int:
    return cli.main_with_usage_errors(run, argv)


if __name__ == "__main__":
    sys.exit(main())
