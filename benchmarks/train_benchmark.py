"""Training speed and ranking quality of our WALS trainer against implicit and Spark MLlib ALS.

Every model trains on the same synthetic matrix (`benchmarks.matrices`), the same per-cell
train split, the same k and number of iterations, with 2 threads each:

  * ours:     `trainer.local.train.fit`, conjugate gradient and Cholesky, TensorFlow on 2 threads;
  * implicit: `implicit.cpu.als.AlternatingLeastSquares`, CG and Cholesky, num_threads=2 with
              BLAS pinned to 1 thread (implicit's own advice);
  * spark:    `pyspark.ml.recommendation.ALS(implicitPrefs=True)` on `local[2]`.

All three minimise the same weighted square loss over the full matrix: with r the scaled rating
in (0, 1] and α the confidence scale, Hu, Koren & Volinsky's model (preference 1, weight 1 + α r
on observed cells, preference 0 and weight 1 elsewhere; implicit is given the matrix 1 + α r
since it takes the weight itself; ours runs with `weighting="confidence"`, w0 = 1 and
`binary_target=True`).

Tuning: each model gets an equal grid (4 regularization values half a decade apart x 3
confidence scales α; see `GRIDS`), fitted with its CG solver (Spark: its only solver) on --size's
training cells less a validation tenth and scored on that tenth (--tune_on validation, the
default), or on the small matrix (--tune_on small); the setting with the best NDCG@20 is then
used for the timed runs. A best point on the edge of an axis (`edge_axes`) is logged as a warning,
flagged in the table and recorded in the result's "edges": the grid should then be widened.
Tuning runs once; `--tune_only --json_out tuned.json` stops there and `--chosen_from tuned.json`
times the chosen settings without tuning again, so that a long campaign can run in parts. Before
tuning, every (model, solver) is warmed up (TensorFlow tracing, JVM JIT) by an untimed
2-iteration fit on the small matrix, and again by an untimed 1-iteration fit on the timed matrix
(our CG kernel compiles once per tile shape; the warm-up's time is reported as warmup_seconds).
Models run one after another, never concurrently.

Timing is the wall time of the fit call divided by the number of iterations, over --repeats
fits (default 3; fit r initialised with seed + r): every figure of a row (seconds per iteration,
Recall@20, NDCG@20, new R@20, new N@20) is the median of the fits', with its minimum and maximum
(`_min`, `_max` in the JSON). For ours and implicit it includes their internal set-up (our row
layout and weights, implicit's transpose); for Spark it starts from a cached, materialised
DataFrame in an already running session and ends when both factor tables are materialised.
Quality is `trainer.core.metrics.evaluate` on the held-out cells with training items excluded, the
same code for every model: Recall@20 and NDCG@20.

Two protocols, on one split: before the per-cell split, a seeded --holdout_users share of the
users (default 0.1) is held out whole ("strong generalization", Liang et al. 2018, Rendle et al.
2022): no model trains on them. Each held-out user's cells are split into a fold-in part (80%)
and a target part; after training, every model folds the held-out users in from their fold-in
part with its own exact row solve against its fixed item factors (ours:
`trainer.core.foldin.fold_in_rows`; implicit: `recalculate_user`, the batched form of
`recommend(..., recalculate_user=True)`; Spark has none, "-"), ranks every item but the fold-in
ones and is scored on the target part (new Recall@20, new NDCG@20), as is popularity.

    python -m benchmarks.train_benchmark --size small|large [--k 64] [--iters 10]
        [--skip ours|implicit|spark ...] [--repeats 3] [--tune_on validation|small]
        [--holdout_users 0.1] [--tune_only] [--chosen_from tuned.json] [--json_out results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from benchmarks import matrices
from benchmarks.measure import blas_threads
from trainer.core import metrics, topk
from trainer.core.sparse import CsrMatrix

logger = logging.getLogger(__name__)

THREADS = 2
EVAL_FRACTION = 0.2
KS = (20,)
PRIMARY_METRIC = "ndcg@20"
# Tuning on a validation split of the timed matrix: its share of the training cells, and the
# number of users whose validation cells are scored (a sample, to keep tuning affordable).
VALIDATION_FRACTION = 0.1
TUNE_USERS = 20_000
# Iterations of the untimed warm-up fit on the small matrix (tracing, JIT, caches).
WARMUP_ITERS = 2
# Held-out users: the default share, and the share of each one's cells that is folded in.
HOLDOUT_USERS = 0.1
HOLDOUT_FOLDIN = 0.8

OURS = "ours"
IMPLICIT = "implicit"
SPARK = "spark"
PEERS = (IMPLICIT, SPARK)
MODELS = (OURS, *PEERS)

# The tuning grid of each model: every combination is fitted once, regularization values half a
# decade apart x confidence scales α. Ours is set up as the same model as implicit's (below), so
# it gets implicit's grid; Spark scales λ by each row's count (ALS-WR), hence its own range. Each
# axis is wide enough that the best point of the large benchmark's tuning lies inside it, not on
# its edge (`edge_axes` checks this on every run and the result records it).
GRIDS: dict[str, dict[str, Sequence[float]]] = {
    OURS: {"regularization": (100.0, 300.0, 1000.0, 3000.0), "alpha": (3.0, 10.0, 40.0)},
    IMPLICIT: {"regularization": (100.0, 300.0, 1000.0, 3000.0), "alpha": (3.0, 10.0, 40.0)},
    SPARK: {"regularization": (0.1, 0.3, 1.0, 3.0), "alpha": (3.0, 10.0, 40.0)},
}
# Our trainer's fixed settings: Hu, Koren & Volinsky's model, as the peers fit it: target 1 on
# observed cells (binary_target), weight 1 + α r there (confidence weighting, w0 = 1) and 1
# elsewhere, plain λ (ν = 0). Same objective as implicit's, so differences are the solvers'.
OURS_FIXED = {
    "weighting": "confidence",
    "unobserved_weight": 1.0,
    "regularization_exp": 0.0,
    "binary_target": True,
}


@dataclasses.dataclass
class Fitted:
    """A trained model: factors and the wall time of its fit call.

    Attributes:
        user_factors: float32 [n_users, k].
        item_factors: float32 [n_items, k].
        seconds: wall time of the fit, excluding data conversion.
        loss_seconds: for ours, the time of one training-loss evaluation, which `local_train.fit`
            runs after every iteration (the peers compute no loss); None for the peers.
        fold_in: new users' rows CsrMatrix [n, n_items] -> their factors float32 [n, k], the
            model's own exact row solve against its item factors; None when it has none.
    """

    user_factors: np.ndarray
    item_factors: np.ndarray
    seconds: float
    loss_seconds: float | None = None
    fold_in: Callable[[CsrMatrix], np.ndarray] | None = None


# fit(train, params, solver, k, iters, seed) -> Fitted.
FitFn = Callable[[CsrMatrix, dict, str, int, int, int], Fitted]


def _set_tensorflow_threads(threads: int) -> None:
    """Pins TensorFlow's intra- and inter-op pools; must run before TensorFlow starts."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        logger.warning(
            "TensorFlow was already initialised; it runs with %d intra-op threads, not %d",
            tf.config.threading.get_intra_op_parallelism_threads(),
            threads,
        )


