"""gs:// end to end on a local GCS emulator (tests/gcs_emulator.py): Beam, TensorFlow, the entry
points.

One emulator serves the session, shared with the other gs:// modules (tests/conftest.py `gcs`); each
test or module gets a bucket of its own. Beam's FileSystems are checked in this process. Everything
that touches gs:// through TensorFlow runs in a subprocess with the emulator's variables from its
start: TF reads its GCS cache settings when it is imported (tested below), and tests/conftest.py
imports it before any fixture runs, so in this process TF's gs:// would keep its stat and read
caches and could read stale objects. The entry points run as users run them, `python -m ...` from
the repository.

After every end-to-end run, every object under the root is listed, and nothing may be there but
the outputs the README lists (no `*.incomplete-*`, `*.tmp-*`, `*.replaced-*`, Beam temp files,
locks or checkpoints).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
from gcs_emulator import GcsEmulator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATES = ["2017-08-01", "2017-08-02", "2017-08-03"]
# Tiny: a few hundred sessions a day, k=4, three iterations (cold and warm alike).
FLAGS = ["--latent_factors", "4", "--num_iters", "3", "--eval_ks", "20", "--loss_every", "0"]
# pipeline.run's gate, judged loosely: three warm iterations on a few hundred sessions swing
# NDCG@20 by some 10%, and the gate is not the point here (the floor still rejects WORSE).
RUN_FLAGS = [*FLAGS, "--gate_tolerance", "0.2"]
WORSE = ["--latent_factors", "1", "--regularization", "1000"]
FORBIDDEN = (".incomplete-", ".tmp-", ".replaced-", "beam-temp", "checkpoints", ".lock")


def _python(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python ARGS` from the repository, with this process's environment (the emulator's)."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _script(code: str, timeout: int = 300) -> dict:
    """Runs `code` in a fresh interpreter; returns the JSON object its last line prints."""
    result = _python("-c", textwrap.dedent(code), timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _read(path: str) -> bytes:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as handle:
        return handle.read()


# Smoke tests: the emulator itself, for Beam and for TensorFlow.
def test_beam_filesystems_write_read_rename_delete_and_match(gcs, bucket):
    from apache_beam.io.filesystems import FileSystems

    base = f"gs://{bucket}/beam"
    for name in ("a.txt", "b.txt", "c.bin"):
        with FileSystems.create(f"{base}/{name}") as handle:
            handle.write(name.encode() * 3)
    assert _read(f"{base}/a.txt") == b"a.txta.txta.txt"
    # Rename and multi-file delete go through google-cloud-storage's batch requests.
    FileSystems.rename([f"{base}/a.txt", f"{base}/b.txt"], [f"{base}/x/a.txt", f"{base}/x/b.txt"])
    matched = FileSystems.match([f"{base}/x/*.txt", f"{base}/*"])
    assert sorted(m.path for m in matched[0].metadata_list) == [
        f"{base}/x/a.txt",
        f"{base}/x/b.txt",
    ]
    assert [m.size_in_bytes for m in matched[1].metadata_list] == [15]  # c.bin; * stops at /
    assert _read(f"{base}/x/b.txt") == b"b.txtb.txtb.txt"
    assert not FileSystems.exists(f"{base}/a.txt") and FileSystems.exists(f"{base}/x/a.txt")
    FileSystems.delete([f"{base}/x/a.txt", f"{base}/c.bin"])
    assert gcs.list_objects(bucket) == ["beam/x/b.txt"]


def test_beam_pipeline_reads_and_writes_text_on_gs(gcs, bucket):
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems

    base = f"gs://{bucket}/text"
    with FileSystems.create(f"{base}/in.txt") as handle:
        handle.write(b"".join(f"line {i}\n".encode() for i in range(100)))
    with beam.Pipeline() as pipeline:
        _ = (
            pipeline
            | beam.io.ReadFromText(f"{base}/in.txt")
            | beam.Map(str.upper)
            | beam.io.WriteToText(f"{base}/out", num_shards=3)
        )
    shards = [name for name in gcs.list_objects(bucket, "text/") if "/out" in name]
    assert shards == [f"text/out-0000{i}-of-00003" for i in range(3)]  # no beam-temp left
    lines = b"".join(_read(f"gs://{bucket}/{shard}") for shard in shards).decode().split()
    assert sorted(" ".join(lines[i : i + 2]) for i in range(0, len(lines), 2)) == sorted(
        f"LINE {i}" for i in range(100)
    )


def test_tensorflow_gfile_write_read_rename_glob_and_rmtree(gcs, bucket):
    out = _script(
        f"""
        import json
        import tensorflow as tf
        base = "gs://{bucket}/tf"
        tf.io.gfile.makedirs(base + "/d")
        for name in ("a.txt", "b.txt"):
            with tf.io.gfile.GFile(base + "/d/" + name, "w") as handle:
                handle.write(name * 2)
        big = bytes(range(256)) * 4096  # 1 MiB: reads of 512 KiB and more broke a plugin
        with tf.io.gfile.GFile(base + "/big.bin", "wb") as handle:
            handle.write(big)
        tf.io.gfile.rename(base + "/d/a.txt", base + "/d/c.txt")
        tf.io.gfile.rename(base + "/d", base + "/e")  # a directory: object by object
        out = {{
            "read": tf.io.gfile.GFile(base + "/e/c.txt").read(),
            "big": tf.io.gfile.GFile(base + "/big.bin", "rb").read() == big,
            "glob": sorted(tf.io.gfile.glob(base + "/e/*.txt")),
            "isdir": tf.io.gfile.isdir(base + "/e"),
            "old": tf.io.gfile.exists(base + "/d/b.txt"),
        }}
        tf.io.gfile.rmtree(base + "/e")
        out["after"] = tf.io.gfile.glob(base + "/*")
        print(json.dumps(out))
        """
    )
    base = f"gs://{bucket}/tf"
    assert out == {
        "read": "a.txta.txt",
        "big": True,
        "glob": [f"{base}/e/b.txt", f"{base}/e/c.txt"],
        "isdir": True,
        "old": False,
        "after": [f"{base}/big.bin"],
    }
    assert gcs.list_objects(bucket) == ["tf/", "tf/big.bin"]  # tf/: makedirs's object


def test_tensorflow_tfrecords_and_saved_model_round_trip(gcs, bucket):
    out = _script(
        f"""
        import json
        import tensorflow as tf
        base = "gs://{bucket}"
        with tf.io.TFRecordWriter(base + "/r.tfrecord.gz", options="GZIP") as writer:
            for i in range(1000):
                writer.write(str(i).encode() * 50)
        records = [
            r.numpy() for r in tf.data.TFRecordDataset(base + "/r.tfrecord.gz", "GZIP")
        ]

        class Scale(tf.Module):
            def __init__(self):
                self.w = tf.Variable([1.0, 2.0, 3.0])

            @tf.function(input_signature=[tf.TensorSpec([3], tf.float32)])
            def __call__(self, x):
                return x * self.w

        tf.saved_model.save(Scale(), base + "/model")
        loaded = tf.saved_model.load(base + "/model")
        print(json.dumps({{
            "records": len(records),
            "same": records == [str(i).encode() * 50 for i in range(1000)],
            "scaled": loaded(tf.constant([1.0, 1.0, 2.0])).numpy().tolist(),
        }}))
        """
    )
    assert out == {"records": 1000, "same": True, "scaled": [1.0, 2.0, 6.0]}
    names = gcs.list_objects(bucket)
    assert "model/saved_model.pb" in names and "r.tfrecord.gz" in names
    assert not [n for n in names if any(mark in n for mark in FORBIDDEN)], names


_STALE_STAT = """
    import json, os, sys
    {before}
    import tensorflow as tf
    {after}
    from apache_beam.io.filesystems import FileSystems
    path = "gs://{bucket}/{name}"
    def put(data):
        with FileSystems.create(path) as handle:
            handle.write(data)
    put(b"a")
    first = tf.io.gfile.stat(path).length
    put(b"bbbbbb")  # within TF's default 5 s stat cache
    print(json.dumps([first, tf.io.gfile.stat(path).length]))
