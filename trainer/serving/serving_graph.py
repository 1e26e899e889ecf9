"""The serving graphs of the SavedModel: the tables as variables and lookup tables, and the
signatures as `tf.function`s (`trainer.serving.export` states the signatures and writes the
graphs; its module docstring is their reference).

    FoldInGraph(tables, (n_users, n_items, k), k, vocab_dir)       fold_in: item side only
    RecommenderGraph(tables, (n_users, n_items, k), k, vocab_dir)  fold_in and serving_default

Every table is a variable of unknown row count, saved empty (`_table`), so building a graph
holds no rows: `trainer.serving.sliced_variables` writes the rows into the checkpoint after the
graph is saved. The vocabularies are read from one-line stand-in files while the graph is built
and replaced by the real files in `assets/`.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from trainer.core import objective_tf, solver
from trainer.serving import export_tables
from trainer.serving import model as model_lib
from transforms import scaling

SERVING_SIGNATURE = "serving_default"
FOLD_IN_SIGNATURE = "fold_in"
VISITOR_ID = "visitorId"
CONTENT_IDS = "contentIds"
DURATIONS = "durations"
SCORES = "scores"
KNOWN = "known"

_NEG_INF = float("-inf")


def _table(name: str, dtype, inner: tuple[int, ...] = ()) -> tf.Variable:
    """A variable of unknown row count, saved empty; `sliced_variables.write` fills it."""
    return tf.Variable(
        np.zeros((0, *inner), dtype),
        shape=tf.TensorShape([None, *inner]),
        trainable=False,
        name=name,
    )


def _static_table(
    path: str, key, key_index, value, value_index, default
) -> tf.lookup.StaticHashTable:
    return tf.lookup.StaticHashTable(
        tf.lookup.TextFileInitializer(path, key, key_index, value, value_index), default
    )


class FoldInGraph(tf.Module):
    """The fold-in-only serving graph: item-side state, the `fold_in` signature."""

    def __init__(self, tables, shape: tuple[int, int, int], k: int, vocab_dir: str):
        """Builds the state, the tables empty (filled after saving: see `export_saved_model`).

        Args:
            tables: the model's `export_tables.ExportTables`, checked by `export_tables.check`.
            shape: (n_users, n_items, latent factors).
            k: recommendations per visitor, > 0.
            vocab_dir: a scratch directory for the vocabularies' stand-ins (one-line files of
                the assets' names, replaced by the real files in the saved model).
        """
        super().__init__(name="wals_recommender")
        config = tables.config
        _, n_items, factors = shape
        self._k = k
        self._k_top = min(k, n_items)
        self._w0 = float(config["unobserved_weight"])
        self._scaling = str(config["scaling"])
        self._scale_stats = {
            name: float(config["scale_stats"][name])
            for name in scaling.STATS_BY_SCALING[self._scaling]
        }
        # f, t and λ_u of a new visitor's row come from this config through the TF twins of
        # the objective (`trainer.core.objective_tf`); its values become graph constants.
        self._objective = model_lib.config_of(config)
        self._n_items = n_items
        # TextFileInitializer splits lines on '\n' only (and would drop a final '\r', which no
        # ID has), so every ID, U+2028 or \\x1c included, maps to its own line number. The
        # tables read their files when the model loads; here they read one-line stand-ins.
        items_file = self._stand_in(vocab_dir, export_tables.ITEM_VOCAB)
        whole_line = tf.lookup.TextFileIndex.WHOLE_LINE
        line_number = tf.lookup.TextFileIndex.LINE_NUMBER
        self.item_ids = _static_table(items_file, tf.string, whole_line, tf.int64, line_number, -1)
        self.item_names = _static_table(
            items_file, tf.int64, line_number, tf.string, whole_line, ""
        )
        self.item_factors = _table("item_factors", np.float32, (factors,))
        self.popularity = _table("popularity", np.float32)
        # c_i, the train count of each item, which f_ui depends on.
        self.item_counts = _table("item_counts", np.float64)
        # w0·G, in float64 like the rest of the fold-in solve.
        self.w0_gramian = tf.Variable(
            self._w0 * tables.gramian(), trainable=False, name="w0_gramian"
        )
        popular, counts = tables.popular(k)
        pad = k - popular.size
        self.popular_names = tf.constant(tables.item_names(popular) + [""] * pad)
        self.popular_scores = tf.constant(
            np.concatenate([counts, np.full(pad, _NEG_INF)]).astype(np.float32)
        )

    @staticmethod
    def _stand_in(vocab_dir: str, name: str) -> str:
        path = os.path.join(vocab_dir, f"{name}.txt")
        with open(path, "wb") as handle:
            handle.write(b"-\n")  # one ID: the initializer refuses empty files and lines
        return path

    def _top_k(self, scores: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Best k per row, excluded (-inf) items and missing places as "" and -inf.

        Args:
            scores: float32 [b, N_items], excluded items at -inf.

        Returns:
            (contentIds tf.string [b, k], scores float32 [b, k]), best first; ties go to the
            lower itemId.
        """
        values, indices = tf.math.top_k(scores, k=self._k_top, sorted=True)
        valid = values > _NEG_INF
        ids = tf.where(valid, tf.cast(indices, tf.int64), tf.constant(-1, tf.int64))
        values = tf.where(valid, values, _NEG_INF)
        pad = [[0, 0], [0, self._k - self._k_top]]
        ids = tf.pad(ids, pad, constant_values=-1)
        values = tf.pad(values, pad, constant_values=_NEG_INF)
        return self.item_names.lookup(ids), values

    def _solve(self, items: tf.Tensor, ratings: tf.Tensor) -> tf.Tensor:
        """The exact WALS row solve for one new visitor.

        The normal equations of `trainer.core.problem.define_rows` for a single unpadded row,
        solved by the exact kernel of `trainer.core.solver`; f, t and λ_u from
        `trainer.core.objective_tf`, all in float64.

        Args:
            items: int64 [n], distinct itemIds, n >= 1.
            ratings: float32 [n], r_i.

        Returns:
            float32 [k], x.
        """
        y = tf.cast(tf.gather(self.item_factors, items), tf.float64)  # [n, k]
        f = objective_tf.observed_weight(
            self._objective, tf.gather(self.item_counts, items), ratings
        )
        t = objective_tf.target(self._objective, ratings)
        reg = objective_tf.row_regularization(self._objective, tf.size(items), self._n_items)
        b = tf.linalg.matvec(y, (self._w0 + f) * t, transpose_a=True)
        x = solver.solve_normal_equations(
            solver.observed_gramians(y[None], f[None]), b[None], self.w0_gramian, reg[None]
        )
        return tf.cast(x[0], tf.float32)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None], tf.string, name=CONTENT_IDS),
            tf.TensorSpec([None], tf.float32, name=DURATIONS),
        ]
    )
    def fold_in(self, contentIds: tf.Tensor, durations: tf.Tensor) -> dict[str, tf.Tensor]:
        """Top-k for a new visitor from their history; see `trainer.serving.export`."""
        unique, position = tf.unique(contentIds)
        sums = tf.math.unsorted_segment_sum(durations, position, tf.size(unique))
        items = self.item_ids.lookup(unique)  # int64 [m], -1 when unknown
        given = tf.boolean_mask(items, items >= 0)
        usable = (items >= 0) & (sums > 0)
        cols = tf.boolean_mask(items, usable)
        ratings = scaling.scale(tf.boolean_mask(sums, usable), self._scaling, self._scale_stats)
        scores = tf.cond(
            tf.size(cols) > 0,
            lambda: tf.linalg.matvec(self.item_factors, self._solve(cols, ratings)),
            lambda: tf.identity(self.popularity),
        )
        scores = tf.tensor_scatter_nd_update(
            scores, given[:, None], tf.fill(tf.shape(given), _NEG_INF)
        )
        names, values = self._top_k(scores[None, :])
        return {CONTENT_IDS: names[0], SCORES: values[0]}


