"""CombineFn shapes shared by the Beam pipelines."""

from __future__ import annotations

import apache_beam as beam
import numpy as np


class PartialSumsCombineFn(beam.CombineFn):
    """A CombineFn whose inputs are partial sums of the accumulator's own kind.

    Subclasses define `create_accumulator`, `add_input(total, sums) -> total` (adds `sums` into
    `total`, in place or not) and `extract_output`; merging folds the accumulators into the first
    with `add_input`, so a bundle's accumulators and a block's sums add up the same way.
    """

    def merge_accumulators(self, accumulators):
        accumulators = iter(accumulators)
        total = next(accumulators)
        for other in accumulators:
            total = self.add_input(total, other)
        return total


class CountsCombineFn(beam.CombineFn):
    """Counts over `n` slots (e.g. c_i, the training users of each item): int64 [n].

    Subclasses define `add_input(counts, element) -> counts`, adding the element's counts
    (in place or not); the accumulators of bundles add up.
    """

    def __init__(self, n: int):
        self._n = n

    def create_accumulator(self):
        return np.zeros(self._n, dtype=np.int64)

    def merge_accumulators(self, accumulators):
        accumulators = iter(accumulators)
        total = next(accumulators)
        for other in accumulators:
            total = total + other
        return total

    def extract_output(self, counts):
        return counts
