"""Parsing of input lines into interaction events: pure functions, no Beam.

Every parser takes one input line (bytes or str) and returns a list of events, or raises
`Rejected` with a short machine-readable reason. Events are `(visitorId, contentId, value)`:
    GA360 sessions: value = time on page in ms, summed within the session per contentId.
    CSV `visitorId,contentId,session_duration`: value = session_duration.
    MovieLens `user item rating [timestamp]`: value = (timestamp, rating), so that the pipeline
        keeps the latest rating of a repeated (user, item) pair.

GA360 semantics (those of the reference BigQuery SQL):
    * Only hits with type == "PAGE" take part.
    * A PAGE hit's contentId is the `value` of its `customDimensions` entry with the configured
      index, or its `page.pagePath`; hits without one still end the previous hit's duration.
    * PAGE hits are ordered by (time, hitNumber); the duration of hit j is time[j+1] - time[j];
      the last PAGE hit of the visit has no duration and yields no event.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass

import orjson

CONTENT_FROM_PAGE_PATH = "pagePath"
CONTENT_FROM_DIMENSION = "customDimension"
DEFAULT_CONTENT_ID_SOURCE = "customDimension:10"
# GA ends a session after at most 4 hours of inactivity, so a longer gap is corrupt data.
DEFAULT_MAX_TIME_GAP_MS = 4 * 3600 * 1000.0
DEFAULT_MAX_ID_LENGTH = 256


class Rejected(ValueError):
    """An input line that cannot be used; `reason` is a short stable key (used in counters)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def parse_content_id_source(source: str) -> tuple[str, int | None]:
    """Parses `--content_id_source`: 'pagePath' or 'customDimension:N' (N >= 1)."""
    if source == CONTENT_FROM_PAGE_PATH:
        return CONTENT_FROM_PAGE_PATH, None
    kind, _, index = source.partition(":")
    if kind == CONTENT_FROM_DIMENSION and index.isdigit() and int(index) >= 1:
        return CONTENT_FROM_DIMENSION, int(index)
    raise ValueError(
        f"--content_id_source {source!r} is not 'pagePath' or 'customDimension:N' (N >= 1)"
    )


@dataclass(frozen=True)
class SessionConfig:
    """How GA360 sessions become events.

    Attributes:
        content_id_source: 'customDimension:N' or 'pagePath'.
        max_time_gap_ms: a gap between consecutive PAGE hits above this rejects the session.
        max_id_length: visitor or content IDs longer than this (in characters) reject the line.
    """

    content_id_source: str = DEFAULT_CONTENT_ID_SOURCE
    max_time_gap_ms: float = DEFAULT_MAX_TIME_GAP_MS
    max_id_length: int = DEFAULT_MAX_ID_LENGTH

    def __post_init__(self):
        parse_content_id_source(self.content_id_source)
        if not self.max_time_gap_ms > 0:
            raise ValueError(f"max_time_gap_ms must be > 0, got {self.max_time_gap_ms}")
        if self.max_id_length < 1:
            raise ValueError(f"max_id_length must be >= 1, got {self.max_id_length}")


def decode(line: bytes | str) -> str:
    """Decodes a raw line as UTF-8, rejecting other encodings."""
    if isinstance(line, str):
        return line
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        raise Rejected("bad_encoding") from None


def _number(value, field: str) -> float:
    """A finite number from a JSON number or a numeric string (BigQuery exports INT64 as str)."""
    if type(value) is int or type(value) is float:
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise Rejected(f"bad_type:{field}") from None
    else:
        raise Rejected(f"bad_type:{field}")
    if not math.isfinite(number):
        raise Rejected(f"bad_type:{field}")
    return number


def _check_id(value: str, max_length: int) -> str:
    if len(value) > max_length:
        raise Rejected("id_too_long")
    if "\n" in value or "\r" in value:
        # Vocabulary files are line-based: such an ID could never be mapped back.
        raise Rejected("bad_id:line_break")
    return value


def _visitor_id(session: dict, max_length: int) -> str:
    if "fullVisitorId" not in session or session["fullVisitorId"] is None:
        raise Rejected("missing_field:fullVisitorId")
    visitor = session["fullVisitorId"]
    if type(visitor) is int:
        visitor = str(visitor)
    elif not isinstance(visitor, str):
        raise Rejected("bad_type:fullVisitorId")
    if not visitor:
        raise Rejected("missing_field:fullVisitorId")
    return _check_id(visitor, max_length)


def _check_visit_id(session: dict) -> None:
    if "visitId" not in session or session["visitId"] is None:
        raise Rejected("missing_field:visitId")
    visit = session["visitId"]
    if type(visit) is int:
        return
    if isinstance(visit, str) and visit.strip().lstrip("-").isdigit():
        return
    raise Rejected("bad_type:visitId")


def _content_id(hit: dict, kind: str, index: int | None) -> str | None:
    if kind == CONTENT_FROM_PAGE_PATH:
        page = hit.get("page")
        value = page.get("pagePath") if isinstance(page, dict) else None
    else:
        value = None
        dimensions = hit.get("customDimensions")
        if isinstance(dimensions, list):
            for dimension in dimensions:
                if isinstance(dimension, dict):
                    dim_index = dimension.get("index")
                    if dim_index == index or (
                        isinstance(dim_index, str) and dim_index == str(index)
                    ):
                        value = dimension.get("value")
                        break
    if value is None or value == "":
        return None
    if type(value) is int:
        value = str(value)
    if not isinstance(value, str):
        raise Rejected("bad_type:contentId")
    return value


