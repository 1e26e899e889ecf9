"""Every Beam composite of the distributed trainer (`trainer.beam`) on a tiny input, with
TestPipeline + assert_that, against independent oracles: the dense matrix itself, plain NumPy
sums, and the dense float64 WALS of `tests/dense_wals.py`.

The matrix: 5 users x 4 items, blocks of 2 rows, so the users fall into B = 3 interleaved blocks
(rows {0, 3}, {1, 4}, {2}) and the items into 2 ({0, 2}, {1, 3}). User 2 has no cells.
"""

from __future__ import annotations

import json
import os

import apache_beam as beam
import dense_wals  # tests/ is on sys.path (pytest's rootdir-less "prepend" import mode)
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from trainer.beam import (
    block_problems,
    checkpoint_files,
    checkpoints,
    exchange,
    model_parts,
    seed_keys,
)
from trainer.beam import warm_start as beam_warm_start
from trainer.beam.layout import FactorRef, RowBlock
from trainer.beam.reading import CountItems, ReadRowBlocks, StashRatings
from trainer.beam.side_state import (
    CheckpointHalfSweep,
    CombineSideState,
    InitialFactors,
    ResumedFactors,
    publish,
    read_ref,
)
from trainer.beam.spec import BROADCAST, JOIN, TrainSpec
from trainer.beam.sweep import HalfSweep, LossTerms, WriteLoss
from trainer.core import seeding, tiling
from trainer.core.objective import WALSConfig
from trainer.core.sides import ITEMS, USERS, Side
from trainer.core.sparse import CsrMatrix
from trainer.serving import model as model_lib
from transforms import examples, features

R = np.array(
    [
        [1.0, 0.0, 2.0, 0.0],
        [0.0, 3.0, 0.0, 1.0],
        [0.0, 0.0, 0.0, 0.0],
        [4.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 5.0, 2.0],
    ],
    dtype=np.float32,
)
N_USERS, N_ITEMS = R.shape
K = 3
BLOCK_ROWS = 2
# Interleaved blocks, written out by hand: row r is in block r mod B.
USER_BLOCKS = {0: [0, 3], 1: [1, 4], 2: [2]}
ITEM_BLOCKS = {0: [0, 2], 1: [1, 3]}
CONFIG = WALSConfig(latent_factors=K, num_iters=1, regularization=0.05, unobserved_weight=0.2)


def matrix_of(side: Side) -> np.ndarray:
    return R if side == USERS else R.T


def block_ids_of(side: Side) -> dict[int, list[int]]:
    return USER_BLOCKS if side == USERS else ITEM_BLOCKS


def row_block(side: Side, block_id: int) -> RowBlock:
    rows = block_ids_of(side)[block_id]
    dense = matrix_of(side)[rows]
    r, c = np.nonzero(dense)
    csr = CsrMatrix.from_triples(r, c, dense[r, c], dense.shape)
    return RowBlock(side, block_id, np.asarray(rows, np.int64), csr)


def spec_for(tmp_path, exchange_name: str = BROADCAST, **overrides) -> TrainSpec:
    return TrainSpec(
        input_dir=str(tmp_path / "data"),
        checkpoint_dir=str(tmp_path / "ckpt"),
        config=overrides.pop("config", CONFIG),
        shape=(N_USERS, N_ITEMS),
        block_rows=BLOCK_ROWS,
        exchange=exchange_name,
        fingerprint="test-run",
        **overrides,
    )


@pytest.fixture(autouse=True)
def _no_cached_problems():
    """Every test starts with empty per-process caches (their keys hold the fingerprint)."""
    block_problems._PLAN_CACHE.clear()
    yield
    block_problems._PLAN_CACHE.clear()


def random_factors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, K)).astype(np.float32)


def publish_side(spec: TrainSpec, side: Side, table: np.ndarray, iteration: int) -> list:
    """The FactorRefs of `table`'s blocks, their files written (outside any pipeline)."""
    return [
        publish(spec, iteration, side, block_id, np.asarray(rows, np.int64), table[rows])
        for block_id, rows in block_ids_of(side).items()
    ]