def fit_ours(train: CsrMatrix, params: dict, solver: str, k: int, iters: int, seed: int) -> Fitted:
    """Fits `trainer.local.train` with `OURS_FIXED` and confidence weighting f = α r.

    Args:
        train: the training matrix.
        params: {"regularization": λ, "alpha": α}.
        solver: "cg" or "cholesky".
        k: latent factors.
        iters: alternating sweeps.
        seed: the factors' initialisation seed.
    """
    import tensorflow as tf

    from trainer.core import loss as wals_loss
    from trainer.core import problem
    from trainer.core.objective import WALSConfig
    from trainer.local import train as local_train

    config = WALSConfig(
        latent_factors=k,
        num_iters=iters,
        solver=solver,
        confidence_alpha=params["alpha"],
        regularization=params["regularization"],
        seed=seed,
        **OURS_FIXED,
    )
    with blas_threads(THREADS):
        start = time.perf_counter()
        # Like the peers (implicit's calculate_training_loss=False), no loss per iteration.
        factors = local_train.fit(train, config, show_progress=False, compute_loss=False)
        seconds = time.perf_counter() - start
        # Time one evaluation of the loss, which `python -m trainer.task` computes each iteration.
        counts = train.col_counts()
        users = problem.define_rows(train, problem.USERS, counts, config)
        items = problem.define_rows(train.transpose(), problem.ITEMS, counts, config)
        x = tf.constant(factors.user_factors)
        y = tf.constant(factors.item_factors)
        start = time.perf_counter()
        wals_loss.loss(users, items, x, y)
        loss_seconds = time.perf_counter() - start
    from trainer.core.foldin import fold_in_rows

    item_factors = np.asarray(factors.item_factors, dtype=np.float32)

    def fold_in(rows: CsrMatrix) -> np.ndarray:
        return fold_in_rows(rows, item_factors, counts, config)

    return Fitted(
        np.asarray(factors.user_factors, dtype=np.float32),
        item_factors,
        seconds,
        loss_seconds,
        fold_in,
    )


