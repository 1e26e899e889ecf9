"""Where a run may read and write, given where its Beam workers run; checked by every entry point
before anything is loaded, so that a job does not fail hours in on a path it cannot use.

`check_locations(options, [Location("--output_dir", path, tensorflow=True), ...])` applies two
rules to each path flag (and to --temp_location when the Beam options set it), and raises
`common.cli.UsageError` naming the flag:

1. Workers elsewhere need shared locations. The DirectRunner family (DirectRunner, FnApiRunner,
   BundleBasedDirectRunner, InteractiveRunner, ...) runs its workers on this machine, and so
   does a portable runner (PortableRunner, FlinkRunner, SparkRunner, PrismRunner) whose SDK
   environment is LOOPBACK: `--environment_type LOOPBACK`, or the runner's own default (always
   for Prism; Flink with --flink_master [auto] or [local]; Spark with a local[...] master).
   Every other runner (Dataflow; a portable runner with DOCKER, PROCESS or EXTERNAL workers)
   runs them elsewhere, so a path on this machine's disk is refused, unless
   --workers_share_filesystem says that the workers see this machine's files (a local worker
   pool, an NFS mount); local paths must then be absolute, since the workers' working directory
   is not the launcher's.
2. Schemes. Every path must be on a filesystem Beam has here (`FileSystems.get_filesystem`:
   gs:// and s3:// with Beam's gcp and aws extras; hdfs:// with the hdfs package; not file://).
   A path TensorFlow reads or writes (a preprocessed dataset, a trained model's directory, a
   scheduled run's root) must also be on one of `TENSORFLOW_SCHEMES`, which TensorFlow 2.21
   implements without tensorflow-io: a local path or gs:// (s3://, hdfs:// and az:// are
   tensorflow-io's, which this project does not load). Paths only Beam touches (preprocessing's
   --input, batch predictions, --temp_location) may be on any Beam filesystem.

`scratch_dir` picks where a pipeline's workers leave results for the launcher: under
--temp_location, else under the output, never in a launcher-local temporary directory that
remote workers cannot reach.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import uuid
from collections.abc import Iterable

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (
    FlinkRunnerOptions,
    GoogleCloudOptions,
    PipelineOptions,
    PortableOptions,
    SparkRunnerOptions,
    StandardOptions,
)
from apache_beam.portability import python_urns

from common.atomic import is_local, temporary_name
from common.cli import UsageError

OPT_OUT = "--workers_share_filesystem"
# Schemes that TensorFlow 2.21 writes besides local paths (tf.io.gfile.get_registered_schemes()
# is ["ram", "file", "", "gs"]: ram:// is in memory and Beam has no file://).
TENSORFLOW_SCHEMES = ("gs",)
LOOPBACK = "LOOPBACK"
# Runners whose workers run on this machine whatever --environment_type says (lower case, as
# Beam's create_runner matches names).
LOCAL_RUNNERS = frozenset(
    name.lower()
    for name in (
        "DirectRunner",
        "SwitchingDirectRunner",
        "BundleBasedDirectRunner",
        "FnApiRunner",
        "TestDirectRunner",
        "InteractiveRunner",
    )
)
# Portable runners, whose workers' environment --environment_type (or their default) sets.
PORTABLE_RUNNERS = frozenset(("portablerunner", "flinkrunner", "sparkrunner", "prismrunner"))
# Beam's defaults when --environment_type is not given (flink_runner.MAGIC_HOST_NAMES,
# spark_runner.LOCAL_MASTER_PATTERN); every other portable runner defaults to DOCKER.
FLINK_LOCAL_MASTERS = ("[local]", "[auto]")
SPARK_LOCAL_MASTER = r"^local(\[.+\])?$"


class WorkerFilesOptions(PipelineOptions):
    """The opt-out of rule 1, a Beam pipeline option of every entry point."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            OPT_OUT,
            action="store_true",
            default=False,
            help="the Beam workers see this machine's files (e.g. a local worker pool or an NFS "
            "mount): allow local paths (absolute ones) with a runner whose workers run "
            "elsewhere",
        )


@dataclasses.dataclass(frozen=True)
class Location:
    """One path flag of an entry point.

    Attributes:
        flag: the flag as the user types it, e.g. "--output_dir".
        path: its value (a file, a directory or a file pattern).
        tensorflow: whether TensorFlow reads or writes it (`TENSORFLOW_SCHEMES` apply).
        workers: whether Beam workers read or write it (rule 1 applies).
    """

    flag: str
    path: str
    tensorflow: bool = False
    workers: bool = True


def runner_name(options: PipelineOptions) -> str:
    """The --runner's class name: "DirectRunner" for no --runner, "direct" or
    "apache_beam.runners.direct.direct_runner.DirectRunner" (Beam accepts all three)."""
    runner = options.view_as(StandardOptions).runner or StandardOptions.DEFAULT_RUNNER
    name = runner.rsplit(".", 1)[-1] if isinstance(runner, str) else type(runner).__name__
    return name if name.lower().endswith("runner") else f"{name[:1].upper()}{name[1:]}Runner"