"""


def test_tensorflow_reads_its_gcs_cache_settings_at_import(gcs, bucket):
    """Why the fixture's variables must be in place before `import tensorflow`: set after it,
    GCS_STAT_CACHE_MAX_AGE=0 is ignored and TF reports a stale size."""
    off = "os.environ.update(GCS_STAT_CACHE_MAX_AGE='0')"
    on = "os.environ.pop('GCS_STAT_CACHE_MAX_AGE')"
    before = _STALE_STAT.format(before=off, after="", bucket=bucket, name="before")
    after = _STALE_STAT.format(before=on, after=off, bucket=bucket, name="after")
    assert _script(before) == [1, 6]
    assert _script(after) == [1, 1]


# End to end: the entry points on gs://.
def _upload_inputs(bucket: str, tmp: str) -> str:
    """Three days of synthetic GA360 exports on gs://; returns the --input pattern."""
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    from pipeline import synthetic

    as_is = CompressionTypes.UNCOMPRESSED
    for date in DATES:
        name = f"ga_sessions_{date.replace('-', '')}.json.gz"
        local = os.path.join(tmp, name)
        synthetic.write_sessions(
            local, 600, seed=5, num_visitors=200, num_items=150, num_topics=4, date=date
        )
        target = f"gs://{bucket}/ga360/{name}"
        # As is: by default Beam would gzip the .gz file once more.
        with open(local, "rb") as source, FileSystems.create(target, compression_type=as_is) as out:
            out.write(source.read())
    return f"gs://{bucket}/ga360/ga_sessions_{{date_nodash}}.json.gz"


