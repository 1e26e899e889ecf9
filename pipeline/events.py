"""Beam composites from input lines to the (visitor, content, value) pairs of the rating matrix.

lines | ParseEvents(format) -> event batches, rejected
event batches | SumPerPair(format) -> pair batches
pair batches | SplitTrainEval(f) -> train pair batches, eval pair batches

The collections between these steps hold batches (lists) of events or pairs rather than single
ones: Beam's cost per element, not the parsing or the sums, dominated the pipeline's time when
each of the 0.8M events of 1M PAGE hits was an element of its own.
"""

from __future__ import annotations

import hashlib
import json
import zlib

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline import records

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


LINES_PER_BATCH = 1024  # Input lines parsed per element of ParseEvents.
PAIRS_PER_BATCH = 8192  # Pairs per element of SumPerPair's output.
SUM_BUCKETS = 16  # Keys of SumPerPair's shuffle: crc32(visitorId) mod SUM_BUCKETS.


class _ParseFn(beam.DoFn):
    """A batch of lines -> one list of their events; rejected lines go to REJECTED_TAG."""

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

    def process(self, lines):
        batch: list = []
        parsed = headers = hits = page_hits = 0
        config = self._config
        for line in lines:
            try:
                if self._format == FORMAT_GA360:
                    if isinstance(line, dict):  # A row from ReadFromBigQuery.
                        events, line_hits, line_pages = records.events_from_session(line, config)
                    else:
                        events, line_hits, line_pages = records.session_events(line, config)
                    hits += line_hits
                    page_hits += line_pages
                elif self._format == FORMAT_CSV:
                    events = records.csv_event(line, config.max_id_length)
                else:
                    events = records.movielens_event(line, config.max_id_length)
            except records.Rejected as rejection:
                yield self._reject(line, rejection.reason)
                continue
            if self._format != FORMAT_GA360 and not events:
                headers += 1
                continue
            parsed += 1
            batch.extend(events)
        # Counters are only touched when they count something, as one per line would be.
        for counter, count in (
            (self._lines, len(lines)),
            (self._parsed, parsed),
            (self._headers, headers),
            (self._hits, hits),
            (self._page_hits, page_hits),
            (self._events, len(batch)),
        ):
            if count:
                counter.inc(count)
        if batch:
            yield batch


class ParseEvents(beam.PTransform):
    """Input lines -> batches of events and rejected lines.

    Input: PCollection[bytes] (lines) or PCollection[dict] (GA360 rows from BigQuery).
    Output: a DoOutputsTuple with
        events: PCollection[list[tuple[str, str, float]]], batches of (visitorId, contentId,
            value), or of (.., (timestamp, rating)) for MovieLens;
        rejected: PCollection[str], JSON lines {"reason", "line"}.
    Counters (namespace 'preprocess'): lines_read, records_parsed, header_lines, lines_rejected,
    rejected:<reason>, hits, page_hits, events. lines_read = records_parsed + header_lines +
    lines_rejected.

    Args:
        batched: the input is already batches of lines, PCollection[list[bytes]].
        redistribute: spread the batches of lines over the workers before parsing them. A gzip
            file is read whole by one worker, which would then parse every line of it too.
    """

    def __init__(
        self,
        input_format: str,
        session_config: records.SessionConfig,
        batched: bool = False,
        redistribute: bool = False,
    ):
        super().__init__()
        if input_format not in INPUT_FORMATS:
            raise ValueError(f"unknown input format {input_format!r}; expected {INPUT_FORMATS}")
        self._format = input_format
        self._config = session_config
        self._batched = batched
        self._redistribute = redistribute

    def expand(self, lines):
        batches = lines
        if not self._batched:
            batches = lines | "BatchLines" >> beam.BatchElements(
                min_batch_size=LINES_PER_BATCH, max_batch_size=LINES_PER_BATCH
            )
        if self._redistribute:
            batches = batches | "Redistribute" >> beam.Reshuffle()
        return batches | "Parse" >> beam.ParDo(_ParseFn(self._format, self._config)).with_outputs(
            REJECTED_TAG, main=EVENTS_TAG
        )


def _bucket(visitor_id: str) -> int:
    """The SumPerPair shuffle key of a visitor: crc32 of its UTF-8 bytes mod SUM_BUCKETS (stable
    across processes, unlike hash())."""
    return zlib.crc32(visitor_id.encode("utf-8", "surrogatepass")) % SUM_BUCKETS


