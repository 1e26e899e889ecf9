"""Locks and the `published` pointer on gs://, on the local GCS emulator (tests/gcs_emulator.py).

The emulator (fake-gcs-server 1.54) enforces generation preconditions on simple uploads, which
is every write these objects get (`common.object_store`); it ignores them on delete, so the
tests here judge what breaking, renewing and replacing do, never a conditional delete.

Unit tests drive `pipeline.object_locks` and `pipeline.runstate` in this process (Beam's
google-cloud-storage client, no TensorFlow gs://); the end-to-end test starts launches of
`python -m pipeline.run --root gs://...` as subprocesses with the emulator's variables.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from common import cli, object_store
from pipeline import locks, object_locks, runstate
from pipeline.scheduled.flags import STAGES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATE = "2017-08-01"
FLAGS = ["--latent_factors", "4", "--num_iters", "3", "--eval_ks", "20", "--loss_every", "0"]
LEFTOVER_MARKS = (".lock", ".incomplete-", ".tmp-", ".replaced-", "beam-temp", "checkpoints")


def _holder(path: str) -> tuple[dict, int]:
    version = object_store.read(path)
    assert version is not None, f"no lock at {path}"
    return json.loads(version.data), version.generation


def _write_holder(path: str, lease_seconds: float, host: str = "another-host") -> int:
    """A lock as a launch on `host` writes it (`ObjectLock.holder`'s fields); its generation."""
    holder = {"owner": "elsewhere", "pid": 4242, "host": host, "pid_namespace": None}
    holder |= {"started": locks.now(), "heartbeat": locks.now(), "lease_seconds": lease_seconds}
    generation = object_store.write_if(path, json.dumps(holder).encode(), 0)
    assert generation is not None
    return generation


# The lock.
def test_the_lock_is_created_only_if_absent_names_its_owner_and_goes_on_release(gcs, bucket):
    path = f"gs://{bucket}/root/runs/{DATE}/.lock"
    with object_locks.object_lock(path, f"the run of {DATE}") as held:
        holder, generation = _holder(path)
        assert holder["owner"] == held.owner and generation == held.generation
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert holder["lease_seconds"] == object_locks.LEASE_SECONDS
        with pytest.raises(locks.LockedError) as refused:
            with object_locks.object_lock(path, f"the run of {DATE}"):
                pass
        assert f"the run of {DATE} is locked by another launch" in str(refused.value)
        assert f"pid {os.getpid()} on {socket.gethostname()}" in str(refused.value)
        assert _holder(path) == (holder, generation)  # the refused launch changed nothing
        held.check()
    assert gcs.list_objects(bucket) == []


def test_a_second_launch_waits_for_the_lock_and_takes_it_when_released(gcs, bucket):
    path = f"gs://{bucket}/root/.publish.lock"
    first = object_locks.ObjectLock(path, "publishing")
    first.acquire()
    timer = threading.Timer(1.0, first.release)
    timer.start()
    start = time.monotonic()
    with object_locks.object_lock(path, "publishing", wait_seconds=30, poll=0.05) as second:
        waited = time.monotonic() - start
        assert _holder(path)[0]["owner"] == second.owner != first.owner
    timer.join()
    assert 0.9 < waited < 15
    assert gcs.list_objects(bucket) == []


def test_a_live_holder_renews_its_lock_so_it_is_never_broken(gcs, bucket):
    path = f"gs://{bucket}/root/runs/{DATE}/.lock"
    with object_locks.object_lock(path, "the run", lease_seconds=1.0) as held:
        first = held.generation
        time.sleep(2.5)  # two and a half leases: renewed every 0.25 s
        holder, generation = _holder(path)
        assert generation == held.generation != first and holder["owner"] == held.owner
        with pytest.raises(locks.LockedError):
            with object_locks.object_lock(path, "the run", lease_seconds=1.0):
                pass
        held.check()
    assert gcs.list_objects(bucket) == []


def test_the_holders_lease_rules_not_the_finders(gcs, bucket):
    path = f"gs://{bucket}/root/.lock"
    generation = _write_holder(path, lease_seconds=600)
    time.sleep(0.3)
    with pytest.raises(locks.LockedError, match="pid 4242 on another-host"):
        with object_locks.object_lock(path, "the run", lease_seconds=0.1):
            pass
    assert _holder(path)[1] == generation


def test_is_stale_by_lease_and_by_a_dead_pid_on_this_host():
    host, namespace = socket.gethostname(), object_locks.pid_namespace()
    far = {"pid": 4242, "host": "another-host", "lease_seconds": 10.0}
    assert not object_locks.is_stale(far, updated=100.0, now=110.0, lease_seconds=1.0)
    assert object_locks.is_stale(far, updated=100.0, now=110.5, lease_seconds=1.0)
    # No lease named, or unreadable: the finder's own.
    assert object_locks.is_stale({"pid": 1}, updated=100.0, now=101.5, lease_seconds=1.0)
    assert not object_locks.is_stale(None, updated=100.0, now=100.5, lease_seconds=1.0)
    gone = int(  # the pid of a process that has exited
        subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    mine = {"host": host, "pid_namespace": namespace, "lease_seconds": 600.0}
    assert object_locks.is_stale(mine | {"pid": gone}, updated=100.0, now=100.0, lease_seconds=1)
    assert not object_locks.is_stale(
        mine | {"pid": os.getpid()}, updated=100.0, now=100.0, lease_seconds=1
    )
    # Another pid namespace (a container sharing the host's name): its pids mean nothing here.
    other = mine | {"pid": gone, "pid_namespace": "pid:[1]"}
    assert not object_locks.is_stale(other, updated=100.0, now=100.0, lease_seconds=1)


def test_a_stale_lock_is_taken_over_by_exactly_one_of_many_breakers(gcs, bucket):
    path = f"gs://{bucket}/root/runs/{DATE}/.lock"
    stale = _write_holder(path, lease_seconds=0.5)
    time.sleep(1.0)
    # Two breakers that judged the same version stale: the conditional replace lets one win.
    version = object_store.read(path)
    assert version.generation == stale
    assert object_locks.is_stale(json.loads(version.data), version.updated, time.time(), 600)
    won = [object_store.write_if(path, f"breaker {i}".encode(), stale) for i in range(2)]
    assert won[0] is not None and won[1] is None
    assert object_store.read(path).data == b"breaker 0"
    # Eight launches at once against a lock gone stale: one takes it, seven are refused.
    assert object_store.delete_if(path, won[0])
    _write_holder(path, lease_seconds=0.5)
    time.sleep(1.0)
    barrier = threading.Barrier(8)
    taken, refused = [], []

    def launch() -> None:
        lock = object_locks.ObjectLock(path, "the run")  # its own lease: 10 minutes
        barrier.wait()
        try:
            lock.acquire()
        except locks.LockedError:
            refused.append(lock)
            return
        taken.append(lock)

    threads = [threading.Thread(target=launch) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(taken) == 1 and len(refused) == 7
    assert _holder(path)[0]["owner"] == taken[0].owner
    taken[0].release()
    assert gcs.list_objects(bucket) == []


def test_a_lock_killed_on_this_host_is_taken_over_at_once(gcs, bucket):
    path = f"gs://{bucket}/root/runs/{DATE}/.lock"
    code = f"""
        import os
        from pipeline import object_locks
        object_locks.ObjectLock({path!r}, "the run").acquire()
        print(os.getpid(), flush=True)
        os._exit(9)  # killed: no release
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 9, result.stderr[-2000:]
    assert _holder(path)[0]["pid"] == int(result.stdout)
    with object_locks.object_lock(path, "the run", wait_seconds=0) as held:  # lease: 10 min
        assert _holder(path)[0]["owner"] == held.owner
    assert gcs.list_objects(bucket) == []


def test_a_holder_whose_lock_was_taken_over_knows_and_leaves_it(gcs, bucket):
    path = f"gs://{bucket}/root/runs/{DATE}/.lock"
    held = object_locks.ObjectLock(path, "the run", lease_seconds=0.4)  # renewed every 0.1 s
    held.acquire()
    while True:  # a breaker replaces the version it read (the holder may renew in between)
        version = object_store.read(path)
        if object_store.write_if(path, b'{"owner": "breaker"}', version.generation):
            break
    deadline = time.monotonic() + 10
    while not held.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(locks.LockLostError, match="was taken over by another launch"):
        held.check()
    held.release()
    assert _holder(path)[0] == {"owner": "breaker"}  # the new holder's lock stays


# The pointer.
def test_published_is_replaced_only_if_its_generation_still_matches(gcs, bucket):
    root = f"gs://{bucket}/ga-wals"
    nothing = runstate.read_published(root)
    assert nothing == runstate.Pointer(None, 0)
    assert runstate.publish(root, "2017-08-01", nothing) == "runs/2017-08-01"
    first = runstate.read_published(root)
    assert first.text == "runs/2017-08-01" and first.date == "2017-08-01" and first.version > 0
    # A launch that read "nothing published" before that may not overwrite it.
    with pytest.raises(runstate.PointerMovedError, match="another launch published meanwhile"):
        runstate.publish(root, "2017-08-03", nothing)
    # Two launches that read the same version: the first replaces it, the second is refused.
    assert runstate.publish(root, "2017-08-02", first) == "runs/2017-08-02"
    with pytest.raises(runstate.PointerMovedError):
        runstate.publish(root, "2017-08-03", first)
    second = runstate.read_published(root)
    assert second.text == runstate.published(root) == "runs/2017-08-02"
    assert second.version != first.version
    assert object_store.read(f"{root}/published").data == b"runs/2017-08-02\n"


def test_a_root_without_preconditions_is_refused_before_anything_runs(capsys):
    from pipeline.scheduled import launch

    with pytest.raises(cli.UsageError, match=r"--root s3://b/ga-wals: .* or gs://"):
        runstate.check_root("s3://b/ga-wals")
    argv = ["--date", DATE, "--input", "/nowhere/{date}.json", "--root", "hdfs://nn/ga-wals"]
    assert launch.main(argv) == 2
    assert "--root hdfs://nn/ga-wals: scheduled runs need a local directory or gs://" in (
        capsys.readouterr().err
    )
    root = ["--root", "gs://b/ga-wals", "--lock_lease_seconds", "0"]
    assert launch.main([*argv[:4], *root]) == 2
    assert "--lock_lease_seconds must be > 0, got 0.0" in capsys.readouterr().err


# Two launches of one date, end to end.
def _launch(pattern: str, root: str, *extra: str) -> subprocess.Popen:
    argv = ["-m", "pipeline.run", "--date", DATE, "--input", pattern, "--root", root, *FLAGS]
    return subprocess.Popen(
        [sys.executable, *argv, "--gate_tolerance", "0.2", *extra],
        cwd=REPO,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_concurrent_launches_of_one_date_leave_one_complete_published_run(
    gcs, bucket, tmp_path
):
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    from pipeline import synthetic

    local = str(tmp_path / "sessions.json.gz")
    synthetic.write_sessions(
        local, 600, seed=5, num_visitors=200, num_items=150, num_topics=4, date=DATE
    )  # as tests/test_gcs.py: a model that passes the gate's floor
    with open(local, "rb") as source:
        name = f"gs://{bucket}/ga360/ga_sessions_{DATE.replace('-', '')}.json.gz"
        with FileSystems.create(name, compression_type=CompressionTypes.UNCOMPRESSED) as out:
            out.write(source.read())
    pattern = f"gs://{bucket}/ga360/ga_sessions_{{date_nodash}}.json.gz"
    root = f"gs://{bucket}/ga-wals"
    lock = f"ga-wals/runs/{DATE}/.lock"
    launches = [_launch(pattern, root, "--lock_wait", "600") for _ in range(2)]
    deadline = time.monotonic() + 120
    while lock not in gcs.list_objects(bucket, "ga-wals/") and time.monotonic() < deadline:
        time.sleep(0.2)
    impatient = _launch(pattern, root)  # no --lock_wait: refused at once
    _, impatient_err = impatient.communicate(timeout=300)
    errors = [launch.communicate(timeout=600)[1] for launch in launches]
    for launch, err in zip(launches, errors):
        assert launch.returncode == 0, err[-4000:]
    # Exactly one launch ran the stages; the other waited for its lock and found them done.
    ran = [i for i, err in enumerate(errors) if f"stage train of {DATE}: running" in err]
    assert len(ran) == 1, errors
    winner, waited = launches[ran[0]], errors[1 - ran[0]]
    assert f"waiting for the run of {DATE}, locked by pid {winner.pid} on " in waited
    assert waited.count("done before, skipped") == len(STAGES)
    assert not [stage for stage in STAGES if f"stage {stage} of {DATE}: running" in waited]
    assert impatient.returncode == 75, impatient_err[-3000:]
    assert f"the run of {DATE} is locked by another launch (pid " in impatient_err
    with FileSystems.open(f"{root}/runs/{DATE}/run.json") as handle:
        record = json.loads(handle.read())
    assert record["status"] == "published" and record["attempts"] == 2
    assert record["stages"]["publish"]["published"] is True
    assert object_store.read(f"{root}/published").data == f"runs/{DATE}\n".encode()
    names = gcs.list_objects(bucket, "ga-wals/")
    assert f"ga-wals/runs/{DATE}/serving/{DATE.replace('-', '')}/saved_model.pb" in names
    left = [n for n in names if any(mark in n for mark in LEFTOVER_MARKS)]
    assert left == [], left
