"""The trained model: factors, vocabularies and what is needed to recommend in original IDs.

    model = trainer.serving.model.load("runs/local/model")
    model.recommend(["7291783718742811253"], k=10)   # -> [Recommendations(...)]
    model.similar_items(["article-0042"], k=5)

On disk, under `<model_dir>/model/`:
    user_factors.npy     float32 [nusers, k]   X, row u = visitor vocab_users[u]
    item_factors.npy     float32 [nitems, k]   Y, row i = content vocab_items[i]
    seen_indptr.npy      int64 [nusers + 1]    the train matrix's rows (CSR), so that items a
    seen_indices.npy     int32 [nnz]           visitor has already seen are never recommended
    item_counts.npy      int64 [nitems]        train users per item (popularity; fold-in weights)
    vocab_users.txt      one visitorId per line, line number = userId
    vocab_items.txt      one contentId per line, line number = itemId
                         (UTF-8, each line ended by '\n' and split on '\n' only: see
                         `vocabulary_from_bytes`)
    config.json          hyperparameters, the rating scaling and its statistics
"""

from __future__ import annotations

import dataclasses
import io
import json
import os

import numpy as np
from apache_beam.io.filesystems import FileSystems

from trainer.core import metrics
from trainer.core.config import WALSConfig
from trainer.core.foldin import fold_in
from trainer.core.sparse import CsrMatrix
from transforms import scaling

MODEL_SUBDIR = "model"
_ARRAYS = ("user_factors", "item_factors", "seen_indptr", "seen_indices", "item_counts")


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

    def __post_init__(self):
        self._user_index = {visitor: u for u, visitor in enumerate(self.users)}
        self._item_index = {content: i for i, content in enumerate(self.items)}

    def user_index(self, visitor_id: str) -> int | None:
        return self._user_index.get(visitor_id)

    def item_index(self, content_id: str) -> int | None:
        return self._item_index.get(content_id)

    def seen(self, user: int) -> np.ndarray:
        """int [n] itemIds the user has in the train matrix."""
        return self.seen_indices[self.seen_indptr[user] : self.seen_indptr[user + 1]]

    def top_k_for_users(self, users: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k itemIds and scores for known userIds, seen items excluded.

        Args:
            users: int [b] userIds.
            k: how many, > 0.

        Returns:
            (ids int64 [b, k], scores float32 [b, k]); ids are -1 (score -inf) past the number
            of items a user has not seen.
        """
        scores = self.user_factors[users] @ self.item_factors.T
        starts, stops = self.seen_indptr[users], self.seen_indptr[users + 1]
        indptr = np.concatenate([[0], np.cumsum(stops - starts)])
        seen = np.concatenate([self.seen_indices[a:b] for a, b in zip(starts, stops)] or [[]])
        exclude = CsrMatrix(
            indptr,
            seen.astype(np.int64),
            np.ones(seen.size, np.float32),
            (len(users), len(self.items)),
        )
        return metrics.top_k_excluding(scores, exclude, k)

    def popular(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k most popular itemIds (ties: lower id first) and their train counts."""
        order = np.lexsort((np.arange(len(self.items)), -self.item_counts))[:k]
        return order, self.item_counts[order].astype(np.float32)

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
        return WALSConfig.from_dict({"binary_target": False, **self.config})

    def fold_in(self, content_ids: list[str], values: list[float]) -> tuple[np.ndarray, np.ndarray]:
        """Factors of a visitor not seen in training, from what they read, without retraining.

        The values (time on page in ms, or ratings: what preprocessing read) are summed per
        content, scaled exactly as preprocessing scaled them, and the visitor's row is solved
        against the trained item factors (WALS's row projection, `trainer.local.train.fold_in`).
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
        x = fold_in(
            self.item_factors, None, items, ratings, self.item_counts, self.wals_config()
        )
        return x.astype(np.float32), items

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
        exclude = {i for i in (self.item_index(c) for c in content_ids) if i is not None}
        if items.size == 0:
            order, scores = self.popular(len(self.items))
        else:
            scores = (self.item_factors @ x).astype(np.float32)
            order = np.lexsort((np.arange(len(self.items)), -scores))
            scores = scores[order]
        keep = [j for j, i in enumerate(order) if i not in exclude][:k]
        return Recommendations(
            "",
            [self.items[order[j]] for j in keep],
            [float(scores[j]) for j in keep],
            items.size > 0,
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
            similarity = normalized @ normalized[item]
            similarity[item] = -np.inf
            top = np.argsort(-similarity, kind="stable")[:k]
            out.append([(self.items[i], float(similarity[i])) for i in top])
        return out


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
    for name in _ARRAYS:
        buffer = io.BytesIO()
        np.save(buffer, getattr(model, name))
        _write_bytes(f"{directory}/{name}.npy", buffer.getvalue())
    _write_bytes(f"{directory}/vocab_users.txt", vocabulary_to_bytes(model.users))
    _write_bytes(f"{directory}/vocab_items.txt", vocabulary_to_bytes(model.items))
    _write_bytes(f"{directory}/config.json", json.dumps(model.config, indent=2).encode())


def load(model_dir: str) -> WALSModel:
    """Loads a model written by `save` (the trainer's --output_dir).

    Raises:
        FileNotFoundError: model_dir holds no finished model.
    """
    directory = f"{model_dir.rstrip('/')}/{MODEL_SUBDIR}"
    if not FileSystems.exists(f"{directory}/config.json"):
        raise FileNotFoundError(f"no trained model under {model_dir} (missing {directory})")
    arrays = {name: np.load(io.BytesIO(_read_bytes(f"{directory}/{name}.npy"))) for name in _ARRAYS}
    users = vocabulary_from_bytes(_read_bytes(f"{directory}/vocab_users.txt"))
    items = vocabulary_from_bytes(_read_bytes(f"{directory}/vocab_items.txt"))
    config = json.loads(_read_bytes(f"{directory}/config.json"))
    return WALSModel(users=users, items=items, config=config, **arrays)