def as_table(spec: TrainSpec, n: int):
    """A Beam step: PCollection[FactorRef] -> (row, factors tuple) per row, read from files."""

    def rows_of(ref):
        row_ids, factors = read_ref(spec, ref)
        return [(int(r), tuple(f.tolist())) for r, f in zip(row_ids, factors)]

    return beam.FlatMap(rows_of)


def close_to_table(expected: np.ndarray, atol: float):
    """A matcher: the (row, factors) pairs make up exactly `expected`, within atol."""

    def check(actual):
        assert sorted(row for row, _ in actual) == list(range(expected.shape[0]))
        got = np.array([factors for _, factors in sorted(actual)])
        np.testing.assert_allclose(got, expected, rtol=0, atol=atol)

    return check


def write_train_records(input_dir: str) -> None:
    directory = os.path.join(input_dir, features.TRAIN_DIR)
    os.makedirs(directory)
    for name, matrix in ((features.ITEMS_FOR_USER, R), (features.USERS_FOR_ITEM, R.T)):
        path = os.path.join(directory, f"{name}-00000-of-00001{features.TFRECORD_SUFFIX}")
        with tf.io.TFRecordWriter(path, options="GZIP") as writer:
            for key, row in enumerate(matrix):
                if row.any():  # rows without cells have no record
                    cols = np.flatnonzero(row)
                    writer.write(examples.sparse_example(key, zip(cols, row[cols])))


def block_summary(block: RowBlock):
    return (
        block.side,
        block.block_id,
        tuple(block.row_ids),
        tuple(map(tuple, block.rows.to_dense())),
    )


@pytest.mark.parametrize("side", [USERS, ITEMS])
def test_read_row_blocks_deals_every_row_to_its_interleaved_block(tmp_path, side):
    spec = spec_for(tmp_path)
    write_train_records(spec.input_dir)
    expected = [
        (side, block_id, tuple(rows), tuple(map(tuple, matrix_of(side)[rows].astype(float))))
        for block_id, rows in block_ids_of(side).items()
    ]
    with TestPipeline() as p:
        blocks = p | ReadRowBlocks(spec, side) | beam.Map(block_summary)
        assert_that(blocks, equal_to(expected))


def test_count_items_counts_each_items_observed_cells(tmp_path):
    expected = [tuple(int(c) for c in (R != 0).sum(axis=0))]  # c_i = (2, 2, 2, 2)
    with TestPipeline() as p:
        counts = (
            p
            | beam.Create([row_block(ITEMS, b) for b in ITEM_BLOCKS])
            | CountItems(N_ITEMS)
            | beam.Map(lambda c: tuple(int(x) for x in c))
        )
        assert_that(counts, equal_to(expected))


@pytest.mark.parametrize("exchange_name", [BROADCAST, JOIN])
def test_stash_ratings_writes_each_blocks_ratings_and_lists_cg_kernels(tmp_path, exchange_name):
    config = WALSConfig(latent_factors=K, solver="cg")
    spec = spec_for(tmp_path, exchange_name, config=config)
    with TestPipeline() as p:
        stashed, kernels = (
            p | beam.Create([row_block(ITEMS, b) for b in ITEM_BLOCKS]) | StashRatings(spec)
        )
        assert_that(
            stashed | beam.MapTuple(lambda b, rows: (b, tuple(rows))),
            equal_to([(b, tuple(rows)) for b, rows in ITEM_BLOCKS.items()]),
            label="BlockRows",
        )
        # The length of the fixed table each block is solved against: all 5 users
        # (broadcast), or the users it touches padded to a power of two (join): item block 0
        # (items 0, 2) touches users {0, 3, 4} -> 4, block 1 (items 1, 3) {1, 3, 4} -> 4.
        length = 5 if exchange_name == BROADCAST else 4
        assert_that(
            kernels | beam.Map(lambda shapes: {shape[0] for shape in shapes}),
            equal_to([{length}]),
            label="KernelLengths",
        )
    for block_id, rows in ITEM_BLOCKS.items():
        back = checkpoint_files.read_ratings(spec.checkpoint_dir, ITEMS, block_id)
        np.testing.assert_array_equal(back.to_dense(), R.T[rows])


def test_stash_ratings_lists_no_kernels_for_cholesky(tmp_path):
    spec = spec_for(tmp_path)
    with TestPipeline() as p:
        _, kernels = p | beam.Create([row_block(ITEMS, 0)]) | StashRatings(spec)
        assert_that(kernels, equal_to([frozenset()]))


