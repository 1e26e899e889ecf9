#!/usr/bin/env bash
# Runs the whole job on this machine with DirectRunner, on the embedded synthetic sample:
# generate GA360 sessions -> preprocess (TF Transform) -> train WALS -> evaluate -> batch predict
# -> export a SavedModel, and show what each step produced.
#
#   ./run_local.sh                       # defaults below
#   SESSIONS=20000 ./run_local.sh        # a bigger sample
#   ./run_local.sh --direct_num_workers 2 --direct_running_mode multi_processing
#
# Extra arguments go to the preprocessing pipeline (any of its flags or Beam's);
# TRAIN_FLAGS="--latent_factors 16 --num_iters 10" passes flags to the trainer.
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
MODEL="$WORK_DIR/model"
PREDICTIONS="$WORK_DIR/predictions.tsv"

mkdir -p "$WORK_DIR/data"
if [ ! -f "$DATA" ]; then
  echo "== generating $SESSIONS synthetic GA360 sessions (seed $SEED) -> $DATA"
  "$PY" -m pipeline.synthetic --output "$DATA" --sessions "$SESSIONS" --seed "$SEED" --bad_lines 6
fi

echo "== preprocessing -> $PREPROCESSED"
"$PY" -m pipeline.preprocess --input "$DATA" --output_dir "$PREPROCESSED" --overwrite "$@"
"$PY" -m pipeline.describe "$PREPROCESSED"

echo "== training WALS -> $MODEL"
# shellcheck disable=SC2086
"$PY" -m trainer.task --input_dir "$PREPROCESSED" --output_dir "$MODEL" --overwrite ${TRAIN_FLAGS:-}

echo "== batch prediction -> $PREDICTIONS"
"$PY" -m trainer.batch_predict --model_dir "$MODEL" --output "$PREDICTIONS" --k 10 --no_progress
"$PY" -m trainer.show "$MODEL" --predictions "$PREDICTIONS"