def _pipeline_run(pattern: str, root: str, date: str, *extra: str) -> subprocess.CompletedProcess:
    return _python(
        "-m", "pipeline.run", "--date", date, "--input", pattern, "--root", root, *RUN_FLAGS, *extra
    )


def _published(root: str) -> str:
    return _read(f"{root}/published").decode()


def _record(root: str, date: str) -> dict:
    return json.loads(_read(f"{root}/runs/{date}/run.json"))


_DATE = re.compile(r"^\d{4}-\d\d-\d\d$")


def unlisted(names: list[str], prefix: str) -> list[str]:
    """The objects under `prefix` (a root's object prefix, "ga-wals/") that are not outputs.

    The README's outputs under --root: `published`; `runs/DATE/` holding `run.json`, `gate.json`,
    `preprocessed/`, `train/`, `predictions.tsv` (`predictions/` with --distributed: the code's
    name; the README calls that directory `predictions.tsv` too) and `serving/YYYYMMDD/`. The
    "directory" objects TF makes for these and for the root (names ending in "/") count as
    theirs; anything whose name holds a FORBIDDEN mark never does.
    """
    outputs = ("preprocessed", "train", "predictions", "predictions.tsv", "serving")
    bad = []
    for name in names:
        relative = name[len(prefix) :]
        parts = relative.rstrip("/").split("/")
        if any(mark in relative for mark in FORBIDDEN):
            bad.append(name)
        elif relative in ("", "published", "runs/"):
            continue
        elif parts[0] != "runs" or not _DATE.match(parts[1]):
            bad.append(name)
        elif len(parts) == 2:
            if not relative.endswith("/"):
                bad.append(name)
        elif len(parts) == 3 and parts[2] in ("run.json", "gate.json", "predictions.tsv"):
            continue
        elif parts[2] not in outputs:
            bad.append(name)
        elif parts[2] == "serving" and len(parts) > 3 and parts[3] != parts[1].replace("-", ""):
            bad.append(name)
    return bad


def test_unlisted_keeps_outputs_and_names_leftovers():
    prefix = "ga-wals/"
    outputs = ["", "published", "runs/", "runs/2017-08-01/", "runs/2017-08-01/run.json"]
    outputs += ["runs/2017-08-01/gate.json", "runs/2017-08-01/train/model/config.json"]
    outputs += ["runs/2017-08-01/serving/20170801/saved_model.pb", "runs/2017-08-01/train/"]
    outputs += ["runs/2017-08-01/predictions/predictions.json", "runs/2017-08-01/predictions.tsv"]
    leftovers = ["runs/2017-08-01/train.incomplete-1a2b3c4d/", "published.tmp-1", "x.json"]
    leftovers += ["runs/2017-08-01/serving/20170802/saved_model.pb", "runs/2017-08-01/.lock"]
    leftovers += ["runs/2017-08-01/train.checkpoints/run.json", "runs/2017-08-01/other.txt"]
    leftovers += ["runs/2017-08-01", "runs/2017-08-01/train/.replaced-1/model/config.json"]
    names = [prefix + name for name in outputs + leftovers]
    assert unlisted(names, prefix) == [prefix + name for name in leftovers]


