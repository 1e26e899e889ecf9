r"""Batch prediction: top-K unseen content for every visitor, in the visitors' own IDs.

    python -m trainer.batch_predict --model_dir runs/local/model --output recs.tsv --k 10
    python -m trainer.batch_predict ... --targeting      # top-K visitors per content instead
    python -m trainer.batch_predict ... --format jsonl   # JSON lines instead of TSV

TSV (lossless for every ID preprocessing accepts): a header line `visitorId<TAB>contentIds`
(with --targeting `contentId<TAB>visitorIds`), then one line per visitor. The file is UTF-8,
lines end with '\n', and each line is a record of Python's `csv` "excel-tab" dialect with
QUOTE_MINIMAL: fields are separated by a tab, and a field holding a tab or '"' is enclosed in
'"' with each '"' doubled. The first field is the ID itself, the second is a JSON array of the
ranked IDs, best first (`json.dumps(ids, ensure_ascii=False)`, so it always holds '"' and is
always quoted unless empty):

    visitorId	contentIds
    7291783718742811253	"[""article-0042"", ""a,b""]"

`read_predictions` parses it back (pandas: `read_csv(path, sep="\t", dtype=str,
keep_default_na=False)` and `json.loads` on the second column). JSONL: {"visitorId": ...,
"contentIds": [...], "scores": [...]} (with --targeting {"contentId": ..., "visitorIds": [...],
"scores": [...]}), `json.dumps(..., ensure_ascii=False)` per line. In both formats only '\n'
ends a line: IDs may hold U+2028, U+0085, \x1c and other characters that `str.splitlines()`
splits on, so read line by line from the file (or split on '\n'), never with `splitlines()`.

Items a visitor has already seen are never recommended to them (and, with --targeting, visitors
who have seen a content are never targeted with it). The file is written under a temporary name
and renamed when complete.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import os
import sys
from collections.abc import Iterator

import numpy as np
from apache_beam.io.filesystems import FileSystems
from tqdm import tqdm

from pipeline import cli, staging
from trainer import metrics
from trainer import model as model_lib
from trainer.sparse import CsrMatrix

logger = logging.getLogger(__name__)

FORMATS = ("tsv", "jsonl")
# The TSV's records: "excel-tab" (tab-separated, '"' quotes, doubled inside), quoting only
# what needs it, lines ended by '\n'.
_TSV = {"dialect": "excel-tab", "quoting": csv.QUOTE_MINIMAL, "lineterminator": "\n"}
_COLUMNS = {False: ("visitorId", "contentIds"), True: ("contentId", "visitorIds")}


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
            scores = metrics.dot_scores(query[start:stop], candidates)
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


def tsv_line(fields: list[str]) -> str:
    """One TSV record, '\n' included (see the module docstring for the quoting rule)."""
    buffer = io.StringIO()
    csv.writer(buffer, **_TSV).writerow(fields)
    return buffer.getvalue()


def header_line(targeting: bool, output_format: str) -> str | None:
    """The line a predictions file starts with ('\n' included), or None (JSONL has none)."""
    return tsv_line(list(_COLUMNS[targeting])) if output_format == "tsv" else None


def format_line(
    key: str, ranked: list[str], scores: list[float], targeting: bool, output_format: str
) -> str:
    """One visitor's (content's, with targeting) line of a predictions file, '\n' included."""
    if output_format == "jsonl":
        key_name, list_name = _COLUMNS[targeting]
        record = {key_name: key, list_name: ranked, "scores": [round(s, 6) for s in scores]}
        return json.dumps(record, ensure_ascii=False) + "\n"
    return tsv_line([key, json.dumps(ranked, ensure_ascii=False)])


def write_predictions(
    model_dir: str,
    output: str,
    k: int = 10,
    targeting: bool = False,
    output_format: str = "tsv",
    progress: bool = False,
) -> int:
    """Writes predictions to `output` (local or any Beam filesystem).

    Returns:
        The number of visitors (contents, with targeting) written: the TSV's lines after its
        header, or the JSONL's lines.
    """
    if output_format not in FORMATS:
        raise ValueError(f"unknown format {output_format!r}; expected one of {FORMATS}")
    model = model_lib.load(model_dir)
    partial = f"{output}.incomplete"
    count = 0
    with FileSystems.create(partial) as handle:
        header = header_line(targeting, output_format)
        if header is not None:
            handle.write(header.encode("utf-8"))
        for key, ranked, scores in predict(model, k, targeting, progress=progress):
            line = format_line(key, ranked, scores, targeting, output_format)
            handle.write(line.encode("utf-8"))
            count += 1
    FileSystems.rename([partial], [output]) if "://" in output else os.replace(partial, output)
    logger.info("wrote %d predictions to %s", count, output)
    return count


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One line of a predictions file.

    Attributes:
        key: the visitorId (the contentId, with targeting).
        ranked: list[str], the contentIds (visitorIds, with targeting), best first.
        scores: list[float] aligned with `ranked` (JSONL), or None (TSV holds no scores).
        targeting: whether the file was written with --targeting.
    """

    key: str
    ranked: list[str]
    scores: list[float] | None
    targeting: bool


def _lines(path: str) -> Iterator[str]:
    """The lines of a UTF-8 file, split on '\n' only (never on U+2028 and the like)."""
    with FileSystems.open(path) as handle:
        for line in handle:  # Binary files split on b"\n" only.
            yield line.decode("utf-8").removesuffix("\n")


def read_predictions(path: str, output_format: str | None = None) -> Iterator[Prediction]:
    """Parses a file written by `write_predictions`, giving back every ID exactly.

    Args:
        path: the predictions file (local or any Beam filesystem).
        output_format: "tsv" or "jsonl"; None: "jsonl" if path ends with ".jsonl", else "tsv".

    Raises:
        ValueError: the file is not in that format.
    """
    if output_format is None:
        output_format = "jsonl" if path.endswith(".jsonl") else "tsv"
    if output_format == "jsonl":
        for line in _lines(path):
            record = json.loads(line)
            targeting = "contentId" in record
            key_name, list_name = _COLUMNS[targeting]
            yield Prediction(record[key_name], record[list_name], record["scores"], targeting)
        return
    if output_format != "tsv":
        raise ValueError(f"unknown format {output_format!r}; expected one of {FORMATS}")
    rows = csv.reader(_lines(path), **_TSV)
    header = tuple(next(rows, ()))
    if header not in _COLUMNS.values():
        raise ValueError(f"{path}: not a batch-prediction TSV (header {list(header)})")
    targeting = header == _COLUMNS[True]
    for row in rows:
        if len(row) != 2:
            raise ValueError(f"{path}: line {rows.line_num} has {len(row)} fields, not 2")
        key, ranked = row
        yield Prediction(key, json.loads(ranked), None, targeting)


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
    dist = parser.add_argument_group(
        "distributed prediction (every other flag is a Beam pipeline option: --runner, "
        "--project, --region, --temp_location, --flink_master, --direct_num_workers, ...)"
    )
    dist.add_argument(
        "--distributed",
        action="store_true",
        help="predict with the Beam pipeline of trainer.beam_predict; --output is then a "
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
    if args.distributed:
        from trainer import beam_predict  # imports this module

        spec = beam_predict.PredictSpec(
            args.model_dir, args.k, args.targeting, args.output_format, args.block_rows
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
        )
    except FileNotFoundError as error:
        raise cli.UsageError(str(error)) from None


def main(argv: list[str] | None = None) -> int:
    return cli.main_with_usage_errors(run, argv)


if __name__ == "__main__":
    sys.exit(main())
