"""The trained model: factors, vocabularies and what is needed to recommend in original IDs.

    model = trainer.serving.model.load("runs/local/model")
    model.recommend(["7291783718742811253"], k=10)   # -> [Recommendations(...)]
    model.similar_items(["article-0042"], k=5)

On disk, under `<model_dir>/model/`:
    user_factors.npy     float32 [nusers, k]   X, row u = visitor vocab_users[u]
    item_factors.npy     float32 [nitems, k]   Y, row i = content vocab_items[i]
    seen_indptr.npy      int64 [nusers + 1]    the train matrix's rows (CSR), so that items a
    seen_indices.npy     int32 [nnz]           visitor has already seen are never recommended
    seen_values.npy      float32 [nnz]         their ratings r_ui (optional: models written
                                               before it have none)
    item_counts.npy      int64 [nitems]        train users per item (popularity; fold-in weights)
    vocab_users.txt      one visitorId per line, line number = userId
    vocab_items.txt      one contentId per line, line number = itemId
                         (UTF-8, each line ended by '\n' and split on '\n' only: see
                         `vocabulary_from_bytes`)
    config.json          hyperparameters, the rating scaling and its statistics

Every ranking here is `trainer.core.topk`'s: float32 scores (`topk.score`), ties to the lower
index, the same lists batch prediction and the evaluation produce; fold-in is
`trainer.core.foldin`'s.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os

import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from trainer.core import foldin, topk
from trainer.core.objective import WALSConfig
from trainer.core.sparse import CsrMatrix
from transforms import scaling

MODEL_SUBDIR = "model"
_ARRAYS = ("user_factors", "item_factors", "seen_indptr", "seen_indices", "item_counts")
_OPTIONAL_ARRAYS = ("seen_values",)


@dataclasses.dataclass(frozen=True)
class Recommendations:
    """Top-k for one visitor.

    Attributes:
        visitor_id: the visitor's own ID.
        content_ids: list[str], best first, never content the visitor has seen.
        scores: list[float], x_u . y_i (or the popularity count for unknown visitors).
        known: False when the visitor was not in training and got the most popular content.
    """

    visitor_id: str
    content_ids: list[str]
    scores: list[float]
    known: bool


@dataclasses.dataclass
class WALSModel:
    """Factors and vocabularies of a trained WALS model (see module docstring for shapes)."""

    user_factors: np.ndarray
    item_factors: np.ndarray
    seen_indptr: np.ndarray
    seen_indices: np.ndarray
    item_counts: np.ndarray
    users: list[str]
    items: list[str]
    config: dict
    seen_values: np.ndarray | None = None

    def __post_init__(self):
        self._user_index = {visitor: u for u, visitor in enumerate(self.users)}
        self._item_index = {content: i for i, content in enumerate(self.items)}

    def user_index(self, visitor_id: str) -> int | None:
        return self._user_index.get(visitor_id)

    def item_index(self, content_id: str) -> int | None:
        return self._item_index.get(content_id)

    def seen(self, user: int) -> np.ndarray:
        """int [n] itemIds the user has in the train matrix, ascending."""
        return self.seen_indices[self.seen_indptr[user] : self.seen_indptr[user + 1]]

    def most_read(self, user: int) -> np.ndarray:
        """int64 [n] the user's training items, highest rating r_ui first (ties: lower itemId
        first), or in itemId order for a model saved without ratings (no seen_values)."""
        start, stop = self.seen_indptr[user], self.seen_indptr[user + 1]
        items = self.seen_indices[start:stop].astype(np.int64)
        if self.seen_values is None or items.size == 0:
            return items
        # A row's items are ascending, so ranking positions breaks ties by the lower itemId.
        positions, _ = topk.top_k_excluding(self.seen_values[None, start:stop], None, items.size)
        return items[positions[0]]

    def seen_matrix(self) -> CsrMatrix:
        """The train matrix's pattern: CsrMatrix [n_users, n_items] (values: ones)."""
        return CsrMatrix(
            np.asarray(self.seen_indptr, np.int64),
            np.asarray(self.seen_indices, np.int64),
            np.ones(len(self.seen_indices), np.float32),
            (len(self.users), len(self.items)),
        )

    def top_k_for_users(self, users: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k itemIds and scores for known userIds, seen items excluded.

        Args:
            users: int [b] userIds.
            k: how many, > 0.

        Returns:
            (ids int64 [b, k], scores float32 [b, k]); ids are -1 (score -inf) past the number
            of items a user has not seen.
        """
        users = np.asarray(users, dtype=np.int64)
        scores = topk.score(self.user_factors[users], self.item_factors)
        return topk.top_k_excluding(scores, self.seen_matrix().take_rows(users), k)

    def popular(self, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k most popular itemIds not in `exclude` (ties: lower id first) and their train
        counts as float32 scores: (ids int64 [k'], scores float32 [k']), k' <= k."""
        counts = np.asarray(self.item_counts, dtype=np.float32)[None, :]
        ids, scores = topk.top_k_excluding(counts, _one_row(exclude), k)
        valid = ids[0] >= 0
        return ids[0][valid], scores[0][valid]

    def recommend(self, visitor_ids: list[str], k: int = 10) -> list[Recommendations]:
        """Top-k unseen content per visitor, in original IDs.

        Visitors not seen at training time get the k most popular items, with known=False.
        """
        if k <= 0:
            raise ValueError(f"k must be > 0, got {k}")
        indices = [self.user_index(visitor) for visitor in visitor_ids]
        known = np.array([u for u in indices if u is not None], dtype=np.int64)
        ids, scores = self.top_k_for_users(known, k) if known.size else (None, None)
        popular_ids, popular_scores = self.popular(k)
        out, row = [], 0
        for visitor, user in zip(visitor_ids, indices):
            if user is None:
                out.append(
                    Recommendations(
                        visitor,
                        [self.items[i] for i in popular_ids],
                        popular_scores.tolist(),
                        False,
                    )
                )
                continue
            valid = ids[row] >= 0
            out.append(
                Recommendations(
                    visitor,
                    [self.items[i] for i in ids[row][valid]],
                    scores[row][valid].tolist(),
                    True,
                )
            )
            row += 1
        return out

    def wals_config(self) -> WALSConfig:
        """The hyperparameters the model was trained with.

        Configs of earlier releases load with their meaning: `feature_wt_factor` and
        `feature_wt_exp` become the fields they meant (`WALSConfig.from_dict`), and a config
        without `binary_target` predates it, when every model fitted r.
        """
        return config_of(self.config)

    def fold_in(self, content_ids: list[str], values: list[float]) -> tuple[np.ndarray, np.ndarray]:
        """Factors of a visitor not seen in training, from what they read, without retraining.

        The values (time on page in ms, or ratings: what preprocessing read) are summed per
        content, scaled exactly as preprocessing scaled them, and the visitor's row is solved
        against the trained item factors (WALS's row projection, `trainer.core.foldin`).
        Unknown content and non-positive sums are ignored.

        Returns:
            (x float32 [k], itemIds int64 [m] used); x is zero when no item is usable.
        """
        totals: dict[int, float] = {}
        for content, value in zip(content_ids, values, strict=True):
            item = self.item_index(content)
            if item is not None:
                totals[item] = totals.get(item, 0.0) + float(value)
        items = np.array(sorted(i for i, v in totals.items() if v > 0), dtype=np.int64)
        raw = np.array([totals[i] for i in items], dtype=np.float32)
        ratings = scaling.scale(raw, self.config["scaling"], self.config["scale_stats"]).numpy()
        rows = foldin.history_row(items, ratings, len(self.items))
        x = foldin.fold_in_rows(rows, self.item_factors, self.item_counts, self.wals_config())
        return x[0], items

    def recommend_for_history(
        self, content_ids: list[str], values: list[float], k: int = 10
    ) -> Recommendations:
        """Top-k for a new visitor from (contentId, time on page) pairs (see `fold_in`).

        Content in the history is never recommended back. With no usable history, the most
        popular content (known=False).
        """
        if k <= 0:
            raise ValueError(f"k must be > 0, got {k}")
        x, items = self.fold_in(content_ids, values)
        exclude = np.array(
            sorted({i for i in (self.item_index(c) for c in content_ids) if i is not None}),
            dtype=np.int64,
        )
        if items.size == 0:
            ids, scores = self.popular(k, exclude)
        else:
            top_ids, top_scores = topk.top_k_excluding(
                topk.score(x[None, :], self.item_factors), _one_row(exclude), k
            )
            valid = top_ids[0] >= 0
            ids, scores = top_ids[0][valid], top_scores[0][valid]
        return Recommendations(
            "", [self.items[i] for i in ids], [float(s) for s in scores], items.size > 0
        )

    def similar_items(self, content_ids: list[str], k: int = 10) -> list[list[tuple[str, float]]]:
        """The k items with the most similar factors (cosine), the item itself excluded.

        Raises:
            KeyError: a contentId is not in the vocabulary.
        """
        if k <= 0:
            raise ValueError(f"k must be > 0, got {k}")
        norms = np.linalg.norm(self.item_factors, axis=1)
        normalized = self.item_factors / np.maximum(norms, 1e-12)[:, None]
        out = []
        for content in content_ids:
            item = self.item_index(content)
            if item is None:
                raise KeyError(f"unknown contentId {content!r}")
            similarity = topk.score(normalized[[item]], normalized)
            ids, scores = topk.top_k_excluding(similarity, _one_row(np.array([item])), k)
            valid = ids[0] >= 0
            out.append([(self.items[i], float(s)) for i, s in zip(ids[0][valid], scores[0][valid])])
        return out


def _one_row(items: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
    """Exclusions (`topk.Exclusions`) of one row: the given itemIds, or None."""
    if items is None:
        return None
    return np.array([0, len(items)], dtype=np.int64), np.asarray(items, dtype=np.int64)


def vocabulary_to_bytes(ids: list[str]) -> bytes:
    r"""A vocabulary file's contents: each ID in UTF-8 followed by '\n' (as TF Transform writes).

    Raises:
        ValueError: an ID holds '\n' or '\r', which a line-based vocabulary cannot hold
            (preprocessing rejects such IDs as `bad_id:line_break`).
    """
    for value in ids:
        if "\n" in value or "\r" in value:
            raise ValueError(f"ID {value!r} holds a line break; a vocabulary file cannot hold it")
    return "".join(f"{value}\n" for value in ids).encode("utf-8")


def vocabulary_from_bytes(data: bytes) -> list[str]:
    r"""The IDs of a vocabulary file, line number = index.

    Lines end at '\n' only, like `tf.lookup.TextFileInitializer` and TF Transform read them.
    `str.splitlines()` would also split IDs at U+2028, U+2029, U+0085, \x0b, \x0c and
    \x1c-\x1e, which IDs may hold.
    """
    lines = data.decode("utf-8").split("\n")
    if lines[-1] == "":
        lines.pop()  # The final '\n' ends the last ID; it does not start another.
    return lines


def _write_bytes(path: str, data: bytes) -> None:
    with FileSystems.create(path) as handle:
        handle.write(data)


def _read_bytes(path: str) -> bytes:
    with FileSystems.open(path) as handle:
        return handle.read()


def save(model: WALSModel, model_dir: str) -> None:
    """Writes the model under `<model_dir>/model/` (local or any Beam filesystem)."""
    directory = f"{model_dir.rstrip('/')}/{MODEL_SUBDIR}"
    if "://" not in directory:
        os.makedirs(directory, exist_ok=True)
    for name in _ARRAYS + _OPTIONAL_ARRAYS:
        if getattr(model, name) is None:
            continue
        buffer = io.BytesIO()
        np.save(buffer, getattr(model, name))
        _write_bytes(f"{directory}/{name}.npy", buffer.getvalue())
    _write_bytes(f"{directory}/vocab_users.txt", vocabulary_to_bytes(model.users))
    _write_bytes(f"{directory}/vocab_items.txt", vocabulary_to_bytes(model.items))
    write_config(model_dir, model.config)


def write_config(model_dir: str, config: dict) -> None:
    """Writes `<model_dir>/model/config.json` alone, the bytes `save` writes for it (the
    distributed trainer's launcher writes it; its workers write the arrays)."""
    directory = f"{model_dir.rstrip('/')}/{MODEL_SUBDIR}"
    if "://" not in directory:
        os.makedirs(directory, exist_ok=True)
    _write_bytes(f"{directory}/config.json", json.dumps(config, indent=2).encode())


def read_config(model_dir: str) -> dict:
    """The model's config.json alone (hyperparameters, `latent_factors` among them), without
    reading its factors or vocabularies: what a launcher may read of a model of any size.

    Raises:
        FileNotFoundError: model_dir holds no finished model.
    """
    path = f"{model_dir.rstrip('/')}/{MODEL_SUBDIR}/config.json"
    if not FileSystems.exists(path):
        raise FileNotFoundError(f"no trained model under {model_dir} (missing {path})")
    return json.loads(_read_bytes(path))


def config_of(config: dict) -> WALSConfig:
    """The WALSConfig of a model's config.json (`WALSModel.wals_config`'s rule)."""
    return WALSConfig.from_dict({"binary_target": False, **config})


def array_file(model_dir: str, name: str) -> str:
    """The path of one of a model's arrays, e.g. array_file(d, "item_factors")."""
    return f"{model_dir.rstrip('/')}/{MODEL_SUBDIR}/{name}.npy"


def array_shape(model_dir: str, name: str) -> tuple[int, ...]:
    """The shape of one of a model's arrays, from its .npy header alone (a few hundred bytes
    read, whatever the array's size)."""
    path = array_file(model_dir, name)
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return read_npy_header(handle, path)[0]


def read_npy_header(handle, path: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of an open .npy file, leaving it at the data."""
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(handle)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(handle)
    raise ValueError(f"{path}: .npy format version {version} is not supported")


def load(model_dir: str) -> WALSModel:
    """Loads a model written by `save` (the trainer's --output_dir).

    Raises:
        FileNotFoundError: model_dir holds no finished model.
    """
    directory = f"{model_dir.rstrip('/')}/{MODEL_SUBDIR}"
    if not FileSystems.exists(f"{directory}/config.json"):
        raise FileNotFoundError(f"no trained model under {model_dir} (missing {directory})")
    arrays = {
        name: np.load(io.BytesIO(_read_bytes(f"{directory}/{name}.npy")))
        for name in _ARRAYS + _OPTIONAL_ARRAYS
        if name in _ARRAYS or FileSystems.exists(f"{directory}/{name}.npy")
    }
    users = vocabulary_from_bytes(_read_bytes(f"{directory}/vocab_users.txt"))
    items = vocabulary_from_bytes(_read_bytes(f"{directory}/vocab_items.txt"))
    config = json.loads(_read_bytes(f"{directory}/config.json"))
    return WALSModel(users=users, items=items, config=config, **arrays)