def _by_bucket(events: list):
    """An event batch -> (bucket, events of that bucket) for each bucket present."""
    parts: dict[int, list] = {}
    for event in events:
        bucket = _bucket(event[0])
        part = parts.get(bucket)
        if part is None:
            parts[bucket] = [event]
        else:
            part.append(event)
    yield from parts.items()


class _PairTotalsFn(beam.CombineFn):
    """Event batches -> {(visitorId, contentId): value}: the sum of the values, or for MovieLens
    the latest rating (max of (timestamp, rating): ties go to the highest rating)."""

    def __init__(self, latest: bool):
        self._latest = latest

    def create_accumulator(self) -> dict:
        return {}

    def add_input(self, totals: dict, events: list) -> dict:
        get = totals.get
        if self._latest:
            for visitor, content, stamped in events:
                key = (visitor, content)
                previous = get(key)
                if previous is None or stamped > previous:
                    totals[key] = stamped
        else:
            for visitor, content, value in events:
                key = (visitor, content)
                totals[key] = get(key, 0.0) + value
        return totals

    def merge_accumulators(self, accumulators) -> dict:
        accumulators = sorted(accumulators, key=len, reverse=True)
        merged = accumulators[0]
        for other in accumulators[1:]:
            self.add_input(merged, [(v, c, x) for (v, c), x in other.items()])
        return merged

    def extract_output(self, totals: dict) -> dict:
        return totals


_nonpositive = Metrics.counter(METRICS_NAMESPACE, "pairs_dropped_nonpositive")


def _pair_batches(bucket_totals, latest: bool):
    """(bucket, {(visitor, content): total}) -> batches of at most PAIRS_PER_BATCH
    (visitor, content, float) pairs; non-positive sums dropped and counted."""
    _, totals = bucket_totals
    batch: list = []
    dropped = 0
    for (visitor, content), total in totals.items():
        if latest:
            batch.append((visitor, content, float(total[1])))
        elif total > 0:
            batch.append((visitor, content, float(total)))
        else:
            dropped += 1
            continue
        if len(batch) == PAIRS_PER_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch
    if dropped:
        _nonpositive.inc(dropped)


class SumPerPair(beam.PTransform):
    """Event batches -> batches of pairs, one value per (visitor, content) pair.

    Input: PCollection[list[tuple[str, str, V]]] from `ParseEvents`.
    Output: PCollection[list[tuple[str, str, float]]], each pair in exactly one batch: time on
    page summed over all visits, pairs with sums <= 0 dropped (counter
    pairs_dropped_nonpositive); for MovieLens the latest rating.

    The sums are a CombinePerKey over SUM_BUCKETS visitor buckets, so the runner adds up each
    bundle's events before the shuffle (combiner lifting) and the shuffle moves a few dicts
    instead of one element per event.
    """

    def __init__(self, input_format: str):
        super().__init__()
        self._format = input_format

    def expand(self, events):
        latest = self._format == FORMAT_MOVIELENS
        return (
            events
            | "KeyByBucket" >> beam.FlatMap(_by_bucket)
            | "SumPerBucket" >> beam.CombinePerKey(_PairTotalsFn(latest))
            | "ToPairBatches" >> beam.FlatMap(_pair_batches, latest)
        )


def is_eval(visitor_id: str, content_id: str, eval_fraction: float) -> bool:
    """Deterministic split of a pair: sha256(visitor \\x1f content)[:8] / 2^64 < eval_fraction."""
    digest = hashlib.sha256(f"{visitor_id}\x1f{content_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < eval_fraction


def _split_batch(pairs: list, fraction: float):
    train, evaluation = [], []
    for pair in pairs:
        (evaluation if is_eval(pair[0], pair[1], fraction) else train).append(pair)
    if train:
        yield train
    if evaluation:
        yield beam.pvalue.TaggedOutput(EVAL_TAG, evaluation)


EVAL_TAG = "eval"


class SplitTrainEval(beam.PTransform):
    """Pair batches -> (train, eval) by a hash of (visitorId, contentId), independent of the
    runner.

    Input: PCollection[list[tuple[str, str, float]]]. Output: a pair of PCollections of the same
    type, each input pair in exactly one of them.
    """

    def __init__(self, eval_fraction: float):
        super().__init__()
        self._eval_fraction = eval_fraction

    def expand(self, pairs):
        split = pairs | "Split" >> beam.FlatMap(_split_batch, self._eval_fraction).with_outputs(
            EVAL_TAG, main="train"
        )
        return split["train"], split[EVAL_TAG]
