"""CombineFn shapes shared by the Beam pipelines."""

from __future__ import annotations

import apache_beam as beam


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