def session_events(line: bytes | str, config: SessionConfig) -> tuple[list, int, int]:
    """Events of one GA360 session line.

    Args:
        line: one NDJSON line of the GA360 BigQuery export (a session with nested hits).
        config: how to find the contentId and which sessions are corrupt.

    Returns:
        (events, hits, page_hits): events is list[tuple[str, str, float]] of
        (visitorId, contentId, duration_ms), one per contentId of the session with the
        durations summed (zero sums omitted); hits and page_hits count the session's hits.

    Raises:
        Rejected: the line is not a usable session; nothing of it is used.
    """
    try:
        session = orjson.loads(line)
    except orjson.JSONDecodeError:
        if isinstance(line, bytes):
            decode(line)  # Tell a wrong encoding apart from broken JSON.
        raise Rejected("malformed_json") from None
    return events_from_session(session, config)


def events_from_session(session, config: SessionConfig) -> tuple[list, int, int]:
    """`session_events` for an already-decoded session dict (e.g. a BigQuery row)."""
    if not isinstance(session, dict):
        raise Rejected("not_an_object")
    visitor = _visitor_id(session, config.max_id_length)
    _check_visit_id(session)
    if "hits" not in session or session["hits"] is None:
        raise Rejected("missing_field:hits")
    hits = session["hits"]
    if not isinstance(hits, list):
        raise Rejected("bad_type:hits")
    if not hits:
        raise Rejected("empty_hits")
    kind, index = parse_content_id_source(config.content_id_source)

    pages = []  # (time_ms, hitNumber, contentId or None)
    for hit in hits:
        if not isinstance(hit, dict):
            raise Rejected("bad_type:hit")
        if hit.get("type") != "PAGE":
            continue
        if "time" not in hit:
            raise Rejected("bad_type:hit.time")
        time_ms = _number(hit["time"], "hit.time")
        if time_ms < 0:
            raise Rejected("negative_hit_time")
        number = hit.get("hitNumber")
        hit_number = 0.0 if number is None else _number(number, "hit.hitNumber")
        content = _content_id(hit, kind, index)
        if content is not None:
            _check_id(content, config.max_id_length)
        pages.append((time_ms, hit_number, content))

    pages.sort(key=lambda page: (page[0], page[1]))
    durations: dict[str, float] = {}
    for (time_ms, _, content), (next_time, _, _) in zip(pages, pages[1:]):
        gap = next_time - time_ms
        if gap > config.max_time_gap_ms:
            raise Rejected("time_gap_too_large")
        if content is not None:
            durations[content] = durations.get(content, 0.0) + gap
    events = [(visitor, content, total) for content, total in durations.items() if total > 0]
    return events, len(hits), len(pages)


def _ids(visitor: str, content: str, max_length: int) -> tuple[str, str]:
    visitor, content = visitor.strip(), content.strip()
    if not visitor or not content:
        raise Rejected("missing_field:id")
    return _check_id(visitor, max_length), _check_id(content, max_length)


def csv_event(line: bytes | str, max_id_length: int = DEFAULT_MAX_ID_LENGTH) -> list:
    """The event of one CSV line `visitorId,contentId,session_duration`.

    Returns:
        [] for the header line (its first field is 'visitorId'), else
        [(visitorId, contentId, session_duration)].
    """
    text = decode(line)
    try:
        fields = next(csv.reader([text]))
    except (csv.Error, StopIteration):
        raise Rejected("malformed_csv") from None
    if fields and fields[0].strip() == "visitorId":
        return []
    if len(fields) != 3:
        raise Rejected("wrong_field_count")
    visitor, content = _ids(fields[0], fields[1], max_id_length)
    return [(visitor, content, _number(fields[2].strip(), "session_duration"))]


def _split_movielens(text: str) -> list[str]:
    for separator in ("::", "\t", ","):
        if separator in text:
            return text.split(separator)
    # Runs of spaces only: str.split() would also split IDs at \x1c, U+2028 and the like.
    return [field for field in text.split(" ") if field]


def movielens_event(line: bytes | str, max_id_length: int = DEFAULT_MAX_ID_LENGTH) -> list:
    """The rating of one MovieLens line `user item rating [timestamp]`.

    Separators: '::' (ml-1m), tab (ml-100k), comma (ml-latest, whose header line is skipped)
    or spaces.

    Returns:
        [] for a header line, else [(user, item, (timestamp, rating))]; timestamp 0 if absent.
    """
    text = decode(line).strip()
    fields = [field.strip() for field in _split_movielens(text)]
    if fields and fields[0] == "userId":
        return []
    if len(fields) not in (3, 4):
        raise Rejected("wrong_field_count")
    user, item = _ids(fields[0], fields[1], max_id_length)
    rating = _number(fields[2], "rating")
    timestamp = _number(fields[3], "timestamp") if len(fields) == 4 else 0.0
    return [(user, item, (timestamp, rating))]
