"""trainer.batch_predict's output formats: lossless for every ID, in the documented layout.

A hand-built model whose IDs hold tabs, commas, quotes, backslashes, U+2028 and the other
characters `str.splitlines()` splits on, NUL and non-ASCII; the expected rankings come from
plain NumPy over the dense factors.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from trainer import batch_predict
from trainer.serving import model as model_lib
from trainer.serving import predictions

USERS = [
    "a,b",
    "tab\there",
    '"quoted"',
    "line\u2028sep",
    "para\u2029sep",
    "nel\x85x",
    "vt\x0bff\x0c",
    "fs\x1cgs\x1drs\x1e",
    "back\\slash",
    "nul\x00x",
    "Zürich 中文 😀",
    "NA",
    '[""]',
    " spaced ",
]
ITEMS = [f"c{n}{user}" for n, user in enumerate(USERS)] + ["plain", ",", '"', "\t"]
N_USERS, N_ITEMS, K = len(USERS), len(ITEMS), 4
RNG = np.random.default_rng(11)
# Integer factors: exact scores, so the float64 oracle and the float32 model agree bit for bit.
USER_FACTORS = RNG.integers(-2, 3, (N_USERS, 3)).astype(np.float32)
ITEM_FACTORS = RNG.integers(-2, 3, (N_ITEMS, 3)).astype(np.float32)
SEEN = [sorted(RNG.choice(N_ITEMS, size=u % 4, replace=False).tolist()) for u in range(N_USERS)]


@pytest.fixture()
def model_dir(tmp_path) -> str:
    indptr = np.concatenate([[0], np.cumsum([len(s) for s in SEEN])]).astype(np.int64)
    indices = np.concatenate([np.asarray(s, np.int32) for s in SEEN])
    model = model_lib.WALSModel(
        user_factors=USER_FACTORS,
        item_factors=ITEM_FACTORS,
        seen_indptr=indptr,
        seen_indices=indices,
        item_counts=np.bincount(indices, minlength=N_ITEMS).astype(np.int64),
        users=USERS,
        items=ITEMS,
        config={"latent_factors": 3},
    )
    out = str(tmp_path / "model")
    model_lib.save(model, out)
    return out


def oracle(targeting: bool, k: int) -> list[tuple[str, list[str], list[float]]]:
    """(key, ranked IDs, scores) per visitor (content), seen pairs left out, ties: lower id."""
    scores = USER_FACTORS.astype(np.float64) @ ITEM_FACTORS.astype(np.float64).T
    seen = {(u, i) for u in range(N_USERS) for i in SEEN[u]}
    keys, names = (ITEMS, USERS) if targeting else (USERS, ITEMS)
    table = scores.T if targeting else scores
    out = []
    for row, key in enumerate(keys):
        eligible = [
            c for c in range(len(names)) if ((c, row) if targeting else (row, c)) not in seen
        ]
        ranked = sorted(eligible, key=lambda c: (-table[row, c], c))[:k]
        out.append((key, [names[c] for c in ranked], [float(table[row, c]) for c in ranked]))
    return out


def predict(model_dir: str, out: str, *flags: str) -> int:
    return batch_predict.run(["--model_dir", model_dir, "--output", out, "--no_progress", *flags])


@pytest.mark.parametrize("targeting", [False, True], ids=["visitors", "targeting"])
@pytest.mark.parametrize("output_format", ["tsv", "jsonl"])
def test_every_id_reads_back_exactly(model_dir, tmp_path, output_format, targeting):
    out = str(tmp_path / f"out.{output_format}")
    flags = ["--k", str(K), "--format", output_format] + (["--targeting"] if targeting else [])
    expected = oracle(targeting, K)
    assert predict(model_dir, out, *flags) == len(expected)
    rows = list(predictions.read_predictions(out))
    assert [(row.key, row.ranked) for row in rows] == [(key, ids) for key, ids, _ in expected]
    assert all(row.targeting == targeting for row in rows)
    for row, (_, _, scores) in zip(rows, expected):
        assert row.scores == (None if output_format == "tsv" else scores)


def test_tsv_layout_is_the_documented_rule(model_dir, tmp_path):
    out = tmp_path / "recs.tsv"
    predict(model_dir, str(out), "--k", "2")
    raw = out.read_bytes()
    lines = raw.split(b"\n")
    assert lines[-1] == b"" and len(lines) == N_USERS + 2, "a header, one line per visitor"
    assert lines[0] == b"visitorId\tcontentIds"
    expected = oracle(False, 2)
    for line, (key, ids, _) in zip(lines[1:], expected):
        # Quote a field holding a tab or '"' (doubling every '"'); the list is a JSON array.
        fields = [key, json.dumps(ids, ensure_ascii=False)]
        quoted = [
            f'"{f.replace(chr(34), 2 * chr(34))}"' if "\t" in f or '"' in f else f for f in fields
        ]
        assert line.decode("utf-8") == "\t".join(quoted)
    # Spelled out for two of the visitors.
    assert lines[1].decode() == 'a,b\t"[' + ", ".join(f'""{c}""' for c in expected[0][1]) + ']"'
    assert lines[2].decode().startswith('"tab\there"\t"[""')


def test_tsv_reads_back_in_pandas(model_dir, tmp_path):
    pd = pytest.importorskip("pandas")
    out = tmp_path / "recs.tsv"
    predict(model_dir, str(out), "--k", str(K))
    frame = pd.read_csv(out, sep="\t", dtype=str, keep_default_na=False, quoting=csv.QUOTE_MINIMAL)
    assert list(frame.columns) == ["visitorId", "contentIds"]
    assert list(frame["visitorId"]) == USERS
    assert [json.loads(ids) for ids in frame["contentIds"]] == [
        ids for _, ids, _ in oracle(False, K)
    ]


def test_jsonl_holds_line_separators_raw_and_one_record_per_newline(model_dir, tmp_path):
    out = tmp_path / "recs.jsonl"
    predict(model_dir, str(out), "--k", str(K), "--format", "jsonl")
    text = out.read_text(encoding="utf-8")
    assert "line\u2028sep" in text, "ensure_ascii=False: non-ASCII stays as it is"
    assert len(text.split("\n")) == N_USERS + 1
    assert len(text.splitlines()) > N_USERS, "str.splitlines() would break records apart"
    assert [json.loads(line)["visitorId"] for line in text.split("\n")[:-1]] == USERS


def test_read_predictions_refuses_what_it_cannot_read(tmp_path):
    old = tmp_path / "old.tsv"
    old.write_text("v1\tc1,c2\n", encoding="utf-8")  # The former, ambiguous layout.
    with pytest.raises(ValueError, match="not a batch-prediction TSV"):
        list(predictions.read_predictions(str(old)))
    broken = tmp_path / "broken.tsv"
    broken.write_text('visitorId\tcontentIds\nv1\t["c1"]\textra\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2 has 3 fields"):
        list(predictions.read_predictions(str(broken)))
    with pytest.raises(ValueError, match="unknown format"):
        list(predictions.read_predictions(str(old), "parquet"))