@pytest.fixture(scope="module")
def inputs(gcs, tmp_path_factory) -> tuple[str, str]:
    """(bucket, --input pattern): a bucket for the module, with three days of exports."""
    bucket = gcs.new_bucket()
    return bucket, _upload_inputs(bucket, str(tmp_path_factory.mktemp("ga360")))


@pytest.fixture(scope="module")
def deployment(inputs) -> dict:
    """`pipeline.run --root gs://BUCKET/ga-wals` for two dates with the local trainer."""
    bucket, pattern = inputs
    root = f"gs://{bucket}/ga-wals"
    runs = [_pipeline_run(pattern, root, date) for date in DATES[:2]]
    return {"bucket": bucket, "pattern": pattern, "root": root, "runs": runs}


@pytest.fixture(scope="module")
def distributed(inputs) -> dict:
    """A second deployment, `--distributed` (DirectRunner), for the same two dates."""
    bucket, pattern = inputs
    root = f"gs://{bucket}/ga-wals-beam"
    runs = [_pipeline_run(pattern, root, date, "--distributed") for date in DATES[:2]]
    return {"bucket": bucket, "pattern": pattern, "root": root, "runs": runs}


def _check_two_dates_published(deployment: dict) -> None:
    from apache_beam.io.filesystems import FileSystems

    for run in deployment["runs"]:
        assert run.returncode == 0, run.stderr[-4000:]
    root = deployment["root"]
    assert _published(root) == f"runs/{DATES[1]}\n"
    first, second = _record(root, DATES[0]), _record(root, DATES[1])
    assert first["status"] == "published" and second["status"] == "published"
    assert second["stages"]["train"]["warm_start_from"] == f"{root}/runs/{DATES[0]}/train"
    assert second["gate"]["decision"] == "pass"
    assert second["stages"]["publish"]["previous"] == DATES[0]
    counts = second["stages"]["preprocess"]["counts"]
    assert counts["lines_read"] == 600
    assert second["stages"]["predict"]["lines"] == counts["nusers"] > 0
    serving = f"{root}/runs/{DATES[1]}/serving/{DATES[1].replace('-', '')}"
    assert FileSystems.exists(f"{serving}/saved_model.pb")
    # The export stage copied the train stage's SavedModel rather than writing it again.
    assert second["stages"]["export"]["copied_from"] == f"{root}/runs/{DATES[1]}/train/export"


def test_two_dates_are_published_on_gs(deployment):
    _check_two_dates_published(deployment)


def test_two_dates_are_published_on_gs_with_the_distributed_trainer(distributed):
    _check_two_dates_published(distributed)


def _objects(gcs: GcsEmulator, deployment: dict) -> tuple[list[str], str]:
    prefix = deployment["root"].split("/", 3)[3] + "/"
    return gcs.list_objects(deployment["bucket"], prefix), prefix


def test_a_rejected_date_leaves_the_pointer_unchanged(gcs, deployment):
    root = deployment["root"]
    result = _pipeline_run(deployment["pattern"], root, DATES[2], *WORSE)
    assert result.returncode == 1, result.stderr[-4000:]
    assert _published(root) == f"runs/{DATES[1]}\n"
    record = _record(root, DATES[2])
    assert record["status"] == "rejected" and record["gate"]["decision"] == "reject"
    assert "below the floor" in " ".join(record["gate"]["reasons"])
    assert set(record["stages"]) == {"preprocess", "train", "gate"}
    names, prefix = _objects(gcs, deployment)
    run = f"{prefix}runs/{DATES[2]}/"
    assert f"{run}train/metrics.json" in names  # kept for inspection
    assert not [n for n in names if n.startswith((f"{run}predictions", f"{run}serving"))]


def _lines(text: str) -> list[str]:
    return [line for line in text.split("\n") if line and line != "visitorId\tcontentIds"]


