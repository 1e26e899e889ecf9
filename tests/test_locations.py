"""common.locations: which paths a run may use given where its workers run, and on which schemes;
the rule against Beam's own choice of SDK environment and TensorFlow's own filesystems, and the
entry points refusing bad locations (exit status 2, the flag named) before anything is loaded."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from common import locations
from common.atomic import is_temporary
from common.cli import UsageError
from common.locations import Location

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATAFLOW = ["--runner", "DataflowRunner", "--project", "p", "--region", "us-central1"]
EXTERNAL = [
    "--runner", "PortableRunner", "--job_endpoint", "localhost:1",
    "--environment_type", "EXTERNAL", "--environment_config", "localhost:2",
]  # fmt: skip


def _on(runner: str, *flags: str) -> list[str]:
    return ["--runner", runner, *flags]


LOOPBACK = ("--environment_type", "LOOPBACK")
FLINK_CLUSTER = ("--flink_master", "jm:8081")


@pytest.mark.parametrize(
    ("flags", "remote"),
    [
        ([], None),
        (_on("DirectRunner"), None),
        (_on("direct"), None),
        (_on("apache_beam.runners.direct.direct_runner.DirectRunner"), None),
        (_on("FnApiRunner"), None),
        (_on("BundleBasedDirectRunner"), None),
        (_on("InteractiveRunner"), None),
        (_on("DirectRunner", "--environment_type", "DOCKER"), None),
        (DATAFLOW, "the DataflowRunner's workers"),
        ([*DATAFLOW, *LOOPBACK], "the DataflowRunner's workers"),
        (_on("PortableRunner"), "the PortableRunner's DOCKER workers"),
        (_on("PortableRunner", *LOOPBACK), None),
        (EXTERNAL, "the PortableRunner's EXTERNAL workers"),
        (_on("FlinkRunner"), None),  # --flink_master [auto]: LOOPBACK
        (_on("FlinkRunner", *FLINK_CLUSTER), "the FlinkRunner's DOCKER workers"),
        (_on("FlinkRunner", *FLINK_CLUSTER, *LOOPBACK), None),
        (_on("SparkRunner"), None),  # local[4]
        (
            _on("SparkRunner", "--spark_master_url", "spark://m:1"),
            "the SparkRunner's DOCKER workers",
        ),
        (_on("PrismRunner"), None),
        (_on("PrismRunner", "--environment_type", "PROCESS"), "the PrismRunner's PROCESS workers"),
        (_on("my.module.ClusterRunner"), "the ClusterRunner's workers"),
        (_on("my.module.ClusterRunner", *LOOPBACK), None),
    ],
)
def test_where_the_workers_run(flags, remote):
    assert locations.remote_workers(PipelineOptions(flags)) == remote


def test_runner_names():
    for runner, name in [
        (None, "DirectRunner"),
        ("direct", "DirectRunner"),
        ("dataflow", "DataflowRunner"),
        ("apache_beam.runners.portability.flink_runner.FlinkRunner", "FlinkRunner"),
    ]:
        flags = ["--runner", runner] if runner else []
        assert locations.runner_name(PipelineOptions(flags)) == name
    assert locations.remote_workers(PipelineOptions(["--runner", "dataflow"])) == (
        "the DataflowRunner's workers"
    )


def _portable_cases():
    for runner in ("PortableRunner", "FlinkRunner", "SparkRunner", "PrismRunner"):
        for environment in (None, "LOOPBACK", "DOCKER", "PROCESS", "EXTERNAL"):
            for master in (
                [],
                ["--flink_master", "jm:8081"],
                ["--spark_master_url", "spark://m:1"],
            ):
                for jar in ([], ["--output_executable_path", "/tmp/job.jar"]):
                    flags = [*master, *jar]
                    if environment:
                        flags += ["--environment_type", environment]
                    if environment == "PROCESS":
                        flags += ["--environment_config", '{"command": "/bin/true"}']
                    if environment == "EXTERNAL":
                        flags += ["--environment_config", "localhost:2"]
                    yield runner, flags


@pytest.mark.parametrize(("runner", "flags"), list(_portable_cases()))
def test_the_rule_agrees_with_beams_choice_of_environment(runner, flags):
    """Local exactly when Beam's portable runner would run the SDK workers in this process."""
    from apache_beam.runners.portability import (
        flink_runner,
        portable_runner,
        prism_runner,
        spark_runner,
    )
    from apache_beam.transforms.environments import PythonLoopbackEnvironment

    classes = {
        "PortableRunner": portable_runner.PortableRunner,
        "FlinkRunner": flink_runner.FlinkRunner,
        "SparkRunner": spark_runner.SparkRunner,
        "PrismRunner": prism_runner.PrismRunner,
    }
    mine = locations.remote_workers(PipelineOptions(["--runner", runner, *flags])) is None
    beams = classes[runner]().default_environment(PipelineOptions(flags))
    assert mine == isinstance(beams, PythonLoopbackEnvironment)