def to_scipy(matrix: CsrMatrix, values: np.ndarray | None = None):
    """The matrix as a scipy.sparse.csr_matrix, optionally with other per-entry values."""
    import scipy.sparse

    data = matrix.values if values is None else values
    return scipy.sparse.csr_matrix(
        (data.astype(np.float32), matrix.indices, matrix.indptr), shape=matrix.shape
    )


def fit_implicit(
    train: CsrMatrix, params: dict, solver: str, k: int, iters: int, seed: int
) -> Fitted:
    """Fits implicit's CPU ALS on the confidence matrix C = 1 + α r.

    Args:
        train: the training matrix.
        params: {"regularization": λ, "alpha": α}.
        solver: "cg" (use_cg=True) or "cholesky" (use_cg=False).
        k: factors.
        iters: iterations.
        seed: random_state.
    """
    from implicit.cpu.als import AlternatingLeastSquares

    confidence = to_scipy(train, 1.0 + params["alpha"] * train.values)
    with blas_threads(1):
        model = AlternatingLeastSquares(
            factors=k,
            iterations=iters,
            regularization=params["regularization"],
            use_cg=solver == "cg",
            num_threads=THREADS,
            random_state=seed,
        )
        start = time.perf_counter()
        model.fit(confidence, show_progress=False)
        seconds = time.perf_counter() - start

    def fold_in(rows: CsrMatrix) -> np.ndarray:
        # recommend(..., recalculate_user=True) solves one user so; this is its batched form.
        with blas_threads(1):
            users = np.arange(rows.shape[0])
            return model.recalculate_user(
                users, to_scipy(rows, 1.0 + params["alpha"] * rows.values)
            )

    return Fitted(model.user_factors, model.item_factors, seconds, fold_in=fold_in)


class SparkALS:
    """A local[2] Spark session that fits MLlib's implicit ALS; use as a context manager."""

    def __init__(self, driver_memory: str = "6g") -> None:
        self._driver_memory = driver_memory
        self._spark = None

    def __enter__(self) -> SparkALS:
        from pyspark.sql import SparkSession

        warnings.filterwarnings("ignore", message=".*pandas >= 3.0.0.*", category=FutureWarning)
        start = time.perf_counter()
        self._spark = (
            SparkSession.builder.master(f"local[{THREADS}]")
            .appName("train_benchmark")
            .config("spark.driver.memory", self._driver_memory)
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.sql.execution.arrow.pyspark.enabled", "true")
            .config("spark.sql.shuffle.partitions", str(2 * THREADS))
            .getOrCreate()
        )
        self._spark.sparkContext.setLogLevel("ERROR")
        self._frames: dict[int, object] = {}
        logger.info("Spark session started in %.1f s", time.perf_counter() - start)
        return self

    def __exit__(self, *exc_info) -> None:
        self._spark.stop()
        self._spark = None

    def _frame(self, train: CsrMatrix):
        """The cached, materialised DataFrame (user, item, rating) of the matrix."""
        import pandas as pd

        key = id(train)
        if key not in self._frames:
            table = pd.DataFrame(
                {
                    "user": train.row_ids().astype(np.int32),
                    "item": train.indices.astype(np.int32),
                    "rating": train.values.astype(np.float32),
                }
            )
            frame = self._spark.createDataFrame(table).repartition(2 * THREADS).cache()
            frame.count()
            self._frames[key] = (train, frame)  # Holding train keeps id(train) unique.
        return self._frames[key][1]

    def fit(
        self, train: CsrMatrix, params: dict, solver: str, k: int, iters: int, seed: int
    ) -> Fitted:
        """Fits ALS(implicitPrefs=True): confidence 1 + α r, regParam λ.

        Args:
            train: the training matrix.
            params: {"regularization": regParam, "alpha": α}.
            solver: "cholesky", MLlib's only solver for unconstrained implicit ALS.
            k: rank.
            iters: maxIter.
            seed: ALS seed.
        """
        from pyspark.ml.recommendation import ALS

        if solver != "cholesky":
            raise ValueError(f"Spark ALS only has the cholesky solver, got {solver!r}")
        frame = self._frame(train)
        als = ALS(
            rank=k,
            maxIter=iters,
            regParam=params["regularization"],
            alpha=params["alpha"],
            implicitPrefs=True,
            userCol="user",
            itemCol="item",
            ratingCol="rating",
            seed=seed,
        )
        start = time.perf_counter()
        model = als.fit(frame)
        model.userFactors.count()
        model.itemFactors.count()
        seconds = time.perf_counter() - start
        return Fitted(
            _spark_factors(model.userFactors, train.shape[0], k),
            _spark_factors(model.itemFactors, train.shape[1], k),
            seconds,
        )


