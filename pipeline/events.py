"""Beam composites from input lines to the (visitor, content, value) pairs of the rating matrix.

lines | ParseEvents(format) -> events, rejected
events | SumPerPair(format) -> pairs
pairs | SplitTrainEval(f) -> train, eval
"""

from __future__ import annotations

import hashlib
import json

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline import records
from transforms import features

METRICS_NAMESPACE = "preprocess"
EVENTS_TAG = "events"
REJECTED_TAG = "rejected"

FORMAT_GA360 = "ga360"
FORMAT_CSV = "csv"
FORMAT_MOVIELENS = "movielens"
INPUT_FORMATS = (FORMAT_GA360, FORMAT_CSV, FORMAT_MOVIELENS)


def rejected_record(line, reason: str) -> str:
    """One line of the rejected output: JSON {"reason": str, "line": str}.

    Undecodable bytes are kept as backslash escapes so that nothing of the input is lost.
    """
    if isinstance(line, bytes):
        line = line.decode("utf-8", "backslashreplace")
    elif not isinstance(line, str):
        line = json.dumps(line, default=str)
    return json.dumps({"reason": reason, "line": line}, ensure_ascii=False)


class _ParseFn(beam.DoFn):
    """Parses lines into events; rejected lines go to the REJECTED_TAG output."""

    def __init__(self, input_format: str, session_config: records.SessionConfig):
        self._format = input_format
        self._config = session_config
        self._lines = Metrics.counter(METRICS_NAMESPACE, "lines_read")
        self._parsed = Metrics.counter(METRICS_NAMESPACE, "records_parsed")
        self._hits = Metrics.counter(METRICS_NAMESPACE, "hits")
        self._page_hits = Metrics.counter(METRICS_NAMESPACE, "page_hits")
        self._events = Metrics.counter(METRICS_NAMESPACE, "events")
        self._headers = Metrics.counter(METRICS_NAMESPACE, "header_lines")
        self._rejected = Metrics.counter(METRICS_NAMESPACE, "lines_rejected")
        self._reasons: dict[str, object] = {}

    def _reject(self, line, reason: str):
        self._rejected.inc()
        if reason not in self._reasons:
            self._reasons[reason] = Metrics.counter(METRICS_NAMESPACE, f"rejected:{reason}")
        self._reasons[reason].inc()
        return beam.pvalue.TaggedOutput(REJECTED_TAG, rejected_record(line, reason))

    def process(self, line):
        self._lines.inc()
        try:
            if self._format == FORMAT_GA360:
                if isinstance(line, dict):  # A row from ReadFromBigQuery.
                    events, hits, page_hits = records.events_from_session(line, self._config)
                else:
                    events, hits, page_hits = records.session_events(line, self._config)
                self._hits.inc(hits)
                self._page_hits.inc(page_hits)
            elif self._format == FORMAT_CSV:
                events = records.csv_event(line, self._config.max_id_length)
            else:
                events = records.movielens_event(line, self._config.max_id_length)
        except records.Rejected as rejection:
            yield self._reject(line, rejection.reason)
            return
        if self._format != FORMAT_GA360 and not events:
            self._headers.inc()
            return
        self._parsed.inc()
        self._events.inc(len(events))
        yield from events


class ParseEvents(beam.PTransform):
    """Input lines -> events and rejected lines.

    Input: PCollection[bytes] (lines) or PCollection[dict] (GA360 rows from BigQuery).
    Output: a DoOutputsTuple with
        events: PCollection[tuple[str, str, float]] (visitorId, contentId, value), or
            PCollection[tuple[str, str, tuple[float, float]]] (.., (timestamp, rating)) for
            MovieLens;
        rejected: PCollection[str], JSON lines {"reason", "line"}.
    Counters (namespace 'preprocess'): lines_read, records_parsed, header_lines, lines_rejected,
    rejected:<reason>, hits, page_hits, events. lines_read = records_parsed + header_lines +
    lines_rejected.
    """

    def __init__(self, input_format: str, session_config: records.SessionConfig):
        super().__init__()
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"unknown input format {input_format!r}; expected {INPUT_FORMATS}")
        self._format = input_format
        self._config = session_config

    def expand(self, lines):
        return lines | "Parse" >> beam.ParDo(_ParseFn(self._format, self._config)).with_outputs(
            REJECTED_TAG, main=EVENTS_TAG
        )


class SumPerPair(beam.PTransform):
    """Events -> one value per (visitor, content) pair.

    Input: PCollection[tuple[str, str, V]] from `ParseEvents`.
    Output: PCollection[tuple[str, str, float]]: time on page summed over all visits, pairs with
    sums <= 0 dropped (counter pairs_dropped_nonpositive); for MovieLens the latest rating.
    """

    def __init__(self, input_format: str):
        super().__init__()
        self._format = input_format

    def expand(self, events):
        keyed = events | "KeyByPair" >> beam.Map(lambda event: ((event[0], event[1]), event[2]))
        if self._format == FORMAT_MOVIELENS:
            # max of (timestamp, rating): the latest rating; ties go to the highest.
            latest = keyed | "LatestRating" >> beam.CombinePerKey(max)
            return latest | "Flatten" >> beam.Map(lambda kv: (kv[0][0], kv[0][1], kv[1][1]))
        summed = keyed | "SumDurations" >> beam.CombinePerKey(sum)
        return summed | "DropNonPositive" >> beam.FlatMap(_positive_pair)


_nonpositive = Metrics.counter(METRICS_NAMESPACE, "pairs_dropped_nonpositive")


def _positive_pair(kv):
    (visitor, content), total = kv
    if total > 0:
        yield visitor, content, float(total)
    else:
        _nonpositive.inc()


def is_eval(visitor_id: str, content_id: str, eval_fraction: float) -> bool:
    """Deterministic split of a pair: sha256(visitor \\x1f content)[:8] / 2^64 < eval_fraction."""
    digest = hashlib.sha256(f"{visitor_id}\x1f{content_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < eval_fraction


class SplitTrainEval(beam.PTransform):
    """Pairs -> (train, eval) by a hash of (visitorId, contentId), independent of the runner.

    Input: PCollection[tuple[str, str, float]]. Output: a pair of PCollections of the same type.
    """

    def __init__(self, eval_fraction: float):
        super().__init__()
        self._eval_fraction = eval_fraction

    def expand(self, pairs):
        fraction = self._eval_fraction
        return pairs | "Partition" >> beam.Partition(
            lambda pair, _: int(is_eval(pair[0], pair[1], fraction)), 2
        )


def to_raw_row(pair) -> dict:
    """(visitorId, contentId, value) -> the raw TF Transform row (see transforms.features)."""
    visitor, content, value = pair
    return {features.VISITOR_ID: visitor, features.CONTENT_ID: content, features.VALUE: value}
