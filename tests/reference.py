"""A slow, obvious reference of the preprocessing semantics: the test oracle.

Written from the spec in plain Python, one line and one hit at a time. Production code never
imports this module; tests compare the pipeline's output with it.

Events (GA360 NDJSON, one session per line):
    - A line that fails a check is rejected with one reason (the first failing check, in the
      order of `reference_events`) and contributes no events.
    - Only hits with type == "PAGE" count. They are ordered by (time, hitNumber); the duration
      of PAGE hit j is time[j + 1] - time[j]; the last PAGE hit has no duration. PAGE hits
      without a contentId end the previous hit's duration but make no event.
    - Durations are summed per (fullVisitorId, contentId) over all sessions; sums <= 0 are
      dropped.

Matrix:
    - (visitor, content) goes to eval iff sha256(f"{visitor}\\x1f{content}")[:8] / 2**64 <
      eval_fraction.
    - median scaling: r = min(0.3 * value / median, 1.0); log1p scaling: r = log1p(value /
      median); raw: r = value. The median is over the train values.
    - Eval pairs whose visitor or content is not in any train pair are dropped.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import json
import math
import re
import statistics
from collections.abc import Iterable
from typing import Any

_INT_STRING = re.compile(r"[+-]?\d+")
_NUMBER_STRING = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


class Rejected(Exception):
    """A line failed a check; `args[0]` is the reason."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _as_number(x: Any) -> float | None:
    """A JSON number or a numeric string, as a finite float; None otherwise."""
    if isinstance(x, bool):
        return None
    if isinstance(x, int | float):
        value = float(x)
    elif isinstance(x, str) and _NUMBER_STRING.fullmatch(x.strip()):
        value = float(x)
    else:
        return None
    if not math.isfinite(value):
        return None
    return value


def _hit_number(hit: dict) -> int:
    """hitNumber as an int: missing (or unusable) counts as 0."""
    x = hit.get("hitNumber")
    if _is_int(x):
        return x
    if isinstance(x, str) and _INT_STRING.fullmatch(x.strip()):
        return int(x)
    return 0


def _content_id(hit: dict, content_id_source: str) -> str | None:
    """The hit's contentId, or None if it has none."""
    if content_id_source == "pagePath":
        page = hit.get("page")
        if not isinstance(page, dict):
            return None
        path = page.get("pagePath")
        if path is None or path == "":
            return None
        return str(path)

    prefix = "customDimension:"
    if not content_id_source.startswith(prefix):
        raise ValueError(f"unknown content_id_source {content_id_source!r}")
    wanted = int(content_id_source[len(prefix) :])
    dimensions = hit.get("customDimensions")
    if not isinstance(dimensions, list):
        return None
    for entry in dimensions:
        if not isinstance(entry, dict):
            continue
        index = entry.get("index")
        if _is_int(index):
            matches = index == wanted
        elif isinstance(index, str) and _INT_STRING.fullmatch(index.strip()):
            matches = int(index) == wanted
        else:
            matches = False
        if matches:
            value = entry.get("value")
            if value is None or value == "":
                return None
            return str(value)
    return None


def _session_events(
    line: str, content_id_source: str, max_time_gap_ms: float, max_id_length: int
) -> list[tuple[str, str, float]]:
    """The (visitorId, contentId, duration ms) events of one line; raises Rejected."""
    try:
        session = json.loads(line)
    except ValueError:
        raise Rejected("malformed_json") from None
    if not isinstance(session, dict):
        raise Rejected("not_an_object")

    for field in ("fullVisitorId", "visitId", "hits"):
        if session.get(field) is None:
            raise Rejected(f"missing_field:{field}")

    visitor = session["fullVisitorId"]
    if _is_int(visitor):
        visitor = str(visitor)
    elif not isinstance(visitor, str):
        raise Rejected("bad_type:fullVisitorId")

    visit_id = session["visitId"]
    if not (_is_int(visit_id) or (isinstance(visit_id, str) and _INT_STRING.fullmatch(visit_id))):
        raise Rejected("bad_type:visitId")

    hits = session["hits"]
    if not isinstance(hits, list):
        raise Rejected("bad_type:hits")
    if len(hits) == 0:
        raise Rejected("empty_hits")

    # (time, hitNumber, contentId or None) for each PAGE hit.
    page_hits = []
    for hit in hits:
        if not isinstance(hit, dict):
            raise Rejected("bad_type:hit")
        if hit.get("type") != "PAGE":
            continue
        hit_time = _as_number(hit.get("time"))
        if hit_time is None:
            raise Rejected("bad_type:hit.time")
        if hit_time < 0:
            raise Rejected("negative_hit_time")
        page_hits.append((hit_time, _hit_number(hit), _content_id(hit, content_id_source)))

    if len(visitor) > max_id_length:
        raise Rejected("id_too_long")
    for _, _, content in page_hits:
        if content is not None and len(content) > max_id_length:
            raise Rejected("id_too_long")

    page_hits.sort(key=lambda h: (h[0], h[1]))

    for j in range(len(page_hits) - 1):
        if page_hits[j + 1][0] - page_hits[j][0] > max_time_gap_ms:
            raise Rejected("time_gap_too_large")

    events = []
    for j in range(len(page_hits) - 1):
        hit_time, _, content = page_hits[j]
        if content is None:
            continue
        next_time = page_hits[j + 1][0]
        events.append((visitor, content, next_time - hit_time))
    return events


