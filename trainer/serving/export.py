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
With `copy_from`, an export of the same model already written (the scheduled run's export stage
names the trainer's `export/`) is copied into the staging directory instead of streaming the
model again, when its marker's facts match (`trainer.serving.export_copy`).

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

import tensorflow as tf

from common import atomic
from trainer.serving import export_copy, export_size, export_tables, sliced_variables, version_dir
from trainer.serving.serving_graph import (
    FOLD_IN_SIGNATURE,
    SERVING_SIGNATURE,
    FoldInGraph,
    RecommenderGraph,
)

if TYPE_CHECKING:
    from trainer.serving.model import WALSModel

logger = logging.getLogger(__name__)

# Bytes of a table read and written at a time.
CHUNK_BYTES = 64 << 20
FULL, FOLD_IN, SERVING_MODELS = export_size.FULL, export_size.FOLD_IN, export_size.SERVING_MODELS
# The SavedModel's format, a fact of every export's marker: raise it whenever what an export
# writes changes (its graphs and signatures, `serving_graph`; its files, `sliced_variables`,
# `export_tables`), so that an export of the earlier format is never copied for a new one
# (`export_copy`); markers written before this fact existed count as another format.
FORMAT = 1


def export_saved_model(
    model: WALSModel | str,
    export_dir: str,
    k: int = 10,
    replace: bool = False,
    serving_model: str = FULL,
    chunk_bytes: int = CHUNK_BYTES,
    copy_from: str | None = None,
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
        copy_from: an export of this model already written (the trainer's `export/`): when it
            is a complete export of this project with the same facts (k, serving_model, the
            model's shape and FORMAT; `trainer.serving.export_copy`), its files are copied
            into the staging directory instead (hard links on the local disk, server-side
            copies on gs://) and published by the same rules; otherwise (missing, incomplete,
            other facts) the model is streamed as without it. The marker of a copy names its
            source ("copied_from").

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
        "format": FORMAT,
    }
    copied = None
    if copy_from is not None:
        copy_from = copy_from.rstrip("/")
        why = export_copy.why_not(copy_from, export_dir, facts)
        if why is None:
            copied = copy_from
        else:
            logger.info("not copying %s (%s): exporting the model", copy_from, why)
    try:
        if copied is not None:
            export_copy.copy_files(copied, staging)
            facts[export_copy.COPIED_FROM] = copied
        else:
            _write(tables, shape, k, full, staging, chunk_bytes)
        version_dir.write_marker(staging, facts)
        version_dir.publish(staging, export_dir, replace)
    finally:
        if tf.io.gfile.exists(staging):
            tf.io.gfile.rmtree(staging)
    logger.info(
        "Exported the %s model of %d users x %d items (k=%d factors, %d recommendations) to %s%s: "
        "%s",
        serving_model,
        *shape,
        k,
        export_dir,
        f" (a copy of {copied})" if copied else "",
        export_size.describe(export_size.on_disk(export_dir)),
    )
    return export_dir


def _write(tables, shape: tuple[int, int, int], k: int, full: bool, staging: str, chunk_bytes):
    """Streams the model into a SavedModel at staging: the graph with empty tables, then each
    table chunk by chunk and the vocabularies (see `export_saved_model`)."""
    with tempfile.TemporaryDirectory() as vocab_dir:
        module = (RecommenderGraph if full else FoldInGraph)(tables, shape, k, vocab_dir)
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
