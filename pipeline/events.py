"""Beam composites from input lines to the (visitor, content, value) pairs of the rating matrix.

lines | ParseEvents(format) -> event batches, rejected
event batches | SumPerPair(format, buckets) -> pair batches
pair batches | SplitTrainEval(f) -> train pair batches, eval pair batches

The collections between these steps hold batches (lists) of events or pairs rather than single
ones: Beam's cost per element, not the parsing or the sums, dominated the pipeline's time when
each of the 0.8M events of 1M PAGE hits was an element of its own. SumPerPair's shuffle has
`buckets` keys, and the pairs of one bucket are held in one worker's memory:
`pipeline.options.shuffle_keys` scales the count with the input.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import zlib

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindows

from common import counts
from pipeline import records

METRICS_NAMESPACE = "preprocess"
EVENTS_TAG = "events"
REJECTED_TAG = "rejected"
PAIRS_TAG = "pairs"
COUNTS_TAG = counts.COUNTS_TAG

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
SUM_BUCKETS = 16  # Default keys of SumPerPair's shuffle: crc32(visitorId) mod buckets.
MAX_BUFFERED_PAIRS = 1 << 20  # Pairs summed in one bundle before they go to the shuffle.


class _ParseFn(beam.DoFn):
    """A batch of lines -> one list of their events; rejected lines go to REJECTED_TAG, the
    bundle's counts to COUNTS_TAG (`common.counts.BundleCounts`)."""

    def __init__(self, input_format: str, session_config: records.SessionConfig):
        self._format = input_format
        self._config = session_config
        self._counts = counts.BundleCounts(METRICS_NAMESPACE)

    def start_bundle(self):
        self._counts.reset()

    def finish_bundle(self):
        yield from self._counts.outputs()

    def _reject(self, line, reason: str):
        self._counts.inc("lines_rejected")
        self._counts.inc(f"rejected:{reason}")
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
        add = self._counts.inc
        add("lines_read", len(lines))
        add("records_parsed", parsed)
        add("header_lines", headers)
        add("hits", hits)
        add("page_hits", page_hits)
        add("events", len(batch))
        if batch:
            yield batch


