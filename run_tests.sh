#!/usr/bin/env bash
# The test command: creates .venv if missing, installs the project with its test extra, runs pytest.
#   ./run_tests.sh                 # the default suite (slow benchmarks skipped)
#   ./run_tests.sh -m slow         # only the slow benchmarks (installs the bench extra too)
#   ./run_tests.sh tests/test_records.py -k gzip
set -euo pipefail
cd "$(dirname "$0")"
extras=(test)
# The slow benchmarks compare with peers (implicit, Spark) from the bench extra.
case " $* " in *slow*) extras+=(bench) ;; esac
# shellcheck source=scripts/ensure_venv.sh
source scripts/ensure_venv.sh "${extras[@]}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec "$VENV/bin/python" -m pytest "$@"
