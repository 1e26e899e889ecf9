"""`python -m pipeline.run`: one scheduled run of a date (preprocess, train, gate, predict, export,
publish). The run itself lives in `pipeline.scheduled` (its docstring says what goes where and
the exit statuses); this file is only the command, also run as a script (`python
pipeline/run.py`, as Airflow's Beam operator does). Nothing imports it.

    python -m pipeline.run --date 2026-11-22 --input 'gs://b/ga360/ga_sessions_{date_nodash}*' \\
        --root /srv/ga-wals [any trainer.task flag] [--distributed] [Beam pipeline options]
"""

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a script (`python pipeline/run.py`, as Airflow's Beam operator does): import the
    # package from the repository rather than this file's folder, whose modules would shadow.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from pipeline.scheduled.launch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