def _spark_factors(frame, n: int, k: int) -> np.ndarray:
    """float32 [n, k] from a Spark factors DataFrame (id, features); missing ids get zeros."""
    table = frame.toPandas()
    factors = np.zeros((n, k), dtype=np.float32)
    if len(table):
        factors[table["id"].to_numpy()] = np.stack(table["features"].to_numpy())
    return factors


def evaluate(fitted: Fitted, train: CsrMatrix, heldout: CsrMatrix) -> dict[str, float]:
    """Recall@20 and NDCG@20 of X Yᵀ on the held-out cells, training items excluded."""
    user_factors, item_factors = fitted.user_factors, fitted.item_factors

    def score_fn(users: np.ndarray) -> np.ndarray:
        return user_factors[users] @ item_factors.T

    result = metrics.evaluate(score_fn, train, heldout, ks=KS)
    return {"recall@20": result["recall@20"], "ndcg@20": result["ndcg@20"]}


def evaluate_new_users(
    fitted: Fitted | None, train: CsrMatrix, foldin: CsrMatrix, target: CsrMatrix
) -> dict[str, float | None]:
    """New Recall@20 and NDCG@20: held-out users folded in (`fitted.fold_in`, or popularity
    when `fitted` is None), every item but their fold-in ones ranked, scored on the target."""
    if fitted is not None and fitted.fold_in is None:
        return {"new_recall@20": None, "new_ndcg@20": None}
    if fitted is None:
        counts = metrics.popularity_scores(train)
        scores = np.broadcast_to(counts, (foldin.shape[0], counts.size))
    else:
        scores = topk.score(fitted.fold_in(foldin), fitted.item_factors)
    sums = metrics.batch_sums(scores, foldin, target, KS)
    result = sums.result()
    return {"new_recall@20": result["recall@20"], "new_ndcg@20": result["ndcg@20"]}


def split_users(
    matrix: CsrMatrix, fraction: float, seed: int
) -> tuple[CsrMatrix, CsrMatrix, CsrMatrix]:
    """(known users' matrix, held-out users' fold-in rows, their target rows).

    A seeded `fraction` of the users is held out whole: their rows are emptied in the known
    matrix (same shape) and split per cell, HOLDOUT_FOLDIN into fold-in, the rest into target
    (both [n_heldout, n_items], held-out users with both parts non-empty only).
    """
    rng = np.random.default_rng([seed, 7])
    held = rng.random(matrix.shape[0]) < fraction
    rows = matrix.row_ids()
    keep = ~held[rows]
    known = CsrMatrix.from_triples(
        rows[keep], matrix.indices[keep], matrix.values[keep], matrix.shape
    )
    heldout = metrics.take_rows(matrix, np.flatnonzero(held))
    foldin, target = matrices.split_cells(heldout, 1.0 - HOLDOUT_FOLDIN, seed + 2)
    both = np.flatnonzero((foldin.row_counts() > 0) & (target.row_counts() > 0))
    return known, metrics.take_rows(foldin, both), metrics.take_rows(target, both)


def _first_users(matrix: CsrMatrix, n_users: int, seed: int) -> CsrMatrix:
    """The matrix with only a seeded random sample of n_users rows kept (others emptied)."""
    if matrix.shape[0] <= n_users:
        return matrix
    keep = np.zeros(matrix.shape[0], dtype=bool)
    keep[np.random.default_rng(seed).choice(matrix.shape[0], n_users, replace=False)] = True
    rows = matrix.row_ids()
    mask = keep[rows]
    return CsrMatrix.from_triples(
        rows[mask], matrix.indices[mask], matrix.values[mask], matrix.shape
    )


