"""Beam's portable job API on this machine for the tests: a job service and one EXTERNAL worker
pool (`benchmarks.portable_services`, which `benchmarks.scale` shares).

    with PortableRunner() as portable:
        preprocess.run([..., *portable.flags])

The launcher hands a pipeline proto to a separate job-service process, which runs it on SDK
workers that the worker pool starts as separate processes; the workers share nothing with the
launcher but the files, which `flags` says with --workers_share_filesystem (without it, the
entry points refuse local paths for EXTERNAL workers: `common.locations`), and import the project
as installed. `portable.flags` are the Beam
flags that submit a pipeline to them (built in `PortableRunner.__enter__`).
"""

from __future__ import annotations

from benchmarks.portable_services import PortableRunner

__all__ = ["PortableRunner"]