def test_workers_elsewhere_refuse_local_paths_naming_the_flag():
    with pytest.raises(UsageError) as caught:
        locations.check_locations(
            PipelineOptions(DATAFLOW), [Location("--output_dir", "/data/out", tensorflow=True)]
        )
    message = str(caught.value)
    assert message.startswith("--output_dir /data/out is on this machine")
    assert "the DataflowRunner's workers" in message and locations.OPT_OUT in message
    # Shared locations, and paths only the launcher reads, are fine.
    locations.check_locations(
        PipelineOptions(DATAFLOW),
        [
            Location("--output_dir", "gs://b/out", tensorflow=True),
            Location("--input", "s3://b/in/*.gz"),
            Location("--warm_start_from", "/data/model", workers=False),
        ],
    )


def test_temp_location_is_checked_too():
    options = PipelineOptions([*EXTERNAL, "--temp_location", "/tmp/t"])
    with pytest.raises(UsageError, match="^--temp_location /tmp/t is on this machine"):
        locations.check_locations(options, [Location("--output", "gs://b/p")])
    locations.check_locations(PipelineOptions([*EXTERNAL, "--temp_location", "gs://b/t"]), [])


def test_local_runners_take_local_paths():
    for options in (None, PipelineOptions([]), PipelineOptions(["--runner", "FlinkRunner"])):
        locations.check_locations(
            options,
            [Location("--output_dir", "relative/out", tensorflow=True), Location("--input", "/x")],
        )


def test_the_opt_out_takes_absolute_local_paths_only():
    options = PipelineOptions([*EXTERNAL, locations.OPT_OUT])
    assert locations.workers_share_filesystem(options)
    locations.check_locations(options, [Location("--output_dir", "/data/out", tensorflow=True)])
    with pytest.raises(UsageError, match="^--output_dir data/out is relative: with --workers_sh"):
        locations.check_locations(options, [Location("--output_dir", "data/out")])


@pytest.mark.parametrize(
    ("path", "tensorflow", "refused"),
    [
        ("/data/out", True, None),
        ("gs://b/out", True, None),
        ("s3://b/out", False, None),  # Beam's aws extra; TensorFlow never touches it
        ("s3://b/out", True, "TensorFlow has no s3:// filesystem here; give a local path or gs://"),
        ("az://b/out", True, "Beam has no filesystem for az://"),
        ("nosuch://b/out", False, "Beam has no filesystem for nosuch://"),
        ("file:///data/out", False, "Beam has no filesystem for file://"),
    ],
)
def test_schemes(path, tensorflow, refused):
    location = Location("--output_dir", path, tensorflow=tensorflow)
    if refused is None:
        locations.check_locations(None, [location])
        return
    with pytest.raises(UsageError) as caught:
        locations.check_locations(None, [location])
    assert str(caught.value).startswith(f"--output_dir {path}: ") and refused in str(caught.value)


def test_tensorflow_schemes_are_tensorflows_own():
    """The static list is exactly what TensorFlow registers, less ram:// and file:// (which Beam
    lacks); s3://, hdfs:// and az:// are unimplemented (they are tensorflow-io's)."""
    import tensorflow as tf

    registered = set(tf.io.gfile.get_registered_schemes())
    assert registered - {"", "file", "ram"} == set(locations.TENSORFLOW_SCHEMES)
    for scheme in ("s3", "hdfs", "az"):
        with pytest.raises(tf.errors.UnimplementedError):
            tf.io.gfile.exists(f"{scheme}://bucket/x")