def reference_events(
    lines: Iterable[str],
    content_id_source: str = "customDimension:10",
    max_time_gap_ms: float = 14_400_000,
    max_id_length: int = 256,
) -> tuple[dict[tuple[str, str], float], collections.Counter]:
    """Aggregates GA360 NDJSON lines into summed time on page per (visitor, content).

    Args:
        lines: NDJSON lines (trailing newlines allowed). Every line counts, blank ones too.
        content_id_source: "customDimension:N" (hit customDimensions entry with index N) or
            "pagePath" (hit page.pagePath).
        max_time_gap_ms: a line with a larger gap between consecutive PAGE hits is rejected.
        max_id_length: a line with a longer fullVisitorId or contentId is rejected.

    Returns:
        ({(visitorId, contentId): summed duration ms, only sums > 0}, Counter of reject reasons).
    """
    sums: dict[tuple[str, str], float] = {}
    rejected: collections.Counter = collections.Counter()
    for line in lines:
        try:
            events = _session_events(
                line.rstrip("\r\n"), content_id_source, max_time_gap_ms, max_id_length
            )
        except Rejected as e:
            rejected[e.args[0]] += 1
            continue
        for visitor, content, duration in events:
            sums[(visitor, content)] = sums.get((visitor, content), 0.0) + duration
    return {pair: total for pair, total in sums.items() if total > 0}, rejected


def reference_csv_events(
    lines: Iterable[str], max_id_length: int = 256
) -> tuple[dict[tuple[str, str], float], collections.Counter]:
    """Aggregates flat CSV lines `visitorId,contentId,session_duration`.

    A first line starting with "visitorId" is a header and skipped. Rejected lines (each counted
    once): `malformed_csv` (not exactly 3 fields), `missing_field:visitorId` /
    `missing_field:contentId` (empty), `bad_type:session_duration` (not a finite number),
    `id_too_long`.

    Returns:
        ({(visitorId, contentId): summed session_duration, only sums > 0}, Counter of rejects).
    """
    sums: dict[tuple[str, str], float] = {}
    rejected: collections.Counter = collections.Counter()
    for number, line in enumerate(lines):
        line = line.rstrip("\r\n")
        if number == 0 and line.startswith("visitorId"):
            continue
        fields = next(csv.reader([line]), [])
        if len(fields) != 3:
            rejected["malformed_csv"] += 1
            continue
        visitor, content, duration_text = fields
        duration = _as_number(duration_text)
        if visitor == "":
            rejected["missing_field:visitorId"] += 1
        elif content == "":
            rejected["missing_field:contentId"] += 1
        elif duration is None:
            rejected["bad_type:session_duration"] += 1
        elif len(visitor) > max_id_length or len(content) > max_id_length:
            rejected["id_too_long"] += 1
        else:
            sums[(visitor, content)] = sums.get((visitor, content), 0.0) + duration
    return {pair: total for pair, total in sums.items() if total > 0}, rejected


