"""Beam metrics as a runner without committed metrics reports them after retried bundles.

Such a runner (the portable job API, Flink) gives only attempted values, and a bundle that
failed and ran again is counted twice in them. `report_retried_metrics(monkeypatch)` makes every
`beam.Pipeline.run` of a test return a result whose `metrics().query()` reports each counter that
way: committed None, attempted `factor` times the real value (as if every bundle had run
`factor` times). The pipeline itself runs unchanged, so its outputs are the real ones; what a
program reads from metrics is inflated.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics.execution import MetricResult


class _RetriedMetrics:
    def __init__(self, metrics, factor: int):
        self._metrics = metrics
        self._factor = factor

    def query(self, filter=None):  # noqa: A002 (Beam's parameter name)
        real = self._metrics.query(filter)
        counters = [
            MetricResult(c.key, None, self._factor * (c.committed or c.attempted or 0))
            for c in real["counters"]
        ]
        return {**real, "counters": counters}


class _RetriedResult:
    def __init__(self, result, factor: int):
        self._result = result
        self._factor = factor

    def metrics(self):
        return _RetriedMetrics(self._result.metrics(), self._factor)

    def __getattr__(self, name):
        return getattr(self._result, name)


def report_retried_metrics(monkeypatch, factor: int = 2) -> list:
    """Every Pipeline.run until the test ends reports its counters inflated by `factor`.

    Returns:
        The list of the results those runs returned, appended to as they run.
    """
    run = beam.Pipeline.run
    results: list = []

    def run_with_retried_metrics(self, *args, **kwargs):
        results.append(_RetriedResult(run(self, *args, **kwargs), factor))
        return results[-1]

    monkeypatch.setattr(beam.Pipeline, "run", run_with_retried_metrics)
    return results
