"""Which WALS defaults generalise: a bounded study on synthetic GA360 samples.

Why does the synthetic sample prefer the graded target (fit r, w0 0.5, λ 0.01) while two real
datasets preferred `--binary_target` with a lower w0 and a higher λ? Two candidate causes:

  * the dwell-time model: `pipeline.synthetic` draws dwell time lognormal with a median that
    grows with the visitor's affinity for the topic (`DWELL_AFFINITY`), and the 15% of reads
    picked by global popularity have affinity 0. So r carries the taste signal: fitting r
    discounts the noise reads that a binary target would fit as 1. `--dwell flat` sets
    DWELL_AFFINITY = 0 (dwell independent of taste), as dwell is on much real data;
  * the rating scale: under `median` scaling a median read rates 0.3, so a graded target is
    about 0.3x a binary one; since scaling the target by c is the same problem with λ and w0
    relatively c² larger... the binary target needs a larger λ to be regularised alike.

For each synthetic shape x seed x dwell model, the sessions are aggregated with the product's
own parser (`pipeline.records.events_from_session`), split with the product's hashes
(`pipeline.holdout`, `pipeline.events.is_eval`), scaled as preprocessing does (median scaling),
and every config of `CONFIGS` is trained on the train split less a validation share and scored
on validation only, never on eval:

  known visitors: Recall@20 / NDCG@20 on a hash-chosen 10% of the train pairs (held out of the
                  fit), training items excluded;
  new visitors:   a hash-chosen half of the held-out visitors (the other half, the test
                  visitors, is never looked at), folded in from 80% of their cells
                  (`trainer.evaluation.new_visitors.evaluate`) and scored on the rest.

    python -m benchmarks.defaults_study [--seeds 2] [--json_out study.json]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import statistics
import time

import numpy as np

from pipeline import events as events_lib
from pipeline import holdout, records, synthetic, synthetic_sessions
from trainer.core import metrics, seeding
from trainer.core.objective import WALSConfig
from trainer.core.sparse import CsrMatrix
from trainer.evaluation import heldout_visitors, new_visitors
from trainer.local import train as local_train
from transforms import features

logger = logging.getLogger(__name__)

KS = (20,)
HOLDOUT_VISITORS = 0.2
FOLDIN = 0.8
VALIDATION = 0.1  # share of the train pairs scored for the known-visitor protocol
# (name, sessions, items, topics): the default shape, a denser and a sparser catalogue.
SHAPES = (
    ("default", 8000, 2000, 20),
    ("dense", 8000, 800, 10),
    ("sparse", 8000, 4000, 40),
)
DWELLS = {"informative": synthetic_sessions.DWELL_AFFINITY, "flat": 0.0}
BASE = {"latent_factors": 32, "num_iters": 15}
CONFIGS = {
    "default (r, w0 .5, λ .01)": {},
    "r, w0 .1, λ .01": {"unobserved_weight": 0.1},
    "r, w0 .5, λ .03": {"regularization": 0.03},
    "binary, w0 .5, λ .01": {"binary_target": True},
    "binary, w0 .5, λ .03": {"binary_target": True, "regularization": 0.03},
    "binary, w0 .1, λ .01": {"binary_target": True, "unobserved_weight": 0.1},
    "binary, w0 .1, λ .03": {
        "binary_target": True,
        "unobserved_weight": 0.1,
        "regularization": 0.03,
    },
    "binary, w0 .1, λ .1": {"binary_target": True, "unobserved_weight": 0.1, "regularization": 0.1},
    "binary, w0 .3, λ .03": {
        "binary_target": True,
        "unobserved_weight": 0.3,
        "regularization": 0.03,
    },
}


@dataclasses.dataclass
class Splits:
    """One synthetic dataset, split for the study (validation parts only are scored)."""

    fit: CsrMatrix  # train pairs less validation, [n_users, n_items]
    validation: CsrMatrix  # the validation pairs of known users
    visitors: list[str]  # userId -> visitorId
    new: heldout_visitors.HeldOutVisitors  # validation held-out visitors


def _unit(text: str) -> float:
    return holdout._unit_hash(text)


def make_splits(sessions: int, items: int, topics: int, seed: int) -> Splits:
    """Sessions -> summed durations -> the product's splits -> median-scaled matrices."""
    config = records.SessionConfig()
    sums: dict[tuple[str, str], float] = collections.defaultdict(float)
    for session in synthetic.generate_sessions(sessions, seed, num_items=items, num_topics=topics):
        for visitor, content, duration in records.events_from_session(session, config)[0]:
            sums[(visitor, content)] += duration
    train, heldout = {}, {}
    for (visitor, content), value in sums.items():
        if value <= 0:
            continue
        if holdout.is_heldout_visitor(visitor, HOLDOUT_VISITORS):
            heldout[(visitor, content)] = value
        elif not events_lib.is_eval(visitor, content, 0.1):  # the eval split is never used
            train[(visitor, content)] = value
    median = statistics.median(train.values())
    users = sorted({v for v, _ in train})
    contents = sorted({c for _, c in train})
    user_index = {v: j for j, v in enumerate(users)}
    item_index = {c: j for j, c in enumerate(contents)}

    def rating(value: float) -> float:
        return min(features.MEDIAN_RATING * value / median, 1.0)

    fit, validation = [], []
    for (visitor, content), value in train.items():
        in_validation = _unit(f"study-validation\x1f{visitor}\x1f{content}") < VALIDATION
        cell = (user_index[visitor], item_index[content], rating(value))
        (validation if in_validation else fit).append(cell)
    shape = (len(users), len(contents))

    def matrix(cells) -> CsrMatrix:
        rows, cols, values = (np.array(column) for column in zip(*cells, strict=True))
        return CsrMatrix.from_triples(rows, cols, values.astype(np.float32), shape)

    parts: dict[str, dict[str, list]] = {"foldin": {}, "target": {}}
    for (visitor, content), value in heldout.items():
        # Validation visitors only: the other half of the held-out visitors is the test set.
        if content not in item_index or _unit(f"study-new\x1f{visitor}") >= 0.5:
            continue
        part = "foldin" if holdout.is_foldin(visitor, content, FOLDIN) else "target"
        parts[part].setdefault(visitor, []).append((item_index[content], rating(value), value))
    rows = []
    for visitor in sorted(set(parts["foldin"]) & set(parts["target"])):
        row = [visitor]
        for part in ("foldin", "target"):
            cells = sorted(parts[part][visitor])
            row.append(tuple(np.array([c[j] for c in cells]) for j in range(3)))
        rows.append(tuple(row))
    names, foldin, target, raw = heldout_visitors.assemble(rows, len(contents))
    held_out = heldout_visitors.HeldOutVisitors(names, foldin, target, raw)
    return Splits(matrix(fit), matrix(validation), users, held_out)