class RecommenderGraph(FoldInGraph):
    """The full serving graph: `FoldInGraph` and the user-side state, the `serving_default`
    signature of known visitors."""

    def __init__(self, tables, shape: tuple[int, int, int], k: int, vocab_dir: str):
        """As `FoldInGraph`, with the user tables and vocabulary."""
        super().__init__(tables, shape, k, vocab_dir)
        users_file = self._stand_in(vocab_dir, export_tables.USER_VOCAB)
        self.user_ids = _static_table(
            users_file,
            tf.string,
            tf.lookup.TextFileIndex.WHOLE_LINE,
            tf.int64,
            tf.lookup.TextFileIndex.LINE_NUMBER,
            -1,
        )
        self.user_factors = _table("user_factors", np.float32, (shape[2],))
        self.seen_indptr = _table("seen_indptr", np.int64)
        self.seen_indices = _table("seen_indices", np.int32)

    # The camelCase argument names are the signatures' input keys.
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=VISITOR_ID)])
    def serve(self, visitorId: tf.Tensor) -> dict[str, tf.Tensor]:
        """Top-k unseen content per visitor; see `trainer.serving.export`."""
        users = self.user_ids.lookup(visitorId)  # int64 [b], -1 when unknown
        known = users >= 0
        safe = tf.where(known, users, tf.zeros_like(users))
        scores = tf.matmul(tf.gather(self.user_factors, safe), self.item_factors, transpose_b=True)
        # The seen items of every known row, as a ragged [b, (n_u)] gathered from the CSR.
        starts = tf.where(known, tf.gather(self.seen_indptr, safe), tf.zeros_like(safe))
        limits = tf.where(known, tf.gather(self.seen_indptr, safe + 1), tf.zeros_like(safe))
        positions = tf.ragged.range(starts, limits)
        seen = tf.cast(tf.gather(self.seen_indices, positions.flat_values), tf.int64)
        cells = tf.stack([positions.value_rowids(), seen], 1)
        scores = tf.tensor_scatter_nd_update(scores, cells, tf.fill(tf.shape(cells)[:1], _NEG_INF))
        names, values = self._top_k(scores)
        column = known[:, None]
        return {
            CONTENT_IDS: tf.where(column, names, self.popular_names[None, :]),
            SCORES: tf.where(column, values, self.popular_scores[None, :]),
            KNOWN: known,
        }
