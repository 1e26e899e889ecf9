"""The plain single-process reference the preprocessing benchmark compares against.

json-parses every session line and aggregates time on page per (visitor, content) in a dict,
with the same semantics as the pipeline's event extraction (no vocabularies, no TFRecords).

    python -m benchmarks.reference_aggregation FILE.json.gz
"""

from __future__ import annotations

import gzip
import json
import sys


def aggregate(path: str) -> tuple[int, int, int]:
    """Returns (lines, page_hits, pairs)."""
    opener = gzip.open if path.endswith(".gz") else open
    sums: dict[tuple[str, str], float] = {}
    lines = page_hits = 0
    with opener(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            lines += 1
            try:
                session = json.loads(line)
                visitor = str(session["fullVisitorId"])
                pages = []
                for hit in session["hits"]:
                    if hit.get("type") != "PAGE":
                        continue
                    content = None
                    for dim in hit.get("customDimensions") or []:
                        if str(dim.get("index")) == "10":
                            content = dim.get("value")
                    pages.append((float(hit["time"]), float(hit.get("hitNumber") or 0), content))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
            page_hits += len(pages)
            pages.sort(key=lambda p: (p[0], p[1]))
            for (t, _, content), (t_next, _, _) in zip(pages, pages[1:]):
                if content:
                    key = (visitor, content)
                    sums[key] = sums.get(key, 0.0) + (t_next - t)
    pairs = sum(1 for total in sums.values() if total > 0)
    return lines, page_hits, pairs


if __name__ == "__main__":
    lines, page_hits, pairs = aggregate(sys.argv[1])
    print(f"lines={lines} page_hits={page_hits} pairs={pairs}")