def grid_points(grid: dict[str, Sequence[float]]) -> list[dict[str, float]]:
    """Every combination of the grid's values, as {name: value} dicts, in a fixed order."""
    names = list(grid)
    return [
        dict(zip(names, values, strict=True))
        for values in itertools.product(*(grid[n] for n in names))
    ]


def edge_axes(params: dict[str, float], grid: dict[str, Sequence[float]]) -> list[str]:
    """The axes of `grid` (with more than one value) whose smallest or largest value `params`
    takes: where the best point may lie outside the grid, which should then be widened."""
    return [
        name
        for name, values in grid.items()
        if len(values) > 1 and params[name] in (min(values), max(values))
    ]


def tune(
    name: str,
    fit: FitFn,
    solver: str,
    train: CsrMatrix,
    heldout: CsrMatrix,
    k: int,
    iters: int,
    seed: int,
) -> tuple[dict, list[dict]]:
    """Fits every point of GRIDS[name] and returns (best params, the grid with its metrics);
    warns when the best point lies on an edge of the grid (`edge_axes`)."""
    results = []
    for params in grid_points(GRIDS[name]):
        fitted = fit(train, params, solver, k, iters, seed)
        scores = evaluate(fitted, train, heldout)
        results.append({"params": params, **scores, "seconds": round(fitted.seconds, 3)})
        logger.info("tune %s %s: %s", name, params, scores)
    best = max(results, key=lambda result: result[PRIMARY_METRIC])
    edges = edge_axes(best["params"], GRIDS[name])
    if edges:
        logger.warning(
            "%s: the best point %s lies on the edge of the grid's %s axis; widen GRIDS[%r]",
            name,
            best["params"],
            ", ".join(edges),
            name,
        )
    return best["params"], results


# The solvers of each model, the tuning solver first.
SOLVERS: dict[str, tuple[str, ...]] = {
    OURS: ("cg", "cholesky"),
    IMPLICIT: ("cg", "cholesky"),
    SPARK: ("cholesky",),
}


@contextlib.contextmanager
def _fitter(name: str) -> Iterator[FitFn]:
    """The fit function of a model; for Spark, the JVM lives only inside this block."""
    if name == SPARK:
        with SparkALS() as spark:
            yield spark.fit
    else:
        yield {OURS: fit_ours, IMPLICIT: fit_implicit}[name]


def spread(values: Sequence[float | None]) -> dict[str, float | None]:
    """{"median", "min", "max"} of the runs' values (None when a value is missing)."""
    if not values or any(value is None for value in values):
        return {"median": None, "min": None, "max": None}
    return {
        "median": float(np.median(values)),
        "min": float(min(values)),
        "max": float(max(values)),
    }


