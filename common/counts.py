"""Exact counts of a Beam pipeline, carried as data rather than read back from its metrics.

A runner reports a metric's committed value only where it supports them; elsewhere (the portable
job API, Flink) only the attempted value, which counts again every element of a bundle that
failed and was retried. The outputs of a retried bundle are discarded, so counts that travel
as data are exact on every runner:

    class _Fn(beam.DoFn):
        def __init__(self):
            self._counts = BundleCounts("namespace")
        def start_bundle(self):
            self._counts.reset()
        def process(self, batch):
            self._counts.inc("lines", len(batch))       # also the Beam counter namespace:lines
            ...
        def finish_bundle(self):
            yield from self._counts.outputs()            # one {name: count} per bundle

    pcoll | beam.ParDo(_Fn()).with_outputs(COUNTS_TAG, main="lines")
    (counts_a, counts_b) | WriteCounts(path)             # {name: total} as one JSON file
    read_counts(path)

Only non-zero counts are kept, so a name appears in the totals iff its Beam counter was
incremented (the keys a metrics query used to give). The Beam counters stay, for monitoring.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from common.worker_json import WriteJson, read_json

COUNTS_TAG = "counts"


def add_counts(totals: dict[str, int], counts: dict[str, int]) -> dict[str, int]:
    """Adds `counts` into `totals` name by name, in place, and returns `totals`."""
    for name, count in counts.items():
        totals[name] = totals.get(name, 0) + count
    return totals


class BundleCounts:
    """The counts a DoFn keeps over one bundle, each increment also sent to a Beam counter.

    `inc(name, n)` adds n to the Beam counter `namespace:name` (monitoring) and to the bundle's
    {name: count}; `outputs()`, called from `finish_bundle`, yields that dict once as a
    COUNTS_TAG output in the global window and starts over; `reset()`, called from
    `start_bundle`, drops what a failed bundle left. Increments of 0 are ignored.
    """

    def __init__(self, namespace: str):
        self._namespace = namespace
        self._counters: dict[str, object] = {}
        self._counts: dict[str, int] = {}

    def reset(self) -> None:
        self._counts = {}

    def inc(self, name: str, count: int = 1) -> None:
        if not count:
            return
        counter = self._counters.get(name)
        if counter is None:
            counter = self._counters[name] = Metrics.counter(self._namespace, name)
        counter.inc(count)
        self._counts[name] = self._counts.get(name, 0) + count

    def outputs(self) -> Iterator[beam.pvalue.TaggedOutput]:
        counts, self._counts = self._counts, {}
        if counts:
            yield beam.pvalue.TaggedOutput(COUNTS_TAG, GlobalWindows.windowed_value(counts))


def counted(namespace: str, counts: dict[str, int]) -> Iterator[beam.pvalue.TaggedOutput]:
    """For a function of a FlatMap: increments the Beam counters `namespace:name` and yields the
    non-zero `counts` as one COUNTS_TAG output (none if all are 0)."""
    counts = {name: count for name, count in counts.items() if count}
    for name, count in counts.items():
        Metrics.counter(namespace, name).inc(count)
    if counts:
        yield beam.pvalue.TaggedOutput(COUNTS_TAG, counts)


class SumCounts(beam.CombineFn):
    """dict[str, int] counts -> their sum name by name, names sorted ({} for no input)."""

    def create_accumulator(self) -> dict[str, int]:
        return {}

    def add_input(self, accumulator: dict[str, int], counts: dict[str, int]) -> dict[str, int]:
        return add_counts(accumulator, counts)

    def merge_accumulators(self, accumulators: Iterable[dict[str, int]]) -> dict[str, int]:
        merged: dict[str, int] = {}
        for accumulator in accumulators:
            add_counts(merged, accumulator)
        return merged

    def extract_output(self, accumulator: dict[str, int]) -> dict[str, int]:
        return dict(sorted(accumulator.items()))


class WriteCounts(beam.PTransform):
    """Count PCollections -> their totals as one JSON object {name: count} in the file `path`.

    Input: a tuple of PCollection[dict[str, int]] (COUNTS_TAG outputs). The file always
    exists after the run ({} when nothing was counted); read it with `read_counts`.
    """

    def __init__(self, path: str):
        super().__init__()
        self._path = path

    def expand(self, counts):
        return (
            tuple(counts)
            | "FlattenCounts" >> beam.Flatten()
            | "SumCounts" >> beam.CombineGlobally(SumCounts())
            | "WriteCounts" >> WriteJson(self._path, sort_keys=True)
        )


def read_counts(path: str) -> dict[str, int]:
    """The totals `WriteCounts` wrote to `path`."""
    return {name: int(count) for name, count in read_json(path).items()}
