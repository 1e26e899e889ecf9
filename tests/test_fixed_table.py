"""`trainer.core.fixed_table.FixedTable`: the fixed side's factors held once, read by every solve
without a copy, with the same solutions as a plain array; and the broadcast exchange's one table
per process (`trainer.beam.exchange.fixed_table`)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from trainer.beam import checkpoint_files, exchange
from trainer.beam.side_state import SideState
from trainer.beam.spec import TrainSpec
from trainer.core import problem, solver
from trainer.core.fixed_table import FixedTable
from trainer.core.host_arrays import aligned_zeros
from trainer.core.objective import WALSConfig
from trainer.core.sides import Side
from trainer.core.sparse import CsrMatrix

ON_GPU = bool(tf.config.list_logical_devices("GPU"))


def table_of(y: np.ndarray) -> FixedTable:
    def fill(buffer):
        buffer[:] = y

    return FixedTable.filled(*y.shape, fill)


def block(rng: np.random.Generator, n_rows: int, n_cols: int, per_row: int) -> CsrMatrix:
    rows = np.repeat(np.arange(n_rows), per_row)
    cols = np.concatenate([rng.choice(n_cols, per_row, replace=False) for _ in range(n_rows)])
    values = rng.uniform(0.5, 2.0, rows.size)
    return CsrMatrix.from_triples(rows, cols, values, (n_rows, n_cols))


def test_aligned_buffers_and_tensors_that_share_them():
    for shape in [(1, 1), (7, 3), (1001, 64)]:
        assert aligned_zeros(shape).ctypes.data % 64 == 0 and not aligned_zeros(shape).any()
    y = np.arange(12, dtype=np.float32).reshape(4, 3)
    table = table_of(y)
    assert table.shape == (4, 3) and table.extended.shape == (5, 3)
    np.testing.assert_array_equal(table.factors.numpy(), y)
    np.testing.assert_array_equal(table.extended.numpy(), np.vstack([y, np.zeros((1, 3))]))
    table.array[2, 1] = 100.0  # one buffer: the tensors see the write (none is a copy)
    assert float(table.factors[2, 1]) == 100.0
    if not ON_GPU:
        assert float(table.extended[2, 1]) == 100.0
    with pytest.raises(ValueError, match="last row"):
        FixedTable(np.ones((3, 2), np.float32))
    with pytest.raises(ValueError, match="float32"):
        FixedTable(np.zeros((3, 2), np.float64))


@pytest.mark.parametrize("name, per_row", [("cg", 6), ("cholesky", 2), ("cholesky", 9)])
def test_a_table_gives_the_solutions_of_the_plain_array(name, per_row):
    """CG, the exact solver, and (2 cells per row at k = 8) its Woodbury path, whose table in the
    Gramian's eigenbasis is computed once per table and Gramian."""
    rng = np.random.default_rng(per_row)
    k, n_cols = 8, 300
    y = rng.normal(size=(n_cols, k)).astype(np.float32)
    rows = block(rng, 40, n_cols, per_row)
    f = np.full(rows.nnz, 2.0, np.float32)
    config = WALSConfig(solver=name, cg_steps=3, latent_factors=k)
    chosen = solver.solver_for(config, np.float32, jit_compile=False)
    plan = chosen.plan(problem.RowProblem(rows, f, np.full(40, 0.1), 0.2))
    gramian = (y.T.astype(np.float64) @ y).astype(np.float32)
    x0 = rng.normal(size=(40, k)).astype(np.float32)
    expected = chosen.solve(plan, y, gramian, x0=x0).numpy()
    table = table_of(y)
    for _ in range(2):
        got = chosen.solve(plan, table, gramian, x0=x0).numpy()
        np.testing.assert_array_equal(got, expected)
    assert (table._memo is not None) == (name == "cholesky" and per_row == 2)
    implicit = chosen.solve(plan, y, x0=x0).numpy()  # G from the table itself
    np.testing.assert_array_equal(chosen.solve(plan, table, x0=x0).numpy(), implicit)


def test_the_memo_keeps_one_value_per_table():
    table = table_of(np.ones((3, 2), np.float32))
    built = []

    def build(value):
        built.append(value)
        return value

    assert table.memo("a", lambda: build(1)) == 1
    assert table.memo("a", lambda: build(2)) == 1
    assert table.memo("b", lambda: build(3)) == 3
    assert table.memo("a", lambda: build(4)) == 4
    assert built == [1, 3, 4]


def _publish(spec: TrainSpec, side: Side, iteration: int, factors: np.ndarray) -> SideState:
    """Writes a side's factors as one block file; the state that names it."""
    rows = np.arange(factors.shape[0])
    entry = checkpoint_files.write_factor_block(
        spec.checkpoint_dir, iteration, side, 0, rows, factors
    )
    return SideState(side, iteration, (entry,), factors.T.astype(np.float64) @ factors)


def test_a_process_keeps_one_fixed_table_read_once_per_half_sweep(tmp_path, monkeypatch):
    spec = TrainSpec(str(tmp_path), str(tmp_path), WALSConfig(latent_factors=3), (6, 4), 100)
    rng = np.random.default_rng(0)
    users = [rng.normal(size=(6, 3)).astype(np.float32) for _ in range(2)]
    items = rng.normal(size=(4, 3)).astype(np.float32)
    reads = []
    read = checkpoint_files.read_factor_block
    monkeypatch.setattr(
        checkpoint_files, "read_factor_block", lambda *a: reads.append(a[1:3]) or read(*a)
    )
    monkeypatch.setattr(exchange, "_TABLE", None)
    first = _publish(spec, Side.USERS, 1, users[0])
    table = exchange.fixed_table(spec, first)
    np.testing.assert_array_equal(table.array, users[0])
    assert exchange.fixed_table(spec, first) is table and reads == [(1, Side.USERS)]
    items_state = _publish(spec, Side.ITEMS, 1, items)
    np.testing.assert_array_equal(exchange.fixed_table(spec, items_state).array, items)
    second = _publish(spec, Side.USERS, 2, users[1])
    np.testing.assert_array_equal(exchange.fixed_table(spec, second).array, users[1])
    assert reads == [(1, Side.USERS), (1, Side.ITEMS), (2, Side.USERS)]
    assert exchange._TABLE[0][:3] == (str(tmp_path), Side.USERS, 2)  # the one table held
