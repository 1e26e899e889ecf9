"""The size of an exported SavedModel: predicted from the model's sizes, and measured on disk.

    export_size.table_bytes(n_users=50_000_000, n_items=10_000_000, nnz=5_000_000_000, k=64,
                            user_vocab_bytes=10**9, item_vocab_bytes=2 * 10**8)
    export_size.on_disk("exports/wals/1")   # {"variables": ..., "assets": ..., "graph": ...}

Each table is stored raw in the checkpoint's data files (`variables/variables.data-*`), so its
bytes are rows x row size (float32 4, int32 4, int64 and float64 8):

    table           full model              fold-in-only model
    user_factors    n_users · k · 4         -
    seen_indptr     (n_users + 1) · 8       -
    seen_indices    nnz · 4                 -
    item_factors    n_items · k · 4         n_items · k · 4
    popularity      n_items · 4             n_items · 4
    item_counts     n_items · 8             n_items · 8
    w0_gramian      k · k · 8               k · k · 8
    assets          vocab_users.txt and     vocab_items.txt
                    vocab_items.txt (their bytes: one ID and '\\n' a line)

On top of that, per checkpoint: the object graph (`_CHECKPOINTABLE_OBJECT_GRAPH`, a few KB),
and an index entry per tensor and per written slice (tens of bytes each); the graph
(`saved_model.pb`, a few hundred KB, independent of the model's size) and the ownership marker.
"""

from __future__ import annotations

import logging

import tensorflow as tf

logger = logging.getLogger(__name__)

FULL, FOLD_IN = "full", "fold_in"
SERVING_MODELS = (FULL, FOLD_IN)
USER_TABLES = ("user_factors", "seen_indptr", "seen_indices")
ASSETS = ("vocab_users.txt", "vocab_items.txt")
GRAPH = "saved_model.pb"


def table_bytes(
    n_users: int,
    n_items: int,
    nnz: int,
    k: int,
    user_vocab_bytes: int,
    item_vocab_bytes: int,
    serving_model: str = FULL,
) -> dict[str, int]:
    """Bytes of each table (variable) and asset of an export; see the module docstring.

    Args:
        n_users, n_items: the model's visitors and items.
        nnz: the train matrix's cells (the seen items).
        k: latent factors.
        user_vocab_bytes, item_vocab_bytes: the vocabulary files' sizes.
        serving_model: FULL or FOLD_IN (no user tables, no user vocabulary).

    Returns:
        {table or asset file name: bytes}, in the order of the module docstring.
    """
    sizes = {
        "user_factors": n_users * k * 4,
        "seen_indptr": (n_users + 1) * 8,
        "seen_indices": nnz * 4,
        "item_factors": n_items * k * 4,
        "popularity": n_items * 4,
        "item_counts": n_items * 8,
        "w0_gramian": k * k * 8,
        "vocab_users.txt": user_vocab_bytes,
        "vocab_items.txt": item_vocab_bytes,
    }
    if serving_model == FOLD_IN:
        for name in (*USER_TABLES, "vocab_users.txt"):
            del sizes[name]
    elif serving_model != FULL:
        raise ValueError(f"serving_model must be one of {SERVING_MODELS}, got {serving_model!r}")
    return sizes


def on_disk(export_dir: str) -> dict[str, int]:
    """Bytes of an export by part: variables (the checkpoint), assets (the vocabularies),
    graph (saved_model.pb), other (the ownership marker, fingerprint.pb), and total."""
    export_dir = export_dir.rstrip("/")
    parts = {"variables": 0, "assets": 0, "graph": 0, "other": 0}
    for directory, _, files in tf.io.gfile.walk(export_dir):
        for name in files:
            path = f"{directory.rstrip('/')}/{name}"
            relative = path[len(export_dir) + 1 :]
            top = relative.split("/", 1)[0]
            part = top if top in ("variables", "assets") else "other"
            if relative == GRAPH:
                part = "graph"
            parts[part] += tf.io.gfile.stat(path).length
    parts["total"] = sum(parts.values())
    return parts


def describe(sizes: dict[str, int]) -> str:
    """'variables 1.23 MB, assets ...' of `on_disk`'s parts."""
    return ", ".join(f"{part} {_human(size)}" for part, size in sizes.items())


def _human(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"
