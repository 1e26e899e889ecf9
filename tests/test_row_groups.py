"""Rows grouped into blocks as packed batches (`trainer.beam.row_groups`): what a block receives
is exactly its rows, whatever the bundles and however the packs were cut, and packing makes the
shuffled bytes smaller than rows travelling alone."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.coders import registry
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that
from tensorflow.core.example import example_pb2

from trainer.beam import layout as blocks_lib
from trainer.beam import row_groups
from trainer.beam.row_groups import SparseRow
from transforms import examples, features
from transforms.dataset_info import DatasetError


def random_rows(n_rows: int, n_cols: int, seed: int) -> list[SparseRow]:
    rng = np.random.default_rng(seed)
    rows = []
    for key in rng.permutation(n_rows)[: n_rows * 3 // 4]:  # a quarter of the rows are empty
        length = int(rng.integers(1, 8))
        indices = np.sort(rng.choice(n_cols, length, replace=False)).astype(np.int64)
        rows.append(SparseRow(int(key), indices, rng.random(length).astype(np.float32)))
    return rows


def serialize(row: SparseRow) -> bytes:
    return examples.sparse_example(row.key, zip(row.indices.tolist(), row.values.tolist()))


def same_rows(actual: list[SparseRow], expected: list[SparseRow]) -> None:
    assert [row.key for row in actual] == [row.key for row in expected]
    for got, want in zip(actual, expected):
        assert got.indices.dtype == np.int64 and got.values.dtype == np.float32
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(got.values, want.values)


@pytest.mark.parametrize("n_cols", [50, 2**31 + 5])  # int32 indices, and too large for int32
def test_unpack_returns_the_packed_rows_in_order(n_cols):
    rows = random_rows(40, 50, seed=1)
    if n_cols > 50:
        rows[0] = SparseRow(
            rows[0].key, np.array([0, n_cols - 1], np.int64), np.ones(2, np.float32)
        )
    same_rows(row_groups.unpack_rows(row_groups.pack_rows(rows)), rows)
    assert row_groups.unpack_rows(row_groups.pack_rows([])) == []


def test_packing_shrinks_the_shuffled_bytes_several_fold():
    rows = random_rows(4000, 20000, seed=2)
    coder = registry.get_coder(object)  # how Beam encodes a row keyed by its block
    alone = sum(len(coder.encode((0, (r.key, r.indices, r.values)))) for r in rows)
    packed = len(coder.encode((0, row_groups.pack_rows(rows))))
    assert packed * 3 < alone


def test_parse_row_refuses_indices_and_values_of_different_lengths():
    serialized = examples.sparse_example(3, [(1, 1.0), (2, 2.0)])
    assert row_groups.parse_row(serialized).key == 3
    example = example_pb2.Example.FromString(serialized)
    example.features.feature[features.VALUES].float_list.value.append(9.0)
    with pytest.raises(DatasetError, match=r"different numbers of indices and values \(2, 3\)"):
        row_groups.parse_row(example.SerializeToString())


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("max_cells", [1, 100, row_groups.MAX_PACKED_CELLS])
def test_every_block_gets_exactly_its_rows_however_the_packs_are_cut(
    monkeypatch, interleaved, max_cells
):
    monkeypatch.setattr(row_groups, "MAX_PACKED_CELLS", max_cells)
    n_rows, n_cols = 90, 30
    layout = blocks_lib.BlockLayout(n_rows, 16, interleaved=interleaved)
    inputs = {"a": random_rows(n_rows, n_cols, seed=3), "b": random_rows(n_rows, n_cols, seed=4)}
    expected = {}
    for block_id in range(layout.n_blocks):
        expected[block_id] = {
            tag: sorted(
                (r for r in rows if layout.block_of(r.key) == block_id), key=lambda r: r.key
            )
            for tag, rows in inputs.items()
        }

    def check(actual):
        assert sorted(block_id for block_id, _ in actual) == list(range(layout.n_blocks))
        for block_id, grouped in actual:
            assert set(grouped) == {"a", "b"}
            for tag, rows in grouped.items():
                same_rows(sorted(rows, key=lambda r: r.key), expected[block_id][tag])

    with TestPipeline() as p:
        packed = {
            tag: p
            | f"Create{tag}" >> beam.Create([serialize(r) for r in rows])
            | f"Pack{tag}" >> row_groups.PackRows(layout)
            for tag, rows in inputs.items()
        }
        grouped = packed | row_groups.GroupRowsByBlock(layout.n_blocks)
        assert_that(grouped, check)


def test_ids_is_a_reserved_tag():
    with TestPipeline() as p:
        packed = p | beam.Create([(0, row_groups.pack_rows([]))])
        with pytest.raises(ValueError, match="own tag"):
            _ = {"ids": packed} | row_groups.GroupRowsByBlock(1)