def score(splits: Splits, overrides: dict) -> dict[str, float]:
    """Trains one config on the fit split; Recall@20 and NDCG@20 on both validation parts."""
    config = WALSConfig(**BASE, **overrides)
    factors = local_train.fit(
        splits.fit, config, show_progress=False, user_keys=seeding.id_keys(splits.visitors)
    )
    x, y = factors.user_factors, factors.item_factors
    known = metrics.evaluate(lambda u: x[u] @ y.T, splits.fit, splits.validation, ks=KS)
    new = new_visitors.evaluate(splits.new, y, splits.fit.col_counts(), config, ks=KS)
    return {
        "known_recall@20": known["recall@20"],
        "known_ndcg@20": known["ndcg@20"],
        "new_recall@20": new["wals"]["recall@20"],
        "new_ndcg@20": new["wals"]["ndcg@20"],
        "new_visitors": new["visitors"],
    }


def run(seeds: int = 2) -> dict:
    """Every (shape, seed, dwell model) x config; returns the table and a summary."""
    rows = []
    default_affinity = synthetic_sessions.DWELL_AFFINITY
    try:
        for dwell, affinity in DWELLS.items():
            synthetic_sessions.DWELL_AFFINITY = affinity  # read at each draw by the session maker
            for shape, sessions, items, topics in SHAPES:
                for seed in range(seeds):
                    start = time.perf_counter()
                    splits = make_splits(sessions, items, topics, seed)
                    for name, overrides in CONFIGS.items():
                        result = score(splits, overrides)
                        rows.append(
                            {"dwell": dwell, "shape": shape, "seed": seed, "config": name, **result}
                        )
                    logger.info(
                        "%s dwell, %s, seed %d: %s x %s, %.0f s",
                        dwell,
                        shape,
                        seed,
                        splits.fit.shape,
                        len(CONFIGS),
                        time.perf_counter() - start,
                    )
    finally:
        synthetic_sessions.DWELL_AFFINITY = default_affinity
    return {"rows": rows, "summary": summarise(rows)}


def summarise(rows: list[dict]) -> dict:
    """Per dwell model and protocol: each config's mean Recall@20 relative to the default's on
    the same dataset, and how often it is the best of the grid."""
    out = {}
    default = next(iter(CONFIGS))
    for dwell in DWELLS:
        for protocol in ("known", "new"):
            metric = f"{protocol}_recall@20"
            datasets = collections.defaultdict(dict)
            for row in rows:
                if row["dwell"] == dwell:
                    datasets[(row["shape"], row["seed"])][row["config"]] = row[metric]
            relative = {
                name: float(np.mean([d[name] / d[default] for d in datasets.values()]))
                for name in CONFIGS
            }
            wins = collections.Counter(max(d, key=d.get) for d in datasets.values())
            out[f"{dwell}/{protocol}"] = {"relative_to_default": relative, "wins": dict(wins)}
    return out


def format_summary(summary: dict) -> str:
    names = list(CONFIGS)
    columns = list(summary)
    lines = [f"{'Recall@20 / default':<28}" + "".join(f"{c:>20}" for c in columns)]
    for name in names:
        cells = []
        for column in columns:
            entry = summary[column]
            wins = entry["wins"].get(name, 0)
            cells.append(f"{entry['relative_to_default'][name]:>14.3f} ({wins:>2})")
        lines.append(f"{name:<28}" + "".join(f"{c:>20}" for c in cells))
    lines.append(
        "(mean over shapes x seeds of Recall@20 / the default's; in brackets: best of grid)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2, help="seeds per shape (default 2)")
    parser.add_argument("--json_out", help="also write the rows and the summary as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = run(args.seeds)
    print(format_summary(result["summary"]))
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
