r"""Prediction files: the TSV and JSONL lines of `trainer.batch_predict`, written and read back.

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
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Iterator

from apache_beam.io.filesystems import FileSystems

FORMATS = ("tsv", "jsonl")
# The TSV's records: "excel-tab" (tab-separated, '"' quotes, doubled inside), quoting only
# what needs it, lines ended by '\n'.
_TSV = {"dialect": "excel-tab", "quoting": csv.QUOTE_MINIMAL, "lineterminator": "\n"}
_COLUMNS = {False: ("visitorId", "contentIds"), True: ("contentId", "visitorIds")}


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
