"""The old import path of `WALSConfig`, which now lives in `trainer.core.objective`.

Kept while modules of the other rooms still import `trainer.core.config`; new code imports
`trainer.core.objective`.
"""

from trainer.core.objective import WALSConfig

__all__ = ["WALSConfig"]
