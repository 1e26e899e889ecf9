"""trainer.show on a trained model: the "seen" column lists what each visitor read most (their
own highest ratings first), "read by" the visitors who read a content most; checked against the
training rows of the preprocessed dataset, sorted in plain Python."""

from __future__ import annotations

import io

import pytest

from trainer import batch_predict, show
from trainer.local import dataset as data
from trainer.serving import model as model_lib

VISITORS = 4


def shown(text: str, label: str) -> dict[str, list[str]]:
    """{key: the IDs after "label:"} from show's blocks ("  key\\n    label: a, b ...")."""
    lines = text.splitlines()
    out = {}
    for j, line in enumerate(lines):
        if line.strip().startswith(f"{label}:"):
            ids = line.strip()[len(label) + 1 :].strip().removesuffix(" ...")
            out[lines[j - 1].strip()] = ids.split(", ")
    return out


def by_rating(pairs: list[tuple[int, float]]) -> list[int]:
    """Indices by rating descending, ties to the lower index."""
    return [index for index, _ in sorted(pairs, key=lambda pair: (-pair[1], pair[0]))]


@pytest.mark.parametrize("targeting", [False, True])
def test_show_lists_what_each_visitor_read_most(tiny_model, tiny_preprocessed, tmp_path, targeting):
    out = str(tmp_path / "recs.tsv")
    flags = ["--model_dir", tiny_model, "--output", out, "--k", "5", "--no_progress"]
    batch_predict.run(flags + (["--targeting"] if targeting else []))
    buffer = io.StringIO()
    show.show(tiny_model, out, visitors=VISITORS, out=buffer)
    text = buffer.getvalue()
    train = data.load_dataset(tiny_preprocessed).train
    model = model_lib.load(tiny_model)

    if not targeting:
        seen = shown(text, "seen")
        assert len(seen) == VISITORS
        for visitor, listed in seen.items():
            u = model.user_index(visitor)
            span = slice(train.indptr[u], train.indptr[u + 1])
            row = list(zip(train.indices[span].tolist(), train.values[span].tolist()))
            expected = [model.items[i] for i in by_rating(row)][: show.SHOWN]
            assert listed == expected, visitor
        # Heavy readers no longer all show the catalogue's most popular items.
        assert len({tuple(listed) for listed in seen.values()}) == VISITORS
    else:
        readers = shown(text, "read by")
        assert len(readers) == VISITORS
        for content, listed in readers.items():
            i = model.item_index(content)
            cells = [
                (u, float(train.values[j]))
                for u in range(train.shape[0])
                for j in range(train.indptr[u], train.indptr[u + 1])
                if train.indices[j] == i
            ]
            assert listed == [model.users[u] for u in by_rating(cells)][: show.SHOWN], content