def benchmark_model(
    name: str,
    splits: dict[str, tuple[CsrMatrix, CsrMatrix]],
    size: str,
    k: int,
    iters: int,
    repeats: int,
    seed: int,
    new_users: tuple[CsrMatrix, CsrMatrix] | None = None,
    chosen: dict | None = None,
    tune_only: bool = False,
) -> tuple[dict, list[dict], list[dict]]:
    """Warms up, tunes on the tuning split, then times and evaluates each solver on `size`.

    Args:
        name: one of OURS, IMPLICIT, SPARK.
        splits: {"small": (train, heldout), "tune": (train, validation), size: (train,
            heldout)}.
        size: the split to time on.
        k: latent factors.
        iters: iterations of every fit.
        repeats: timed fits per solver; run r initialises with seed + r, and every figure of
            the row is the median of the runs', with their minimum and maximum.
        seed: initialisation seed of the tuning fits and of the first timed run.
        new_users: (fold-in rows, target rows) of the held-out users, or None.
        chosen: params chosen by an earlier tuning (no tuning then), or None to tune.
        tune_only: stop after tuning (no timed fits, no rows).

    Returns:
        (chosen params, the tuning grid with its metrics ([] when `chosen` was given), one table
        row per solver).
    """
    small_train, _ = splits["small"]
    tune_train, tune_heldout = splits["tune"]
    train, heldout = splits[size]
    rows, grid = [], []
    with _fitter(name) as fit:
        for solver in SOLVERS[name][: 1 if tune_only else None]:
            logger.info("warming up %s (%s)", name, solver)
            fit(small_train, grid_points(GRIDS[name])[0], solver, k, WARMUP_ITERS, seed)
        if chosen is None:
            logger.info("tuning %s", name)
            chosen, grid = tune(
                name, fit, SOLVERS[name][0], tune_train, tune_heldout, k, iters, seed
            )
        if tune_only:
            return chosen, grid, rows
        for solver in SOLVERS[name]:
            # One untimed iteration on this very matrix first, for every model alike: ours
            # XLA-compiles its CG kernel once per tile shape (about 4 s at the large size), a
            # one-off cost per process that is not a per-iteration one; the JVM warms up too.
            warmup = fit(train, chosen, solver, k, 1, seed)
            logger.info("warm-up of %s (%s): %.2f s", name, solver, warmup.seconds)
            logger.info("timing %s (%s) on the %s matrix, %d run(s)", name, solver, size, repeats)
            runs = []
            for run in range(repeats):
                fitted = fit(train, chosen, solver, k, iters, seed + run)
                runs.append(
                    {
                        "seconds_per_iter": fitted.seconds / iters,
                        "loss_seconds_per_iter": fitted.loss_seconds,
                        **evaluate(fitted, train, heldout),
                        **(evaluate_new_users(fitted, train, *new_users) if new_users else {}),
                    }
                )
                logger.info("%s (%s) run %d: %s", name, solver, run + 1, runs[-1])
            row = {"model": name, "solver": solver}
            for figure in runs[0]:
                values = [run[figure] for run in runs]
                if figure == "loss_seconds_per_iter" and values[0] is None:
                    continue
                summary = spread(values)
                row[figure] = summary["median"]
                row[f"{figure}_min"], row[f"{figure}_max"] = summary["min"], summary["max"]
            row["all_seconds"] = [round(run["seconds_per_iter"] * iters, 3) for run in runs]
            row["warmup_seconds"] = round(warmup.seconds, 3)
            logger.info("%s", row)
            rows.append(row)
    return chosen, grid, rows


