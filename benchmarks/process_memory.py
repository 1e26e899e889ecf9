"""Resident memory of a launcher, a job service and a worker pool's workers, sampled and
attributed to the stages of a run.

    sampler = RssSampler({"launcher": (pid, False), "job service": (pid, True),
                          "worker pool": (pid, False)}, workers_of=pool_pid)
    sampler.start(); ...; sampler.stop()
    peaks = stage_peaks(sampler.samples, sampler.workers, [(t0, "preprocess"), ...], end)

Every `interval` s the sampler reads the RSS of each named process (with its descendants summed
when asked: a job service's runner may start processes of its own) and of every descendant of
`workers_of`, each a worker of its own. A sample is (time.monotonic(), {label: bytes}); a
process that has exited (or is a zombie, RSS 0) is left out of it.

Attribution (`stage_peaks`): stage i runs from its start to the next stage's start (the last to
`end`); samples before the first start belong to "start-up". A named process's peak in a stage
is the largest of its samples in that stage. A worker belongs to the stage in which it was
first seen (an SDK worker serves one job and may outlive it by a moment), with the largest of
all its samples; a stage's worker peak is the largest of its workers'. A stage shorter than the
interval may hold no sample: the caller takes one when a stage starts (`RssSampler.sample`).
"""

from __future__ import annotations

import dataclasses
import threading
import time

MB = 2**20
STARTUP = "start-up"
WHOLE_RUN = "whole run"
WORKER = "worker"


@dataclasses.dataclass
class WorkerSeen:
    """A worker process: when it was first seen, its command line, and its largest RSS."""

    pid: int
    first_seen: float
    command: str
    peak_bytes: int = 0


class RssSampler:
    """Samples RSS in a thread (psutil) until `stop`.

    Args:
        named: {label: (pid, with_descendants)}: the processes sampled under their label.
        workers_of: a process whose descendants are sampled one by one as workers.
        interval: seconds between samples.

    Attributes:
        samples: [(time.monotonic(), {label: bytes})], workers labelled "worker:<pid>".
        workers: {pid: WorkerSeen}.
    """

    def __init__(
        self,
        named: dict[str, tuple[int, bool]],
        workers_of: int | None = None,
        interval: float = 0.2,
    ) -> None:
        import psutil  # the bench extra: imported here so that importing this module needs none

        self._psutil = psutil
        self._named = {label: (psutil.Process(pid), tree) for label, (pid, tree) in named.items()}
        self._pool = psutil.Process(workers_of) if workers_of is not None else None
        self._interval = interval
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.workers: dict[int, WorkerSeen] = {}

    def _rss(self, process) -> int:
        try:
            return process.memory_info().rss
        except self._psutil.Error:
            return 0

    def _children(self, process) -> list:
        try:
            return process.children(recursive=True)
        except self._psutil.Error:
            return []

    def sample(self) -> dict[str, int]:
        """Takes one sample now (from any thread); returns {label: RSS bytes}, the processes
        with RSS 0 left out."""
        with self._lock:
            return self._sample()

    def _sample(self) -> dict[str, int]:
        now = time.monotonic()
        rss = {}
        for label, (process, tree) in self._named.items():
            total = self._rss(process)
            if tree and total:
                total += sum(self._rss(child) for child in self._children(process))
            if total:
                rss[label] = total
        for child in self._children(self._pool) if self._pool else []:
            value = self._rss(child)
            if not value:
                continue
            seen = self.workers.get(child.pid)
            if seen is None:
                try:
                    command = " ".join(child.cmdline())
                except self._psutil.Error:
                    command = ""
                seen = self.workers[child.pid] = WorkerSeen(child.pid, now, command)
            seen.peak_bytes = max(seen.peak_bytes, value)
            rss[f"{WORKER}:{child.pid}"] = value
        self.samples.append((now, rss))
        return rss

    def _loop(self) -> None:
        while not self._done.is_set():
            self.sample()
            self._done.wait(self._interval)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def stage_of(t: float, starts: list[tuple[float, str]]) -> str:
    """The stage running at time t: the last of `starts` (time, stage; ascending) at or before
    t, or STARTUP before the first."""
    current = STARTUP
    for start, stage in starts:
        if start > t:
            break
        current = stage
    return current


def stage_peaks(
    samples: list[tuple[float, dict[str, int]]],
    workers: dict[int, WorkerSeen],
    starts: list[tuple[float, str]],
    begin: float,
    end: float,
) -> dict[str, dict]:
    """Peak RSS per stage and process (module doc).

    Args:
        samples: [(time, {label: bytes})] as `RssSampler.samples`.
        workers: {pid: WorkerSeen} as `RssSampler.workers`.
        starts: [(time, stage)]: when each stage started (a stage named twice: one stage).
        begin, end: when the run started and ended; samples outside are left out.

    Returns:
        {stage: {"seconds": its duration, "peak_mb": {label: MB},
                 "workers": [{"pid", "peak_mb"}, ...] in the order they started}}
        in run order: STARTUP (begin to the first start), the stages, WHOLE_RUN (begin to end).
        The labels are the named processes' and WORKER: the largest peak of the workers the
        stage started (present only then).
    """
    starts = sorted(starts)
    times = [begin] + [start for start, _ in starts] + [end]
    names = [STARTUP] + [stage for _, stage in starts]
    out: dict[str, dict] = {}
    for i, stage in enumerate(names):
        entry = out.setdefault(stage, {"seconds": 0.0, "peak_mb": {}, "workers": []})
        entry["seconds"] += times[i + 1] - times[i]
    out[WHOLE_RUN] = {"seconds": end - begin, "peak_mb": {}, "workers": []}
    for t, rss in samples:
        if not begin <= t <= end:
            continue
        for stage in (stage_of(t, starts), WHOLE_RUN):
            peaks = out[stage]["peak_mb"]
            for label, value in rss.items():
                if not label.startswith(f"{WORKER}:"):
                    peaks[label] = max(peaks.get(label, 0.0), value / MB)
    for worker in sorted(workers.values(), key=lambda w: w.first_seen):
        if not begin <= worker.first_seen <= end:
            continue
        peak = worker.peak_bytes / MB
        for stage in (stage_of(worker.first_seen, starts), WHOLE_RUN):
            entry = out[stage]
            entry["workers"].append({"pid": worker.pid, "peak_mb": peak})
            entry["peak_mb"][WORKER] = max(entry["peak_mb"].get(WORKER, 0.0), peak)
    return out