def test_scratch_dir(tmp_path):
    with_temp = PipelineOptions([*DATAFLOW, "--temp_location", "gs://b/tmp/"])
    assert locations.scratch_dir(with_temp, "evaluate", "gs://b/model").startswith(
        "gs://b/tmp/evaluate-"
    )
    under = locations.scratch_dir(PipelineOptions(DATAFLOW), "evaluate", "gs://b/model/")
    assert under.startswith("gs://b/model/evaluate") and is_temporary(under)
    local = locations.scratch_dir(PipelineOptions([]), "evaluate")
    try:
        assert os.path.isdir(local)
    finally:
        os.rmdir(local)
    with pytest.raises(ValueError, match="give --temp_location"):
        locations.scratch_dir(PipelineOptions(DATAFLOW), "evaluate")


# The entry points: exit status 2, the flag named, nothing written.


def test_trainer_refuses_a_local_output_for_dataflow_before_loading(tmp_path):
    out = tmp_path / "model"
    result = subprocess.run(
        [
            sys.executable, "-m", "trainer.task", "--distributed",
            "--input_dir", "gs://no-such-bucket/preprocessed", "--output_dir", str(out),
            *DATAFLOW, "--temp_location", "gs://no-such-bucket/tmp",
        ],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"error: --output_dir {out} is on this machine" in result.stderr
    assert os.listdir(tmp_path) == []  # neither the model nor <output_dir>.checkpoints


def test_preprocess_refuses_an_output_tensorflow_cannot_write(tmp_path, capsys):
    from pipeline import preprocess

    sample = tmp_path / "sessions.json"
    sample.write_text("")
    argv = ["--input", str(sample), "--output_dir", "s3://bucket/preprocessed"]
    assert preprocess.main(argv) == 2
    error = capsys.readouterr().err
    assert "error: --output_dir s3://bucket/preprocessed: TensorFlow" in error and "gs://" in error


def test_preprocess_refuses_a_local_input_for_docker_workers(tmp_path, capsys):
    from pipeline import preprocess

    sample = tmp_path / "sessions.json"
    sample.write_text("")
    argv = ["--input", str(sample), "--output_dir", "gs://b/pre", "--runner", "PortableRunner"]
    assert preprocess.main([*argv, "--job_endpoint", "localhost:1"]) == 2
    assert f"error: --input {sample} is on this machine" in capsys.readouterr().err


def test_batch_predict_refuses_local_paths_for_external_workers_without_the_opt_out(
    tmp_path, capsys
):
    from trainer import batch_predict

    out = tmp_path / "predictions"
    argv = ["--model_dir", "gs://b/model", "--output", str(out), "--distributed", *EXTERNAL]
    assert batch_predict.main(argv) == 2
    error = capsys.readouterr().err
    assert f"error: --output {out} is on this machine" in error and locations.OPT_OUT in error
    assert not out.exists()


def test_scheduled_run_refuses_a_local_root_for_dataflow(tmp_path, capsys):
    from pipeline.scheduled import launch

    (tmp_path / "ga_sessions_20170801.json").write_text("")
    root = tmp_path / "root"
    pattern = str(tmp_path / "ga_sessions_{date_nodash}.json")  # found, then refused too
    argv = ["--date", "2017-08-01", "--input", pattern]
    argv += ["--root", str(root), *DATAFLOW]
    assert launch.main(argv) == 2
    assert f"error: --root {root} is on this machine" in capsys.readouterr().err
    assert not root.exists()


def test_distributed_evaluation_cleans_up_its_scratch(tiny_model, tiny_preprocessed, tmp_path):
    """The workers' results go under --temp_location, else under the model directory, and are
    removed once read."""
    from trainer.beam import eval_pipeline

    def tree() -> list[str]:
        return sorted(
            os.path.join(d, n) for d, dirs, files in os.walk(tiny_model) for n in dirs + files
        )

    before = tree()
    eval_pipeline.evaluate_model_distributed(tiny_model, tiny_preprocessed, [], block_rows=64)
    assert tree() == before
    temp = tmp_path / "temp"
    flags = ["--temp_location", str(temp)]
    eval_pipeline.evaluate_model_distributed(tiny_model, tiny_preprocessed, flags, block_rows=64)
    assert os.listdir(temp) == [] and tree() == before  # written there, then removed