# Visitor IDs with characters that str.splitlines() would split at: a line ends at "\n" only.
VISITORS = ["visitor-0", "v\u2028one", "v\x1ctwo", "é-three", ""]


def write_vocabulary(path, ids: list[str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model_lib.vocabulary_to_bytes(ids))
    return str(path)


def earlier_model(directory, users: list[str], factors: np.ndarray) -> str:
    """A saved model whose user side is (users, factors); its item side is filler."""
    empty = np.zeros(len(users) + 1, np.int64)
    model = model_lib.WALSModel(
        user_factors=factors,
        item_factors=random_factors(2, 9),
        seen_indptr=empty,
        seen_indices=np.zeros(0, np.int32),
        item_counts=np.zeros(2, np.int64),
        users=users,
        items=["a", "b"],
        config={"latent_factors": K},
    )
    model_lib.save(model, str(directory))
    return str(directory)


@pytest.mark.parametrize("warm", [False, True])
def test_initial_factors_are_each_rows_seeded_or_warm_start_factors(tmp_path, monkeypatch, warm):
    """Seeded by the key of each row's ID, streamed from the vocabulary in small batches
    (several per block); with a warm start, the earlier model's factors for the IDs it knew,
    joined by ID over several shards and read in several parts."""
    monkeypatch.setattr(seed_keys, "_HASH_LINES", 2)
    monkeypatch.setattr(seed_keys, "FLUSH_ROWS", 3)
    monkeypatch.setattr(beam_warm_start, "SHARD_ROWS", 2)
    monkeypatch.setattr(beam_warm_start, "_FLUSH_IDS", 1)
    monkeypatch.setattr(model_parts, "PART_BYTES", 2 * 4 * K)  # 2 rows a part
    vocabulary = write_vocabulary(tmp_path / "data" / "vocab_users", VISITORS)
    expected = seeding.initial_factors(
        seeding.id_keys(VISITORS), K, CONFIG.init_stddev, CONFIG.seed, USERS
    )  # the whole side at once: row u depends only on its own key
    source = ""
    if warm:
        # The earlier model knew three of the visitors (in another order) and two others; one
        # ID twice, whose last row counts (as a dict built in file order).
        earlier_ids = ["gone", VISITORS[3], "", "v\u2028one", "x", VISITORS[3]]
        earlier_factors = random_factors(len(earlier_ids), 7)
        source = earlier_model(tmp_path / "earlier", earlier_ids, earlier_factors)
        for row, visitor in enumerate(VISITORS):
            if visitor in earlier_ids:
                last = len(earlier_ids) - 1 - earlier_ids[::-1].index(visitor)
                expected[row] = earlier_factors[last]
    spec = spec_for(tmp_path, vocabularies=(vocabulary, ""), warm_start=source)
    with TestPipeline() as p:
        table = (
            p
            | beam.Create([(b, np.asarray(rows, np.int64)) for b, rows in USER_BLOCKS.items()])
            | InitialFactors(spec, USERS)
            | as_table(spec, N_USERS)
        )
        assert_that(table, close_to_table(expected, atol=0))
    if warm:
        assert checkpoint_files.read_warm_matches(spec.checkpoint_dir, USERS) == 3


def test_seed_keys_refuse_a_vocabulary_of_another_size(tmp_path):
    vocabulary = write_vocabulary(tmp_path / "vocab_users", VISITORS[:4])
    spec = spec_for(tmp_path, vocabularies=(vocabulary, ""))
    with pytest.raises(Exception, match="holds 4 IDs but summary.json says 5"):
        with TestPipeline() as p:
            _ = p | seed_keys.SeedKeys(vocabulary, spec.layout(USERS))


def checkpointed(spec: TrainSpec, side: Side, table: np.ndarray, iteration: int) -> dict:
    """Writes `table` as a complete half-sweep of `iteration`; returns its marker as
    `checkpoints.find_resume` reads it."""
    refs = publish_side(spec, side, table, iteration)
    checkpoints.write_marker(
        spec.checkpoint_dir, iteration, side, spec.fingerprint, [ref.entry for ref in refs]
    )
    return checkpoints._read_marker(checkpoint_files.half_dir(spec.checkpoint_dir, iteration, side))


def test_resumed_factors_reference_the_checkpointed_blocks(tmp_path):
    spec = spec_for(tmp_path, start_iteration=3)
    table = random_factors(N_ITEMS, 1)
    marker = checkpointed(spec, ITEMS, table, 3)
    expected_gramians = {
        b: table[rows].astype(np.float64).T @ table[rows].astype(np.float64)
        for b, rows in ITEM_BLOCKS.items()
    }

    def gramians_close(actual):
        assert sorted(b for b, _ in actual) == sorted(expected_gramians)
        for block_id, gramian in actual:
            np.testing.assert_allclose(gramian, expected_gramians[block_id], rtol=1e-6)

    with TestPipeline() as p:
        refs = (
            p
            | beam.Create([(b, np.asarray(rows, np.int64)) for b, rows in ITEM_BLOCKS.items()])
            | ResumedFactors(spec, ITEMS, marker)
        )
        assert_that(refs | as_table(spec, N_ITEMS), close_to_table(table, 0), label="Factors")
        assert_that(
            refs | beam.Map(lambda ref: (ref.block_id, ref.gramian)),
            gramians_close,
            label="Gramians",
        )
        assert_that(
            refs | beam.Map(lambda ref: (ref.side, ref.iteration)),
            equal_to([(ITEMS, 3), (ITEMS, 3)]),
            label="Half",
        )


def test_resumed_factors_refuse_a_block_with_other_rows(tmp_path):
    spec = spec_for(tmp_path, start_iteration=1)
    marker = checkpointed(spec, ITEMS, random_factors(N_ITEMS, 1), 1)
    with pytest.raises(Exception, match="checkpoint block 0 holds other rows"):
        with TestPipeline() as p:
            _ = p | beam.Create([(0, np.array([0, 3]))]) | ResumedFactors(spec, ITEMS, marker)


def fake_ref(block_id: int, gramian: np.ndarray, iteration: int = 2) -> FactorRef:
    entry = {"block": block_id, "file": f"block-{block_id:05d}-x.npz", "bytes": 1, "sha256": "x"}
    return FactorRef(USERS, block_id, iteration, entry, gramian)


def state_summary(state):
    return (
        state.side,
        state.iteration,
        tuple(entry["block"] for entry in state.entries),
        tuple(state.gramian.ravel()),
    )


def test_combine_side_state_sums_the_gramian_terms_and_writes_nothing(tmp_path):
    terms = [np.full((K, K), float(b + 1)) for b in range(3)]  # 1 + 2 + 3 = 6 everywhere
    with TestPipeline() as p:
        state = (
            p
            | beam.Create([fake_ref(b, terms[b]) for b in (2, 0, 1)])
            | CombineSideState(K)
            | beam.Map(state_summary)
        )
        assert_that(state, equal_to([(USERS, 2, (0, 1, 2), (6.0,) * (K * K))]))
    assert not os.path.exists(tmp_path / "ckpt")


def test_checkpoint_half_sweep_writes_the_marker_of_every_block(tmp_path):
    spec = spec_for(tmp_path)
    table = random_factors(N_USERS, 3)
    refs = publish_side(spec, USERS, table, 2)
    with TestPipeline() as p:
        state = p | beam.Create(refs) | CheckpointHalfSweep(spec) | beam.Map(state_summary)
        gramian = table.astype(np.float64).T @ table.astype(np.float64)  # Σ_b F_bᵀF_b = FᵀF

        def check(actual):
            ((side, iteration, blocks, terms),) = actual
            assert (side, iteration, blocks) == (USERS, 2, (0, 1, 2))
            np.testing.assert_allclose(np.reshape(terms, (K, K)), gramian, rtol=1e-6)

        assert_that(state, check)
    with open(tmp_path / "ckpt" / "iter-0002" / "users" / checkpoints.MARKER) as handle:
        marker = json.load(handle)
    assert marker["fingerprint"] == "test-run" and marker["side"] == "users"
    assert marker["blocks"] == [ref.entry for ref in refs]
    # Nothing but the block files and the marker (no temporary names left behind).
    names = sorted(os.listdir(tmp_path / "ckpt" / "iter-0002" / "users"))
    assert names == sorted([ref.entry["file"] for ref in refs] + [checkpoints.MARKER])


def test_write_requests_and_send_fixed_factors_deliver_exactly_the_touched_rows(tmp_path):
    spec = spec_for(tmp_path, JOIN)
    items = random_factors(N_ITEMS, 4)
    item_refs = publish_side(spec, ITEMS, items, 0)
    # User block 0 (users 0, 3) touches items 0, 1, 2; block 1 (users 1, 4) items 1, 2, 3;
    # block 2 (user 2) none: it asks item block 0 for nothing. Item block 0 owns items 0, 2.
    expected = {0: [0, 1, 2], 1: [1, 2, 3], 2: []}
    with TestPipeline() as p:
        requests = (
            p | "Users" >> beam.Create([row_block(USERS, b) for b in USER_BLOCKS])
        ) | exchange.WriteRequests(spec, USERS)
        assert_that(requests | beam.Keys(), equal_to([0, 1]), label="OneFilePerFixedBlock")
        sent = p | "Items" >> beam.Create(item_refs) | exchange.SendFixedFactors(spec, requests)

        def received(element):
            block_id, parts = element
            refs = {block_id: block_id}
            _, rows, factors = exchange.received_factors((block_id, parts), refs, K)
            np.testing.assert_array_equal(factors, items[rows])
            return block_id, tuple(int(r) for r in rows)

        assert_that(
            sent | beam.Map(received),
            equal_to([(b, tuple(rows)) for b, rows in expected.items()]),
            label="Received",
        )


def test_the_joins_padded_table_length_is_the_next_power_of_two():
    assert [tiling.padded_fixed_length(m) for m in range(0, 10)] == [1, 1, 2, 4, 4, 8, 8, 8, 8, 16]


def oracle_half_sweep(config: WALSConfig, y: np.ndarray) -> np.ndarray:
    """Every user solved against Y, float64 [n_users, k]: uniform weights (f = 1), binary
    target (t = 1 on observed cells), λ_u = λ·(n_u + w0·N_items)^ν."""
    observed = R != 0
    weights = dense_wals.dense_weights(R, observed, config.unobserved_weight, "uniform")
    reg_users, _ = dense_wals.dense_regularization(
        observed, config.regularization, config.unobserved_weight, config.regularization_exp
    )
    return dense_wals.solve_rows(
        observed.astype(np.float64), weights, y.astype(np.float64), reg_users
    )


def oracle_loss_terms(config: WALSConfig, x: np.ndarray, y: np.ndarray) -> tuple:
    """(Σ_obs (1 − x·y)², Σ_obs (x·y)², Σ_u λ_u‖x_u‖², nnz) in float64."""
    observed = R != 0
    reg_users, _ = dense_wals.dense_regularization(
        observed, config.regularization, config.unobserved_weight, config.regularization_exp
    )
    predicted = x.astype(np.float64) @ y.astype(np.float64).T
    return (
        float(np.sum((1 - predicted[observed]) ** 2)),
        float(np.sum(predicted[observed] ** 2)),
        float(np.sum(reg_users * np.sum(x.astype(np.float64) ** 2, axis=1))),
        int(observed.sum()),
    )


def prepared_half_sweep(tmp_path, exchange_name):
    """A spec, the users' and items' refs of iteration 0, and their tables, with the ratings
    stashed as a launch leaves them."""
    spec = spec_for(tmp_path, exchange_name)
    for side in (USERS, ITEMS):
        for block_id in block_ids_of(side):
            block = row_block(side, block_id)
            checkpoint_files.write_ratings(spec.checkpoint_dir, side, block_id, block.rows)
    x, y = random_factors(N_USERS, 5), random_factors(N_ITEMS, 6)
    return spec, x, y, publish_side(spec, USERS, x, 0), publish_side(spec, ITEMS, y, 0)


def half_sweep_inputs(p, spec, user_refs, item_refs):
    users = p | "Users" >> beam.Create(user_refs)
    items = p | "Items" >> beam.Create(item_refs)
    items_state = items | "ItemsState" >> CombineSideState(K)
    item_counts = p | "ItemCounts" >> beam.Create([(R != 0).sum(axis=0).astype(np.int64)])
    requests = None
    if spec.exchange == JOIN:
        blocks = p | "UserBlocks" >> beam.Create([row_block(USERS, b) for b in USER_BLOCKS])
        requests = blocks | "Requests" >> exchange.WriteRequests(spec, USERS)
    return users, items, items_state, item_counts, requests


def loss_terms_close(expected: tuple):
    def check(actual):
        (sums,) = actual
        got = (sums.squared, sums.predicted, sums.regularization, sums.entries)
        np.testing.assert_allclose(got[:3], expected[:3], rtol=1e-5)
        assert sums.weighted == pytest.approx(sums.squared, rel=1e-6)  # f = 1
        assert got[3] == expected[3]

    return check


def _add(parts):
    parts = list(parts)
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


@pytest.mark.parametrize("exchange_name", [BROADCAST, JOIN])
def test_half_sweep_solves_every_block_like_the_dense_oracle(tmp_path, exchange_name):
    spec, x, y, user_refs, item_refs = prepared_half_sweep(tmp_path, exchange_name)
    with TestPipeline() as p:
        users, items, items_state, item_counts, requests = half_sweep_inputs(
            p, spec, user_refs, item_refs
        )
        kernels = p | "Kernels" >> beam.Create([frozenset()])
        solved, sums = (users, items, items_state) | HalfSweep(
            spec, USERS, 1, item_counts, kernels, requests, with_loss=True
        )
        assert_that(
            solved | "ReadSolved" >> as_table(spec, N_USERS),
            close_to_table(oracle_half_sweep(CONFIG, y), atol=1e-5),
            label="Factors",
        )
        assert_that(
            solved | beam.Map(lambda ref: (ref.side, ref.iteration)),
            equal_to([(USERS, 1)] * len(USER_BLOCKS)),
            label="Iteration",
        )
        assert_that(
            sums | "AddSums" >> beam.CombineGlobally(_add),
            loss_terms_close(oracle_loss_terms(CONFIG, x, y)),
            label="IncomingLossTerms",
        )


@pytest.mark.parametrize("exchange_name", [BROADCAST, JOIN])
def test_loss_terms_measure_without_solving(tmp_path, exchange_name):
    spec, x, y, user_refs, item_refs = prepared_half_sweep(tmp_path, exchange_name)
    with TestPipeline() as p:
        users, items, items_state, item_counts, requests = half_sweep_inputs(
            p, spec, user_refs, item_refs
        )
        sums = (users, items, items_state) | LossTerms(spec, USERS, item_counts, requests)
        assert_that(
            sums | "AddSums" >> beam.CombineGlobally(_add),
            loss_terms_close(oracle_loss_terms(CONFIG, x, y)),
        )
    assert not os.path.exists(os.path.join(spec.checkpoint_dir, "iter-0001"))


def test_write_loss_writes_the_dense_objective(tmp_path):
    spec, x, y, user_refs, item_refs = prepared_half_sweep(tmp_path, BROADCAST)
    observed = R != 0
    w0 = CONFIG.unobserved_weight
    weights = dense_wals.dense_weights(R, observed, w0, "uniform")
    reg_users, reg_items = dense_wals.dense_regularization(
        observed, CONFIG.regularization, w0, CONFIG.regularization_exp
    )
    expected = dense_wals.loss(
        observed.astype(np.float64), weights, x.astype(np.float64), y.astype(np.float64),
        reg_users, reg_items,
    )  # fmt: skip
    with TestPipeline() as p:
        users, items, items_state, item_counts, requests = half_sweep_inputs(
            p, spec, user_refs, item_refs
        )
        users_state = users | "UsersState" >> CombineSideState(K)
        user_sums = (users, items, items_state) | LossTerms(spec, USERS, item_counts)
        loss = (user_sums, items) | WriteLoss(spec, 0, item_counts, users_state, items_state)
        assert_that(
            loss | beam.Map(lambda values: round(values["total"] / expected, 5)),
            equal_to([1.0]),
        )
    (written,) = checkpoint_files.read_losses(spec.checkpoint_dir)
    assert written["iteration"] == 0
    assert written["total"] == pytest.approx(expected, rel=1e-5)
