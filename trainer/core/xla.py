"""XLA's settings for the trainer's kernels, applied explicitly (never as a side effect of an
import).

XLA reads the `XLA_FLAGS` environment variable once, when it first compiles in a process, so
`configure_xla()` must run before the first XLA-compiled kernel (a CG tile, the loss): the
local trainer's `fit`, the Beam trainer's solving DoFn's `setup`, the entry points' `main` and
the benchmarks call it. Calling it later is harmless but has no effect.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

# XLA's CPU backend optimises with LLVM at level 3 by default. Level 2 compiles the CG kernels
# faster and runs them faster: on the large benchmark (2 AVX-512 cores, k = 64) a CG iteration
# took 0.37 s against 0.51 s, with the same loss (benchmarks/solver_speed.py), and an item
# block compiled in 2.8 s against 3.1 s.
XLA_OPTIMIZATION_LEVEL = 2
_OPTION = "xla_backend_optimization_level"


def configure_xla() -> str:
    """Adds `--xla_backend_optimization_level=2` to XLA_FLAGS unless it names a level already.

    Idempotent; a level the user set in XLA_FLAGS is kept, and so are their other flags.

    Returns:
        XLA_FLAGS as it now is.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if _OPTION not in flags:
        flags = f"{flags} --{_OPTION}={XLA_OPTIMIZATION_LEVEL}".strip()
        os.environ["XLA_FLAGS"] = flags
        logger.debug("XLA_FLAGS=%s", flags)
    return flags