def split_is_eval(visitor_id: str, content_id: str, eval_fraction: float) -> bool:
    """True iff the pair goes to eval: its 64-bit hash / 2**64 < eval_fraction."""
    digest = hashlib.sha256(f"{visitor_id}\x1f{content_id}".encode()).digest()
    h = int.from_bytes(digest[:8], "big")
    return h / 2**64 < eval_fraction


def _rating(value: float, median: float, scaling: str) -> float:
    if scaling == "median":
        return min(0.3 * value / median, 1.0)
    if scaling == "log1p":
        return math.log1p(value / median)
    if scaling == "raw":
        return value
    raise ValueError(f"reference_matrix has no scaling {scaling!r}")


def reference_matrix(
    events: dict[tuple[str, str], float],
    eval_fraction: float,
    median: float | None = None,
    scaling: str = "median",
) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], float], float]:
    """Splits events into train and eval and scales them into ratings.

    Args:
        events: {(visitorId, contentId): value}.
        eval_fraction: the fraction of pairs (by hash) that go to eval.
        median: the median to scale by (the pipeline's approximate quantile); None to use
            the exact median of the train values.
        scaling: "median", "log1p" or "raw".

    Returns:
        (train {(visitor, content): rating}, eval {(visitor, content): rating}, exact median of
        the train values).
    """
    train_values = {}
    eval_values = {}
    for (visitor, content), value in events.items():
        if split_is_eval(visitor, content, eval_fraction):
            eval_values[(visitor, content)] = value
        else:
            train_values[(visitor, content)] = value
    if not train_values:
        raise ValueError("no train pairs: the median is undefined")

    exact_median = statistics.median(train_values.values())
    scale = exact_median if median is None else median

    train_visitors = {visitor for visitor, _ in train_values}
    train_contents = {content for _, content in train_values}

    train = {pair: _rating(value, scale, scaling) for pair, value in train_values.items()}
    evaluation = {}
    for (visitor, content), value in eval_values.items():
        if visitor in train_visitors and content in train_contents:
            evaluation[(visitor, content)] = _rating(value, scale, scaling)
    return train, evaluation, exact_median


def _unit_hash(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def reference_holdout(
    events: dict[tuple[str, str], float],
    eval_fraction: float,
    holdout_visitors: float,
    foldin_fraction: float,
    median: float | None = None,
    scaling: str = "median",
) -> dict[str, Any]:
    """Held-out visitors ("strong generalization"), then the per-pair split of the others.

    - A visitor is held out iff sha256("holdout-visitor\\x1f" + visitor)[:8] / 2**64 <
      holdout_visitors; its pairs never reach train or eval.
    - The other visitors' pairs are split and scaled as `reference_matrix` does.
    - A held-out pair whose content is in no train pair is dropped (counted); the others go to
      fold-in iff sha256(f"holdout-foldin\\x1f{visitor}\\x1f{content}")[:8] / 2**64 <
      foldin_fraction, else to target, with ratings scaled by the train median.

    Returns:
        {"train", "eval", "foldin", "target": {(visitor, content): rating}, "foldin_raw",
         "target_raw": {(visitor, content): value}, "heldout_dropped": int, "median": float
         (exact train median), "heldout_visitors": set of held-out visitors with a kept cell}.
    """
    kept, heldout = {}, {}
    for (visitor, content), value in events.items():
        if _unit_hash(f"holdout-visitor\x1f{visitor}") < holdout_visitors:
            heldout[(visitor, content)] = value
        else:
            kept[(visitor, content)] = value
    train, evaluation, exact_median = reference_matrix(kept, eval_fraction, median, scaling)
    scale = exact_median if median is None else median
    train_contents = {content for _, content in train}
    out: dict[str, Any] = {"train": train, "eval": evaluation, "median": exact_median}
    for part in ("foldin", "target"):
        out[part], out[f"{part}_raw"] = {}, {}
    dropped = 0
    for (visitor, content), value in heldout.items():
        if content not in train_contents:
            dropped += 1
            continue
        in_foldin = _unit_hash(f"holdout-foldin\x1f{visitor}\x1f{content}") < foldin_fraction
        part = "foldin" if in_foldin else "target"
        out[part][(visitor, content)] = _rating(value, scale, scaling)
        out[f"{part}_raw"][(visitor, content)] = value
    out["heldout_dropped"] = dropped
    out["heldout_visitors"] = {v for v, _ in out["foldin"]} | {v for v, _ in out["target"]}
    return out
