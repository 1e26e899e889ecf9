"""Synthetic Google Analytics 360 session exports with a planted taste structure.

Writes NDJSON in the BigQuery export's own nested schema, one session per line, so the
preprocessing pipeline can be demonstrated and tested without real analytics data:

    python -m pipeline.synthetic --output data/ga_sessions.json.gz --sessions 100000 --seed 7

The world behind the data (drawn by `pipeline.synthetic_world`, its sessions by
`pipeline.synthetic_sessions`; this module writes them, interleaves bad lines, and is the
command line):

- `topics` topics and `items` content items; each item has one topic and a Zipf popularity
  (weight 1 / rank**1.1, ranks in random order), so a few items take most of the views.
- `visitors` visitors; each likes 1 to 3 topics with Dirichlet weights (its taste). Visitors get
  1 + Multinomial(sessions - visitors, lognormal activity) visits, numbered in time order.
- Each visit's articles, dwell times and the noise of a real export: see
  `pipeline.synthetic_sessions`.

`--bad_lines K` interleaves K malformed lines, one kind of damage each (`BAD_LINE_KINDS`).
The output is a pure function of the arguments: the same arguments give the same bytes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import time
from typing import Any

import numpy as np

from common.atomic import write_atomically
from pipeline.synthetic_sessions import (
    DEFAULT_CONTENT_DIMENSION,
    HOSTNAME,
    generate_sessions,
)
from pipeline.synthetic_world import DEFAULT_ITEMS, DEFAULT_TOPICS, START_TIME

logger = logging.getLogger(__name__)

DEFAULT_SEED = 0
DEFAULT_SESSIONS = 10_000

BAD_LINE_KINDS = (  # the damage done to each malformed line, in the order they are interleaved
    "malformed_json",  # the line is not JSON (truncated)
    "not_an_object",  # a JSON array holding a session
    "missing_field:fullVisitorId",
    "bad_type:hits",  # hits is an object, not a list
    "bad_type:hit.time",  # a PAGE hit whose time is "abc"
    "negative_hit_time",  # a PAGE hit whose time is negative
    "empty_hits",  # hits is []
)


def bad_line(kind: str, number: int, content_dimension: int = DEFAULT_CONTENT_DIMENSION) -> str:
    """Returns one malformed line whose only defect is `kind` (one of `BAD_LINE_KINDS`).

    Args:
        kind: the damage to do.
        number: makes the line's IDs distinct from other bad lines'.
        content_dimension: the content custom dimension index used in the line's hits.
    """
    start = START_TIME + 3600 * number

    def hit(hit_number: int, hit_time: Any) -> dict[str, Any]:
        return {
            "hitNumber": hit_number,
            "time": hit_time,
            "type": "PAGE",
            "page": {"pagePath": f"/article/bad-{number}/broken", "hostname": HOSTNAME},
            "customDimensions": [{"index": content_dimension, "value": f"bad-{number}"}],
        }

    session: dict[str, Any] = {
        "fullVisitorId": str(999_000_000_000_000_000 + number),
        "visitId": start,
        "visitNumber": 1,
        "visitStartTime": start,
        "date": time.strftime("%Y%m%d", time.gmtime(start)),
        "hits": [hit(1, 0), hit(2, 30_000), hit(3, 70_000)],
    }
    if kind == "malformed_json":
        return json.dumps(session, separators=(",", ":"))[:60]
    if kind == "not_an_object":
        return json.dumps([session], separators=(",", ":"))
    if kind == "missing_field:fullVisitorId":
        del session["fullVisitorId"]
    elif kind == "bad_type:hits":
        session["hits"] = session["hits"][0]
    elif kind == "bad_type:hit.time":
        session["hits"][1]["time"] = "abc"
    elif kind == "negative_hit_time":
        session["hits"][0]["time"] = -1500
    elif kind == "empty_hits":
        session["hits"] = []
    else:
        raise ValueError(f"unknown bad line kind {kind!r}; expected one of {BAD_LINE_KINDS}")
    return json.dumps(session, separators=(",", ":"))


def write_sessions(
    path: str,
    num_sessions: int,
    seed: int,
    num_visitors: int | None = None,
    num_items: int = DEFAULT_ITEMS,
    num_topics: int = DEFAULT_TOPICS,
    content_dimension: int = DEFAULT_CONTENT_DIMENSION,
    bad_lines: int = 0,
    date: str | None = None,
) -> dict[str, int]:
    """Writes synthetic sessions as NDJSON (gzip-compressed if `path` ends in ".gz").

    Args:
        path: the output file.
        num_sessions, seed, num_visitors, num_items, num_topics, content_dimension, date: as
            for `generate_sessions`.
        bad_lines: number of malformed lines to interleave, cycling through `BAD_LINE_KINDS`
            at positions drawn from the seed.

    Returns:
        Counts {"sessions", "hits", "page_hits", "bad_lines"}; hits count the good sessions only.
    """
    if num_sessions < 0 or bad_lines < 0:
        raise ValueError("num_sessions and bad_lines must be >= 0")
    positions_rng = np.random.default_rng([seed, 2])
    total_lines = num_sessions + bad_lines
    bad_positions = set(positions_rng.choice(total_lines, size=bad_lines, replace=False).tolist())
    sessions = generate_sessions(
        num_sessions,
        seed,
        num_visitors=num_visitors,
        num_items=num_items,
        num_topics=num_topics,
        content_dimension=content_dimension,
        date=date,
    )
    counts = {"sessions": 0, "hits": 0, "page_hits": 0, "bad_lines": 0}
    progress_every = max(10_000, total_lines // 10)
    started = time.monotonic()
    with write_atomically(path) as raw:
        out: Any = raw
        if path.endswith(".gz"):
            # mtime=0 and no file name in the header keep the bytes a function of the arguments.
            out = gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0)
        try:
            buffer: list[str] = []
            for line_number in range(total_lines):
                if line_number in bad_positions:
                    kind = BAD_LINE_KINDS[counts["bad_lines"] % len(BAD_LINE_KINDS)]
                    buffer.append(bad_line(kind, counts["bad_lines"], content_dimension))
                    counts["bad_lines"] += 1
                else:
                    session = next(sessions)
                    hits = session["hits"]
                    counts["sessions"] += 1
                    counts["hits"] += len(hits)
                    counts["page_hits"] += sum(1 for h in hits if h["type"] == "PAGE")
                    buffer.append(json.dumps(session, separators=(",", ":")))
                if len(buffer) >= 1000:
                    out.write(("\n".join(buffer) + "\n").encode("utf-8"))
                    buffer = []
                if (line_number + 1) % progress_every == 0:
                    logger.info(
                        "%d / %d lines written (%.1f s)",
                        line_number + 1,
                        total_lines,
                        time.monotonic() - started,
                    )
            if buffer:
                out.write(("\n".join(buffer) + "\n").encode("utf-8"))
        finally:
            if out is not raw:
                out.close()
    return counts


def main(argv: list[str] | None = None) -> dict[str, int]:
    """Command-line entry point; returns the counts `write_sessions` returned."""
    parser = argparse.ArgumentParser(
        description="Write synthetic GA360 BigQuery-export sessions (NDJSON, one per line)."
    )
    parser.add_argument("--output", required=True, help="output file; gzip if it ends in .gz")
    parser.add_argument(
        "--sessions", type=int, default=DEFAULT_SESSIONS, help="number of sessions (lines)"
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed")
    parser.add_argument(
        "--visitors", type=int, default=None, help="number of visitors (default: sessions // 4)"
    )
    parser.add_argument("--items", type=int, default=DEFAULT_ITEMS, help="content items")
    parser.add_argument("--topics", type=int, default=DEFAULT_TOPICS, help="content topics")
    parser.add_argument(
        "--content_dimension",
        type=int,
        default=DEFAULT_CONTENT_DIMENSION,
        help="hit custom dimension index that holds the contentId",
    )
    parser.add_argument(
        "--bad_lines", type=int, default=0, help="malformed lines to interleave (for demos)"
    )
    parser.add_argument(
        "--date",
        default=None,
        help="YYYY-MM-DD: one day's export (sessions of that day, drawn from the seed and the "
        "date; the visitors and content depend on the seed only, so several dates share them); "
        "default: 31 days from 2017-08-01",
    )
    args = parser.parse_args(argv)
    if args.date is not None:
        try:
            time.strptime(args.date, "%Y-%m-%d")
        except ValueError:
            parser.error(f"--date must be YYYY-MM-DD, got {args.date!r}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    started = time.monotonic()
    counts = write_sessions(
        args.output,
        args.sessions,
        args.seed,
        num_visitors=args.visitors,
        num_items=args.items,
        num_topics=args.topics,
        content_dimension=args.content_dimension,
        bad_lines=args.bad_lines,
        date=args.date,
    )
    print(
        f"Wrote {counts['sessions']} sessions ({counts['hits']} hits, {counts['page_hits']} "
        f"PAGE hits) and {counts['bad_lines']} bad lines to {args.output} "
        f"in {time.monotonic() - started:.1f} s"
    )
    return counts


if __name__ == "__main__":
    main()