def run_benchmark(
    size: str,
    k: int = 64,
    iters: int = 10,
    skip: Sequence[str] = (),
    repeats: int = 1,
    seed: int = 0,
    tune_on: str = "validation",
    holdout_users: float = HOLDOUT_USERS,
    chosen: dict[str, dict] | None = None,
    tune_only: bool = False,
) -> dict:
    """Tunes every model, then times and evaluates them on `size`.

    Tuning (`tune_on`): "validation" fits each grid point on `size`'s training cells less a
    validation tenth, and scores it on that tenth (at most `TUNE_USERS` users), so the held-out
    cells that the table reports are never seen while tuning; "small" tunes on the small
    matrix's split instead (cheap, but λ does not carry over between sizes for every model).

    Models run one after another (ours, implicit, Spark), so no two share the cores; the Spark
    JVM is started only for Spark.

    Args:
        size: "small" or "large", a key of `matrices.SIZES`.
        k: latent factors of every model.
        iters: ALS iterations of every model.
        skip: models to leave out, from `MODELS`.
        repeats: timed fits per (model, solver); each figure is their median, min and max.
        seed: seed of the matrix, the split and every model's initialisation.
        tune_on: "validation" or "small" (see above).
        holdout_users: the share of `size`'s users held out whole for the new-user protocol
            (0: only the per-cell protocol).
        chosen: {model: params} of an earlier tuning (its result's "chosen", same size, seed
            and tune_on): those models are not tuned again.
        tune_only: only tune (the result has "chosen", "grids" and "edges", no rows).

    Returns:
        The JSON-serialisable result: the matrix, settings, grids, chosen params, the grid axes
        on whose edge each model's best point lies ("edges", empty lists when interior) and one
        row per (model, solver) with seconds_per_iter, ratio_to_implicit_cg, recall@20 and
        ndcg@20 (ours also loss_seconds_per_iter), each the median of the runs with its _min and
        _max, then the popularity baseline's row.
    """
    _set_tensorflow_threads(THREADS)
    splits = {}
    new_users = None
    for name in dict.fromkeys(["small", size]):
        start = time.perf_counter()
        full = matrices.synthetic_matrix(*matrices.SIZES[name], seed=seed)
        if name == size and holdout_users > 0:
            full, *parts = split_users(full, holdout_users, seed)
            new_users = tuple(parts)
        splits[name] = matrices.split_cells(full, EVAL_FRACTION, seed)
        logger.info(
            "%s matrix %s, %d cells, generated and split in %.1f s",
            name,
            full.shape,
            full.nnz,
            time.perf_counter() - start,
        )
    if tune_on == "small":
        splits["tune"] = splits["small"]
    else:
        fit_train, validation = matrices.split_cells(splits[size][0], VALIDATION_FRACTION, seed + 1)
        splits["tune"] = (fit_train, _first_users(validation, TUNE_USERS, seed))
    given, chosen, grids, rows = dict(chosen or {}), {}, {}, []
    for name in MODELS:
        if name in skip:
            continue
        chosen[name], grids[name], model_rows = benchmark_model(
            name, splits, size, k, iters, repeats, seed, new_users, given.get(name), tune_only
        )
        rows.extend(model_rows)
    edges = {name: edge_axes(params, GRIDS[name]) for name, params in chosen.items()}
    train, heldout = splits[size]
    settings = {
        "size": size,
        "shape": list(train.shape),
        "train_nnz": train.nnz,
        "heldout_nnz": heldout.nnz,
        "k": k,
        "iters": iters,
        "threads": THREADS,
        "repeats": repeats,
        "skipped": sorted(skip),
        "seed": seed,
        "tuned_on": tune_on,
        "holdout_users": holdout_users,
        "new_users": 0 if new_users is None else new_users[0].shape[0],
        "ours_fixed": OURS_FIXED,
        "grids": grids,
        "chosen": chosen,
        "tuned_here": sorted(set(chosen) - set(given)),
        "edges": edges,
    }
    if tune_only:
        return {**settings, "rows": []}
    popularity = metrics.evaluate_popularity(train, heldout, ks=KS)
    rows.append(
        {
            "model": "popularity",
            "solver": "-",
            "seconds_per_iter": None,
            "recall@20": popularity["recall@20"],
            "ndcg@20": popularity["ndcg@20"],
            **(evaluate_new_users(None, train, *new_users) if new_users else {}),
        }
    )
    reference = next(
        (
            row["seconds_per_iter"]
            for row in rows
            if (row["model"], row["solver"]) == (IMPLICIT, "cg")
        ),
        None,
    )
    for row in rows:
        has_time = reference and row["seconds_per_iter"] is not None
        row["ratio_to_implicit_cg"] = row["seconds_per_iter"] / reference if has_time else None
    return {**settings, "rows": rows}


