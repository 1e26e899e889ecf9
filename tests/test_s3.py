"""s3:// input end to end on moto's server (tests/s3_emulator.py): preprocessing reads an
s3:// --input under Beam's S3 flags, and gives the dataset the same files give on local disk.

The same two gzip exports are on local disk and in a bucket. Checked: the local multi-process
reader (`ReadLineBatches`, two worker processes that get the flags from the job's options),
`ReadInput` (Beam's ReadFromText and ReadAllFromText, what a distributed runner reads with),
the input check of `pipeline.preprocess`, and `pipeline.run` resolving a dated s3:// --input
and handing the flags to its preprocess stage. Outputs stay local: TensorFlow 2.21 has no s3://
of its own.
"""

from __future__ import annotations

import gzip
import json
import os

import apache_beam as beam
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from conftest import read_cells, read_vocabulary
from s3_emulator import S3Emulator

from common import cli
from pipeline import options as preprocess_options
from pipeline import preprocess, synthetic
from pipeline.reading import ReadInput, ReadLineBatches
from pipeline.scheduled import launch
from transforms import features

DATE = "2017-08-01"
NAMES = ("sessions-1.jsonl.gz", "sessions-2.jsonl.gz")
# What may differ between two runs of the same data: where it came from, and how long it took.
RUN_FIELDS = ("input", "seconds")

try:
    import boto3  # noqa: F401 - Beam's S3 filesystem needs it
except ImportError:  # a venv without the test extra: a broken install, not a reason to skip
    pytest.fail("boto3 is missing: pip install -e '.[test]' (apache-beam[aws])", pytrace=False)


@pytest.fixture(autouse=True)
def no_filesystem_options():
    """Each test starts as a fresh process does, with no options in Beam's FileSystems: what
    hands them the S3 flags is tested, not what an earlier test left there."""
    FileSystems.set_options(None)
    yield
    FileSystems.set_options(None)


@pytest.fixture(scope="module")
def s3():
    with S3Emulator() as emulator:
        yield emulator


@pytest.fixture(scope="module")
def exports(s3, tmp_path_factory) -> dict[str, str]:
    """{"local", "s3", "bucket", "lines"}: the patterns of the same two exports (with 4 bad
    lines each) on disk and in a bucket, under DATE/, and the lines of each, in order."""
    local = tmp_path_factory.mktemp("exports") / DATE
    local.mkdir()
    bucket = f"ga-wals-{os.getpid()}"
    s3.create_bucket(bucket)
    lines = {}
    for seed, name in enumerate(NAMES, start=21):
        path = local / name
        synthetic.write_sessions(str(path), num_sessions=300, seed=seed, bad_lines=4)
        s3.put(bucket, f"{DATE}/{name}", path.read_bytes())
        lines[name] = gzip.decompress(path.read_bytes()).splitlines()
    assert s3.list_objects(bucket) == [f"{DATE}/{name}" for name in NAMES]
    return {
        "local": str(local / "sessions-*.jsonl.gz"),
        "s3": f"s3://{bucket}/{DATE}/sessions-*.jsonl.gz",
        "bucket": bucket,
        "lines": lines,
    }


@pytest.fixture(scope="module")
def local_dataset(exports, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("local") / "preprocessed")
    preprocess.run(["--input", exports["local"], "--output_dir", out])
    return out


def _summary(directory: str) -> dict:
    with open(os.path.join(directory, features.SUMMARY_FILE)) as handle:
        return json.load(handle)


def assert_same_dataset(expected: str, got: str) -> None:
    """The same summary (but where the input was and how long it took), vocabularies and
    cells."""
    want, have = _summary(expected), _summary(got)
    assert {k: v for k, v in have.items() if k not in RUN_FIELDS} == {
        k: v for k, v in want.items() if k not in RUN_FIELDS
    }
    assert have["train_interactions"] > 0 and have["counters"]["rejected_by_reason"]
    for vocabulary in (features.USER_VOCAB, features.ITEM_VOCAB):
        assert read_vocabulary(got, vocabulary) == read_vocabulary(expected, vocabulary)
    for split in (features.TRAIN_DIR, features.EVAL_DIR):
        assert read_cells(got, split) == read_cells(expected, split)


def test_beams_filesystems_reach_the_bucket_with_the_flags(s3, exports):
    FileSystems.set_options(PipelineOptions(s3.flags))
    [match] = FileSystems.match([exports["s3"]])
    assert [m.path for m in match.metadata_list] == [
        f"s3://{exports['bucket']}/{DATE}/{name}" for name in NAMES
    ]
    with FileSystems.open(match.metadata_list[0].path) as handle:  # gunzipped by its name
        assert handle.read().splitlines() == exports["lines"][NAMES[0]]


def test_preprocessing_an_s3_input_with_two_local_workers_gives_the_local_dataset(
    s3, exports, local_dataset, tmp_path
):
    out = str(tmp_path / "preprocessed")
    summary = preprocess.run(
        ["--input", exports["s3"], "--output_dir", out, *s3.flags]
        + ["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"]
    )
    assert summary["input"] == exports["s3"]
    assert summary["counters"]["lines_read"] == sum(map(len, exports["lines"].values())) == 608
    assert_same_dataset(local_dataset, out)


def test_read_input_reads_the_same_lines_from_s3(s3, exports):
    """ReadInput, the reader of distributed runners: one pattern (ReadFromText) or several
    (ReadAllFromText); and ReadLineBatches with three readers in this process."""
    every = [line for name in NAMES for line in exports["lines"][name]]
    one = f"s3://{exports['bucket']}/{DATE}/{NAMES[0]}"
    several = ",".join(f"s3://{exports['bucket']}/{DATE}/{name}" for name in NAMES)
    with TestPipeline(options=PipelineOptions(s3.flags)) as p:
        for label, patterns, expected in (
            ("One", one, exports["lines"][NAMES[0]]),
            ("Several", several, every),
        ):
            opts = PipelineOptions(["--input", patterns]).view_as(
                preprocess_options.PreprocessOptions
            )
            assert_that(p | label >> ReadInput(opts), equal_to(expected), label=f"Check{label}")
        batches = p | "Batches" >> ReadLineBatches([exports["s3"]], 3)
        assert_that(batches | beam.FlatMap(lambda batch: batch), equal_to(every), "Batched")


def test_an_s3_pattern_that_matches_nothing_is_refused_before_anything_runs(s3, exports):
    missing = f"s3://{exports['bucket']}/{DATE}/nothing-*.gz"
    with pytest.raises(cli.UsageError, match="matches no files"):
        preprocess.run(["--input", missing, "--output_dir", "/nonexistent/out", *s3.flags])


def test_a_scheduled_run_reads_its_dated_s3_input_with_the_flags(
    s3, exports, local_dataset, tmp_path
):
    pattern = f"s3://{exports['bucket']}/{{date}}/sessions-*.jsonl.gz"
    root = str(tmp_path / "root")
    status = launch.run(
        ["--date", DATE, "--input", pattern, "--root", root, "--stages", "preprocess", *s3.flags]
    )
    assert status == 0
    with open(os.path.join(root, "runs", DATE, "run.json")) as handle:
        record = json.load(handle)
    assert record["input"] == [exports["s3"]]
    assert record["stages"]["preprocess"]["status"] == "done"
    assert_same_dataset(local_dataset, os.path.join(root, "runs", DATE, "preprocessed"))
    # A date without files: refused before the run takes its lock or writes anything.
    with pytest.raises(cli.UsageError, match="no input for 2017-08-02"):
        launch.run(["--date", "2017-08-02", "--input", pattern, "--root", root, *s3.flags])