def _default_environment(runner: str, options: PipelineOptions) -> str | None:
    """The SDK environment a portable runner picks without --environment_type (None: a runner
    this module does not know)."""
    if runner not in PORTABLE_RUNNERS:
        return None
    if options.view_as(PortableOptions).output_executable_path:
        return "DOCKER"  # a jar to run elsewhere: no LOOPBACK default
    if runner == "prismrunner":
        return LOOPBACK
    if runner == "flinkrunner":
        master = options.view_as(FlinkRunnerOptions).flink_master
        return LOOPBACK if master in FLINK_LOCAL_MASTERS else "DOCKER"
    if runner == "sparkrunner":
        master = options.view_as(SparkRunnerOptions).spark_master_url
        return LOOPBACK if re.match(SPARK_LOCAL_MASTER, master) else "DOCKER"
    return "DOCKER"


def remote_workers(options: PipelineOptions | None) -> str | None:
    """Where the Beam workers of `options` run, when it is not on this machine: e.g. "the
    DataflowRunner's workers" or "the PortableRunner's DOCKER workers"; None for a local run
    (no options, the DirectRunner family, a LOOPBACK environment)."""
    if options is None:
        return None
    runner = runner_name(options)
    key = runner.lower()
    if key in LOCAL_RUNNERS:
        return None
    if key in ("dataflowrunner", "testdataflowrunner"):  # Dataflow has no LOOPBACK
        return f"the {runner}'s workers"
    environment = options.view_as(PortableOptions).environment_type
    environment = environment or _default_environment(key, options)
    if environment in (LOOPBACK, python_urns.EMBEDDED_PYTHON_LOOPBACK):
        return None
    return f"the {runner}'s {environment} workers" if environment else f"the {runner}'s workers"


def workers_share_filesystem(options: PipelineOptions | None) -> bool:
    """Whether the user said that the workers see this machine's files (`OPT_OUT`)."""
    return options is not None and options.view_as(WorkerFilesOptions).workers_share_filesystem


def _scheme(path: str) -> str:
    return "" if is_local(path) else path.split("://", 1)[0].lower()


def _check_schemes(location: Location) -> None:
    flag, path = location.flag, location.path
    try:
        FileSystems.get_filesystem(path)
    except Exception as error:  # ValueError, or BeamIOError wrapping a missing package
        raise UsageError(
            f"{flag} {path}: Beam has no filesystem for {_scheme(path)}:// here ({error})"
        ) from None
    if location.tensorflow and _scheme(path) not in ("", *TENSORFLOW_SCHEMES):
        works = " or ".join(["a local path", *(f"{s}://" for s in TENSORFLOW_SCHEMES)])
        raise UsageError(
            f"{flag} {path}: TensorFlow reads or writes it, and TensorFlow has no "
            f"{_scheme(path)}:// filesystem here; give {works} (s3://, hdfs:// and az:// "
            "need tensorflow-io, which this project does not use)"
        )


def check_locations(options: PipelineOptions | None, locations: Iterable[Location]) -> None:
    """Applies the module's two rules to `locations` and to --temp_location (when set).

    Args:
        options: the run's Beam pipeline options, or None when no Beam pipeline runs.
        locations: the entry point's path flags; empty paths are skipped.

    Raises:
        UsageError: the first path that breaks a rule; the message names its flag and the fix.
    """
    locations = [location for location in locations if location.path]
    temp_location = options.view_as(GoogleCloudOptions).temp_location if options else None
    if temp_location:
        locations.append(Location("--temp_location", temp_location))
    remote = remote_workers(options)
    shared = workers_share_filesystem(options)
    for location in locations:
        _check_schemes(location)
        if remote is None or not location.workers or not is_local(location.path):
            continue
        if not shared:
            raise UsageError(
                f"{location.flag} {location.path} is on this machine, but {remote} run "
                "elsewhere and cannot reach it: give a location they share (e.g. "
                f"gs://bucket/path), or pass {OPT_OUT} if they see this machine's files (a local "
                "worker pool, an NFS mount)"
            )
        if not os.path.isabs(location.path):
            raise UsageError(
                f"{location.flag} {location.path} is relative: with {OPT_OUT} the workers see "
                "this machine's files but not its working directory; give an absolute path"
            )


def scratch_dir(options: PipelineOptions, purpose: str, under: str | None = None) -> str:
    """A fresh directory name where a pipeline's workers leave results for the launcher.

    Under --temp_location when it is set (`<temp_location>/<purpose>-XXXXXXXX`), else under
    `under` (`<under>/<purpose>.incomplete-XXXXXXXX`, a temporary name of `common.atomic`), else,
    for a run whose workers are on this machine, a new local temporary directory. The caller
    deletes it (`common.staging.delete_tree`) once read.

    Raises:
        ValueError: no --temp_location, no `under`, and workers elsewhere.
    """
    temp_location = options.view_as(GoogleCloudOptions).temp_location
    if temp_location:
        return f"{temp_location.rstrip('/')}/{purpose}-{uuid.uuid4().hex[:8]}"
    if under:
        return temporary_name(f"{under.rstrip('/')}/{purpose}")
    remote = remote_workers(options)
    if remote is None or workers_share_filesystem(options):
        return tempfile.mkdtemp(prefix=f"{purpose}-")
    raise ValueError(f"{remote} run elsewhere: give --temp_location for their {purpose} results")