def format_table(result: dict) -> str:
    """The result's rows as a fixed-width text table: each figure the median of the runs,
    seconds per iteration and NDCG@20 with their range (min-max) over the runs."""

    def number(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    def ranged(row: dict, figure: str, spec: str) -> str:
        low, high = row.get(f"{figure}_min"), row.get(f"{figure}_max")
        if low is None or high is None:
            return number(row[figure], spec)
        return f"{row[figure]:{spec}} ({low:{spec}}-{high:{spec}})"

    header = (
        f"{'model':<11} {'solver':<9} {'s/iter (min-max)':>25} {'x implicit cg':>14} "
        f"{'Recall@20':>10} {'NDCG@20 (min-max)':>25} {'new R@20':>9} {'new N@20':>9}"
    )
    lines = [
        f"{result['size']} matrix {result['shape'][0]:,} x {result['shape'][1]:,}, "
        f"{result['train_nnz']:,} train / {result['heldout_nnz']:,} held-out cells, "
        f"k={result['k']}, {result['iters']} iterations, {result['threads']} threads; "
        f"medians of {result['repeats']} run(s)",
        header,
        "-" * len(header),
    ]
    for row in result["rows"]:
        lines.append(
            f"{row['model']:<11} {row['solver']:<9} {ranged(row, 'seconds_per_iter', '.4f'):>25} "
            f"{number(row['ratio_to_implicit_cg'], '.2f'):>14} {row['recall@20']:>10.4f} "
            f"{ranged(row, 'ndcg@20', '.4f'):>25} {number(row.get('new_recall@20'), '.4f'):>9} "
            f"{number(row.get('new_ndcg@20'), '.4f'):>9}"
        )
    if result.get("new_users"):
        lines.append(
            f"new R@20, new N@20: {result['new_users']:,} users held out whole "
            f"({result['holdout_users']:.0%}), folded in from {HOLDOUT_FOLDIN:.0%} of their cells, "
            "scored on the rest"
        )
    where = "the small matrix" if result["tuned_on"] == "small" else "a validation split"
    lines.append(f"chosen on {where} (best NDCG@20 of each grid):")
    for name, params in result["chosen"].items():
        grid = ", ".join(f"{key} {list(values)}" for key, values in GRIDS[name].items())
        edges = result.get("edges", {}).get(name)
        edge = f"; ON THE EDGE of {', '.join(edges)}" if edges else ""
        lines.append(f"  {name:<9} {params}   (grid: {grid}{edge})")
    for name, grid in result["grids"].items():
        for point in grid:
            lines.append(
                f"    {name:<9} {point['params']}: NDCG@20 {point['ndcg@20']:.4f}, "
                f"Recall@20 {point['recall@20']:.4f}, {point['seconds']:.1f} s"
            )
    for row in result["rows"]:
        if row.get("loss_seconds_per_iter") is not None:
            loss = row["loss_seconds_per_iter"]
            lines.append(
                f"  {row['model']} ({row['solver']}): first 1-iteration fit (compile) "
                f"{row['warmup_seconds']:.2f} s; the training loss, which trainer.task adds to "
                f"every iteration, {loss:.4f} s (not in s/iter, as the peers compute none)"
            )
    return "\n".join(lines)


def _read_chosen(path: str, args: argparse.Namespace) -> tuple[dict, dict]:
    """({model: params}, {model: tuning grid}) of an earlier result (e.g. of --tune_only)
    made with the same size, seed, k, iterations and tuning split."""
    with open(path) as handle:
        earlier = json.load(handle)
    for flag in ("size", "seed", "k", "iters", "tune_on", "holdout_users"):
        key = "tuned_on" if flag == "tune_on" else flag
        if earlier.get(key) != getattr(args, flag):
            raise ValueError(
                f"{path} was tuned with --{flag} {earlier.get(key)}, not {getattr(args, flag)}"
            )
    return earlier["chosen"], earlier.get("grids", {})


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size",
        choices=sorted(matrices.SIZES),
        default="small",
        help="matrix to time on: small 5K x 1K x 100K, large 100K x 20K x 5M",
    )
    parser.add_argument("--k", type=int, default=64, help="latent factors (default 64)")
    parser.add_argument("--iters", type=int, default=10, help="ALS iterations (default 10)")
    parser.add_argument(
        "--skip", action="append", choices=MODELS, default=[], help="leave a model out; repeatable"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed fits per model and solver; each figure is their median, with min and max "
        "(default 3)",
    )
    parser.add_argument("--seed", type=int, default=0, help="matrix, split and init seed")
    parser.add_argument(
        "--tune_on",
        choices=("validation", "small"),
        default="validation",
        help="tune on a validation tenth of the timed matrix (default) or on the small matrix",
    )
    parser.add_argument(
        "--holdout_users",
        type=float,
        default=HOLDOUT_USERS,
        help="share of users held out whole for the new-user protocol, in [0, 1) (default 0.1)",
    )
    parser.add_argument(
        "--tune_only", action="store_true", help="only tune; write the choice with --json_out"
    )
    parser.add_argument(
        "--chosen_from",
        metavar="JSON",
        help="take the params of the models an earlier --json_out tuned (same --size, --seed, "
        "--k, --iters, --tune_on, --holdout_users) instead of tuning them again",
    )
    parser.add_argument("--json_out", help="also write the result as JSON to this path")
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Parses flags, runs the benchmark, prints the table and writes --json_out."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    if args.k < 1 or args.iters < 1 or args.repeats < 1:
        parser.error("--k, --iters and --repeats must be >= 1")
    if not 0 <= args.holdout_users < 1:
        parser.error("--holdout_users must be in [0, 1)")
    chosen, earlier_grids = {}, {}
    if args.chosen_from:
        try:
            chosen, earlier_grids = _read_chosen(args.chosen_from, args)
        except (OSError, ValueError, KeyError) as error:
            parser.error(f"--chosen_from: {error}")
    result = run_benchmark(
        args.size,
        args.k,
        args.iters,
        args.skip,
        args.repeats,
        args.seed,
        args.tune_on,
        args.holdout_users,
        chosen,
        args.tune_only,
    )
    for name in set(chosen) & set(result["grids"]):
        result["grids"][name] = earlier_grids.get(name, [])
    print(format_table(result))
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
