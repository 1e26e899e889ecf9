"""Exports a trained `WALSModel` as a TensorFlow SavedModel for TensorFlow Serving.

    path = trainer.serving.export.export_saved_model(model, "exports/wals/1", k=10)
    tf.saved_model.load(path).signatures["serving_default"](visitorId=tf.constant(["7291..."]))

Everything the signatures need lives inside the SavedModel: the factors, the seen items
(seen_indptr int64, seen_indices int32) and the train counts per item as variables
(`variables/`), the two vocabularies as assets (`assets/vocab_users.txt`,
`assets/vocab_items.txt`, read into static hash tables at load time), and the hyperparameters
as constants of the graphs. The export reads the model chunk by chunk, in memory or from its
directory (`export_tables`), and writes each table into the checkpoint slice by slice
(`sliced_variables`); sizes by table: `export_size`.

The fold-in-only model (serving_model=FOLD_IN) holds the item side alone: item factors, item
vocabulary, item counts and popularity, w0·G; no user table, seen items or user vocabulary
(at 50M visitors, 34 GB of the full model's 37 GB; README). Its signatures are `fold_in`
and `serving_default`, the same function: a client that names no signature, or names
`fold_in` (as it does with the full model), sends a history and gets its top k.

The export directory is never half there: the SavedModel is written to a hidden temporary
sibling with the project's ownership marker and moved into place (one atomic rename locally; on
gs:// file by file, `saved_model.pb` last, since TensorFlow Serving takes a numbered directory
for a version as soon as it appears but cannot load it without that file). An export killed
mid-move is removed and redone by the next export to the same directory; see
`trainer.serving.version_dir` for the rules and the TensorFlow Serving sources they rest on.

Signatures (k is fixed at export time; N_items is the number of items):

    serving_default
        in:  visitorId   tf.string  [batch]
        out: contentIds  tf.string  [batch, k]   best first, never content the visitor has seen
             scores      float32    [batch, k]   x_u · y_i; the train count for unknown visitors
             known       bool       [batch]      False: not in training, got the popular items
        A known visitor's row is x_u · Yᵀ with the items of their train row set to -inf, then
        `tf.math.top_k` (score descending, ties to the lower itemId). Unknown visitors get the
        k most popular items (train counts descending, ties by lower itemId). Rows with fewer
        than k candidates are padded with "" and -inf.

    fold_in
        in:  contentIds  tf.string  [n]   one new visitor's history
             durations   float32    [n]   the raw interaction values (time on page in ms)
        out: contentIds  tf.string  [k]
             scores      float32    [k]
        Durations of repeated contentIds are summed, pairs with sums <= 0 are dropped (as
        preprocessing does), the sums are scaled into ratings r_i by `transforms.scaling.scale`
        with the training statistics, unknown contentIds are dropped, and the visitor's factors
        are the exact WALS row solve against the fixed item factors Y: the normal equations of
        `trainer.core.problem.define_rows`, built in the graph from the TF twins of f, t and λ_u
        (`trainer.core.objective_tf`), with n_u the number of distinct known items with a
        positive sum. Scores are Y x with every known given item excluded; with n = 0 they are
        the popular items.

REST (TensorFlow Serving, `POST /v1/models/<name>:predict`):

    {"signature_name": "serving_default", "instances": ["7291783718742811253", "new-visitor"]}
    -> {"predictions": [{"contentIds": [...k], "scores": [...k], "known": true},
                        {"contentIds": [...k], "scores": [...k], "known": false}]}

    {"signature_name": "fold_in",
     "inputs": {"contentIds": ["article-0042", "article-0007"], "durations": [52000.0, 8000.0]}}
    -> {"outputs": {"contentIds": [...k], "scores": [...k]}}

`fold_in` takes one visitor per request and needs the columnar "inputs" form: its outputs are
[k], not one row per input element.

Model config keys read here (`WALSModel.config`, written by the trainer):
    scaling (str), scale_stats (dict, e.g. {"median": 41000.0}), unobserved_weight (w0),
    regularization (λ), regularization_exp (ν), weighting (a `trainer.core.objective.WEIGHTINGS`
    name), and the weighting's parameters (`trainer.core.objective.WEIGHTING_FIELDS`):
    column_weight_scale and column_weight_exponent (column_frequency),
    inverse_frequency_exponent (inverse_frequency), confidence_alpha (confidence). Models of
    earlier releases, with feature_wt_factor and feature_wt_exp, export with those keys' meaning
    (`WALSModel.wals_config`); binary_target is read when present (absent: t = r, as then).
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import TYPE_CHECKING

import numpy as np
import tensorflow as tf

from common import atomic
from trainer.core import objective_tf, solver
from trainer.serving import export_size, export_tables, sliced_variables, version_dir
from trainer.serving import model as model_lib
from transforms import scaling

if TYPE_CHECKING:
    from trainer.serving.model import WALSModel

logger = logging.getLogger(__name__)

SERVING_SIGNATURE = "serving_default"
FOLD_IN_SIGNATURE = "fold_in"
VISITOR_ID = "visitorId"
CONTENT_IDS = "contentIds"
DURATIONS = "durations"
SCORES = "scores"
KNOWN = "known"

_NEG_INF = float("-inf")
# Bytes of a table read and written at a time.
CHUNK_BYTES = 64 << 20
FULL, FOLD_IN, SERVING_MODELS = export_size.FULL, export_size.FOLD_IN, export_size.SERVING_MODELS


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


class _FoldIn(tf.Module):
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
        """Top-k for a new visitor from their history; see the module docstring."""
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


class _Recommender(_FoldIn):
    """The full serving graph: `_FoldIn` and the user-side state, the `serving_default`
    signature of known visitors."""

    def __init__(self, tables, shape: tuple[int, int, int], k: int, vocab_dir: str):
        """As `_FoldIn`, with the user tables and vocabulary."""
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
        """Top-k unseen content per visitor; see the module docstring."""
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


def export_saved_model(
    model: WALSModel | str,
    export_dir: str,
    k: int = 10,
    replace: bool = False,
    serving_model: str = FULL,
    chunk_bytes: int = CHUNK_BYTES,
) -> str:
    """Writes the model as a SavedModel: `serving_default` and `fold_in`, or the fold-in-only
    model (see the module docstring), reading the model's arrays chunk by chunk.

    A directory named export_dir is loadable only once complete, and an interrupted export never
    blocks the next one (`trainer.serving.version_dir` holds the rules and how TensorFlow
    Serving decides a version is there): the SavedModel is written to a hidden temporary
    sibling (`common.atomic.temporary_sibling`, which TF Serving never takes for a version)
    with the project's ownership marker (`.written-by-ga-wals`), then moved into place. On the
    local disk that is one atomic rename; on gs:// it is file by file, the marker first and
    `saved_model.pb` last. What a killed move left at export_dir (the marker without
    `saved_model.pb`) is removed by the next export there; anything this project did not write
    is never touched. For TensorFlow Serving, pass a numbered version directory such as
    `<base>/1`.

    The graph is saved with its tables empty (declared with an unknown row count), then each
    table is written into the checkpoint chunk by chunk (`sliced_variables`) and each
    vocabulary copied into assets/ in blocks (`export_tables`): from a model directory, memory
    stays at one chunk of about chunk_bytes (and the item Gramian's block), whatever the
    model's size. The size on disk by part is logged (`export_size.on_disk`).

    Args:
        model: the trained model, or a trained model's directory (the trainer's --output_dir,
            local or any Beam filesystem); its config must hold the keys listed in the module
            docstring.
        export_dir: the SavedModel directory to create (local, or any tf.io.gfile filesystem).
        k: recommendations per visitor, > 0.
        replace: replace a complete export of this project at export_dir (the old one stays
            until the new one is written, then goes saved_model.pb first).
        serving_model: FULL (both signatures) or FOLD_IN (the fold-in-only model).
        chunk_bytes: bytes of table read and written at a time, > 0; answers do not depend
            on it.

    Returns:
        export_dir.

    Raises:
        FileExistsError: (`common.staging.OutputExistsError`) export_dir holds a complete export
            and not `replace`, or files this project's export did not write.
        FileNotFoundError: a model directory without a trained model.
        ValueError: k <= 0, an unknown serving_model, or the model is empty, inconsistent or
            has an unknown setting.
        KeyError: the model config lacks a key the export needs.
    """
    if k <= 0:
        raise ValueError(f"k must be > 0, got {k}")
    if serving_model not in SERVING_MODELS:
        raise ValueError(f"serving_model must be one of {SERVING_MODELS}, got {serving_model!r}")
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be > 0, got {chunk_bytes}")
    tables = export_tables.of(model)
    shape = export_tables.check(tables)
    full = serving_model == FULL
    export_dir = export_dir.rstrip("/")
    version_dir.check(export_dir, replace)  # before the work; again when publishing
    parent = os.path.dirname(export_dir)
    if parent:
        tf.io.gfile.makedirs(parent)
    staging = atomic.temporary_sibling(export_dir)
    facts = {
        "k": k,
        "users": shape[0],
        "items": shape[1],
        "latent_factors": shape[2],
        "serving_model": serving_model,
    }
    try:
        with tempfile.TemporaryDirectory() as vocab_dir:
            module = (_Recommender if full else _FoldIn)(tables, shape, k, vocab_dir)
            fold_in = module.fold_in.get_concrete_function()
            signatures = {
                SERVING_SIGNATURE: module.serve.get_concrete_function() if full else fold_in,
                FOLD_IN_SIGNATURE: fold_in,
            }
            tf.saved_model.save(module, staging, signatures=signatures)
        sliced_variables.write(staging, export_tables.contents(tables, shape, full, chunk_bytes))
        vocabularies = {export_tables.ITEM_VOCAB: shape[1]}
        if full:
            vocabularies[export_tables.USER_VOCAB] = shape[0]
        for name, expected in vocabularies.items():
            with tf.io.gfile.GFile(f"{staging}/assets/{name}.txt", "wb") as handle:
                lines = tables.write_vocabulary(name, handle)
            if lines != expected:
                raise ValueError(f"{name} holds {lines} IDs, the factors {expected} rows")
        version_dir.write_marker(staging, facts)
        version_dir.publish(staging, export_dir, replace)
    finally:
        if tf.io.gfile.exists(staging):
            tf.io.gfile.rmtree(staging)
    logger.info(
        "Exported the %s model of %d users x %d items (k=%d factors, %d recommendations) to %s: %s",
        serving_model,
        *shape,
        k,
        export_dir,
        export_size.describe(export_size.on_disk(export_dir)),
    )
    return export_dir
