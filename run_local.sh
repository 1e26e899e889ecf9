#!/usr/bin/env bash
# Runs the whole job on this machine with DirectRunner, on the embedded synthetic sample:
# generate GA360 sessions -> preprocess (TF Transform) -> show what it produced.
#
#   ./run_local.sh                       # defaults below
#   SESSIONS=20000 ./run_local.sh        # a bigger sample
#   ./run_local.sh --direct_num_workers 2 --direct_running_mode multi_processing
#
# Extra arguments go to the preprocessing pipeline (any of its flags or Beam's).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
PY="$VENV/bin/python"

WORK_DIR="${WORK_DIR:-runs/local}"
SESSIONS="${SESSIONS:-4000}"
SEED="${SEED:-42}"
DATA="$WORK_DIR/data/ga_sessions-$SESSIONS-$SEED.json.gz"
PREPROCESSED="$WORK_DIR/preprocessed"

mkdir -p "$WORK_DIR/data"
if [ ! -f "$DATA" ]; then
  echo "== generating $SESSIONS synthetic GA360 sessions (seed $SEED) -> $DATA"
  "$PY" -m pipeline.synthetic --output "$DATA" --sessions "$SESSIONS" --seed "$SEED" --bad_lines 6
fi

echo "== preprocessing -> $PREPROCESSED"
"$PY" -m pipeline.preprocess --input "$DATA" --output_dir "$PREPROCESSED" --overwrite "$@"
"$PY" -m pipeline.describe "$PREPROCESSED"
