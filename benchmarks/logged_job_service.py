"""Beam's local job service (`local_job_service_main`) logging the stage of each bundle it runs.

    python -m benchmarks.logged_job_service --port N

The same service, with every log line stamped by time.time() ("%(created).3f") and the
FnApiRunner's bundle logger ("...fn_runner.run_bundle") at DEBUG, so that each "Running bundle
for stage <name>" line says when the runner handed that fused stage's input to the SDK worker
(`benchmarks.runner_memory` attributes the processes' memory to stages by these lines).
"""

from __future__ import annotations

import logging
import sys

BUNDLE_LOGGER = "apache_beam.runners.portability.fn_api_runner.fn_runner.run_bundle"
LOG_FORMAT = "%(created).3f %(name)s %(message)s"


def main(argv: list[str]) -> None:
    from apache_beam.runners.portability import local_job_service_main

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    logging.getLogger(BUNDLE_LOGGER).setLevel(logging.DEBUG)
    local_job_service_main.run(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