def test_distributed_batch_predict_writes_the_local_predictions_to_gs(gcs, deployment):
    from apache_beam.io.filesystems import FileSystems

    _check_two_dates_published(deployment)
    run = f"{deployment['root']}/runs/{DATES[1]}"
    output = f"gs://{deployment['bucket']}/predictions/{DATES[1]}"
    result = _python(
        "-m", "trainer.batch_predict", "--model_dir", f"{run}/train", "--output", output,
        "--k", "10", "--block_rows", "64", "--no_progress", "--distributed",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    manifest = json.loads(_read(f"{output}/predictions.json"))
    shards = sorted(m.path for m in FileSystems.match([f"{output}/predictions-*"])[0].metadata_list)
    assert [os.path.basename(s) for s in shards] == manifest["shards"]
    lines = [line for shard in shards for line in _lines(_read(shard).decode())]
    # The same lines as the run's own (local) predictions, made from the same model and k.
    local = _lines(_read(f"{run}/predictions.tsv").decode())
    assert sorted(lines) == sorted(local) and len(lines) == manifest["lines"]
    # Nothing but the shards, the manifest and the staging marker (README: `.written-by-ga-wals`).
    files = ["predictions.json", ".written-by-ga-wals", *manifest["shards"]]
    prefix = f"predictions/{DATES[1]}/"
    names = gcs.list_objects(deployment["bucket"], "predictions/")
    assert names == sorted(prefix + name for name in files)


@pytest.fixture(scope="module")
def resumed(gcs, deployment) -> dict:
    """A distributed trainer.task on gs:// that fails after half-sweep 3, then its relaunch.

    {"killed", "resumed": CompletedProcess; "after_kill", "after_resume": object names under
    gs://BUCKET/resumed/; "output": the --output_dir}
    """
    bucket = deployment["bucket"]
    preprocessed = f"{deployment['root']}/runs/{DATES[1]}/preprocessed"
    output = f"gs://{bucket}/resumed/model"
    argv = ["-m", "trainer.task", "--input_dir", preprocessed, "--output_dir", output]
    argv += [*FLAGS, "--distributed", "--block_rows", "64", "--no_progress"]
    out = {"output": output, "killed": _python(*argv, "--test_fail_after_sweep", "3")}
    out["after_kill"] = gcs.list_objects(bucket, "resumed/")
    out["resumed"] = _python(*argv)
    out["after_resume"] = gcs.list_objects(bucket, "resumed/")
    return out


def test_a_killed_distributed_trainer_resumes_on_gs(resumed):
    from trainer.beam import checkpoints

    killed = resumed["killed"]
    assert killed.returncode != 0
    assert "test fault injected after half-sweep 3" in killed.stderr, killed.stderr[-3000:]
    assert not [n for n in resumed["after_kill"] if n.startswith("resumed/model/")]
    assert (
        f"resumed/model.checkpoints/iter-0002/users/{checkpoints.MARKER}" in (resumed["after_kill"])
    )
    again = resumed["resumed"]
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resuming from the checkpoint of iteration 1" in again.stderr
    metrics = json.loads(_read(f"{resumed['output']}/metrics.json"))
    assert metrics["config"]["num_iters"] == 3
    model = [n[len("resumed/model/") :] for n in resumed["after_resume"]]
    assert {n.split("/")[0] for n in model} >= {"model", "export", "metrics.json", "tensorboard"}
    # Published: the checkpoints are removed (trainer.task, after the staged output moved).
    assert not [n for n in resumed["after_resume"] if "checkpoints" in n]


# What is left behind: only the outputs the README lists. TensorFlow's directory writes leave
# '/'-ending "folder" objects under a staging prefix; publishing must remove them too.


def test_nothing_but_outputs_is_left_under_the_root(gcs, deployment):
    """After two published dates, the rejected date, a prediction and a resumed trainer."""
    names, prefix = _objects(gcs, deployment)
    assert f"{prefix}published" in names
    left = unlisted(names, prefix)
    assert left == [], "left behind:\n" + "\n".join(left)


def test_nothing_but_outputs_is_left_under_the_distributed_root(gcs, distributed):
    names, prefix = _objects(gcs, distributed)
    assert f"{prefix}published" in names
    left = unlisted(names, prefix)
    assert left == [], "left behind:\n" + "\n".join(left)


def test_nothing_but_the_model_is_left_after_a_killed_and_resumed_trainer(resumed):
    # "resumed/": the directory object TF made for the output's parent.
    left = [n for n in resumed["after_resume"] if not n.startswith("resumed/model/")]
    assert left == ["resumed/"], "left behind:\n" + "\n".join(left)