class ParseEvents(beam.PTransform):
    """Input lines -> batches of events and rejected lines.

    Input: PCollection[bytes] (lines) or PCollection[dict] (GA360 rows from BigQuery).
    Output: a DoOutputsTuple with
        events: PCollection[list[tuple[str, str, float]]], batches of (visitorId, contentId,
            value), or of (.., (timestamp, rating)) for MovieLens;
        rejected: PCollection[str], JSON lines {"reason", "line"};
        counts: PCollection[dict[str, int]], exact counts (one dict per bundle; sum them with
            `common.counts.SumCounts`) of lines_read, records_parsed, header_lines,
            lines_rejected, rejected:<reason>, hits, page_hits, events, each also a Beam
            counter (namespace 'preprocess'). lines_read = records_parsed + header_lines +
            lines_rejected.

    Args:
        batched: the input is already batches of lines, PCollection[list[bytes]].
        redistribute: spread the batches of lines over the workers before parsing them. A gzip
            file is read whole by one worker, which would then parse every line of it too. The
            batches are shuffled compressed (`pack_lines`): JSON lines shrink about 8x, and so
            do the bytes the shuffle moves and, on Beam's local portable runner, the bytes its
            job service and the parsing worker hold (README, "What the local portable runner
            holds").
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
            batches = (
                batches
                | "PackLines" >> beam.Map(pack_lines)
                | "Redistribute" >> beam.Reshuffle()
                | "UnpackLines" >> beam.Map(unpack_lines)
            )
        return batches | "Parse" >> beam.ParDo(_ParseFn(self._format, self._config)).with_outputs(
            REJECTED_TAG, COUNTS_TAG, main=EVENTS_TAG
        )


def pack_lines(batch: list) -> bytes:
    """A batch of lines (bytes) or BigQuery rows (dicts) -> its pickle, zlib-compressed at level
    1 (240 MB/s; 8.5x smaller for synthetic GA360 lines, 11.6x at level 6 for 2.5x the time)."""
    return zlib.compress(pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL), 1)


def unpack_lines(packed: bytes) -> list:
    """The batch `pack_lines` packed."""
    return pickle.loads(zlib.decompress(packed))


def _bucket(visitor_id: str, buckets: int) -> int:
    """The SumPerPair shuffle key of a visitor: crc32 of its UTF-8 bytes mod `buckets` (stable
    across processes, unlike hash())."""
    return zlib.crc32(visitor_id.encode("utf-8", "surrogatepass")) % buckets


def _add_events(totals: dict, events, latest: bool) -> None:
    """Adds (visitor, content, value) events to {(visitor, content): total} in place: the sum of
    the values, or for MovieLens the latest rating (max of (timestamp, rating): ties go to the
    highest rating)."""
    get = totals.get
    if latest:
        for visitor, content, stamped in events:
            key = (visitor, content)
            previous = get(key)
            if previous is None or stamped > previous:
                totals[key] = stamped
    else:
        for visitor, content, value in events:
            key = (visitor, content)
            totals[key] = get(key, 0.0) + value


def _merge_totals(totals: dict, other: dict, latest: bool) -> None:
    """Adds the totals of `other` to `totals` in place (the same rule as `_add_events`)."""
    get = totals.get
    if latest:
        for key, stamped in other.items():
            previous = get(key)
            if previous is None or stamped > previous:
                totals[key] = stamped
    else:
        for key, value in other.items():
            totals[key] = get(key, 0.0) + value


class _PartialSumsFn(beam.DoFn):
    """Event batches -> (bucket, {(visitor, content): partial total}) for each visitor bucket.

    Sums every event of a bundle into one dict and emits it split by bucket when the bundle ends,
    or earlier once it holds MAX_BUFFERED_PAIRS pairs: the shuffle then moves a few coarse dicts
    per bundle, however many buckets there are (a CombinePerKey would add each batch's events
    per bucket, and with thousands of buckets a batch of 1,024 lines splits into hundreds of
    elements of a few events each).
    """

    def __init__(self, latest: bool, buckets: int):
        self._latest = latest
        self._buckets = buckets
        self._totals: dict = {}

    def start_bundle(self):
        self._totals = {}

    def process(self, events: list):
        _add_events(self._totals, events, self._latest)
        if len(self._totals) >= MAX_BUFFERED_PAIRS:
            yield from self._flush()

    def finish_bundle(self):
        for part in self._flush():
            yield GlobalWindows.windowed_value(part)

    def _flush(self):
        totals, self._totals = self._totals, {}
        if self._buckets == 1:
            if totals:
                yield 0, totals
            return
        parts: dict[int, dict] = {}
        last_visitor, part = None, None
        for key, total in totals.items():
            if key[0] != last_visitor:  # A visitor's pairs mostly come one after the other.
                last_visitor = key[0]
                bucket = _bucket(last_visitor, self._buckets)
                part = parts.get(bucket)
                if part is None:
                    part = parts[bucket] = {}
            part[key] = total
        yield from parts.items()


def _pair_batches(bucket_partials, latest: bool):
    """(bucket, iterable of {(visitor, content): partial total}) -> batches of at most
    PAIRS_PER_BATCH (visitor, content, float) pairs of the bucket's totals; non-positive sums
    dropped and counted (COUNTS_TAG {"pairs_dropped_nonpositive": n})."""
    _, partials = bucket_partials
    totals: dict = {}
    for partial in partials:
        if not totals:
            totals = partial  # Our own partial: the first one is merged into in place.
        else:
            _merge_totals(totals, partial, latest)
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
    yield from counts.counted(METRICS_NAMESPACE, {"pairs_dropped_nonpositive": dropped})


class SumPerPair(beam.PTransform):
    """Event batches -> batches of pairs, one value per (visitor, content) pair.

    Input: PCollection[list[tuple[str, str, V]]] from `ParseEvents`.
    Output: a DoOutputsTuple with
        pairs: PCollection[list[tuple[str, str, float]]], each pair in exactly one batch: time
            on page summed over all visits, pairs with sums <= 0 dropped; for MovieLens the
            latest rating;
        counts: PCollection[dict[str, int]], pairs_dropped_nonpositive (also a Beam counter).

    Each bundle's events are summed per pair before the shuffle (`_PartialSumsFn`), which then
    groups the partial sums by `buckets` visitor buckets (crc32(visitorId) mod buckets); each
    bucket's totals are one dict in one worker's memory, so a bucket should hold at most a few
    million pairs (`pipeline.options.shuffle_keys` picks the count). The result does not depend
    on `buckets`.
    """

    def __init__(self, input_format: str, buckets: int = SUM_BUCKETS):
        super().__init__()
        if buckets < 1:
            raise ValueError(f"buckets must be >= 1, got {buckets}")
        self._format = input_format
        self._buckets = buckets

    def expand(self, events):
        latest = self._format == FORMAT_MOVIELENS
        return (
            events
            | "SumInBundle" >> beam.ParDo(_PartialSumsFn(latest, self._buckets))
            | "GroupByBucket" >> beam.GroupByKey()
            | "ToPairBatches"
            >> beam.FlatMap(_pair_batches, latest).with_outputs(COUNTS_TAG, main=PAIRS_TAG)
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
