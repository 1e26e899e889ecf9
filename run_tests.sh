#!/usr/bin/env bash
# The test command: creates .venv if missing, installs the project with its test extra, runs pytest.
#   ./run_tests.sh                 # the default suite (slow benchmarks skipped)
#   ./run_tests.sh -m slow         # only the slow ones
#   ./run_tests.sh tests/test_records.py -k gzip
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=scripts/ensure_venv.sh
source scripts/ensure_venv.sh test
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec "$VENV/bin/python" -m pytest "$@"
