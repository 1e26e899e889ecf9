"""`common.allocator`: in a runner's SDK worker process, freed blocks of a MiB or more go back to
the OS; elsewhere, or over the user's own MALLOC_* settings, nothing changes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Frees a 4 MiB block (with glibc's defaults the mmap threshold then rises to 4 MiB), then holds
# 40 blocks of 2 MiB and frees all but the last one: from the heap, they stay in RSS below it.
PROBE = r"""
import json, os, sys
from common import allocator
set_now = allocator.return_freed_memory()
def rss():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
first = bytearray(4 << 20)
del first
before = rss()
blocks = [bytearray(2 << 20) for _ in range(40)]
last = blocks.pop()
del blocks
print(json.dumps({"set": set_now, "kept_mb": (rss() - before) / 2**20}))
"""


def probe(**environment) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "CONTROL_API"))}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**env, **environment},
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_worker_gives_freed_blocks_back_and_other_processes_are_left_alone():
    worker = probe(CONTROL_API_SERVICE_DESCRIPTOR="url: 'localhost:1'")
    launcher = probe()
    user_set = probe(CONTROL_API_SERVICE_DESCRIPTOR="x", MALLOC_TRIM_THRESHOLD_="131072")
    assert worker["set"] is True
    assert launcher["set"] is False and user_set["set"] is False
    # The worker keeps the one live block; glibc's defaults keep the 39 freed ones too.
    assert worker["kept_mb"] < 8
    assert launcher["kept_mb"] > 60
