#!/usr/bin/env bash
# Runs the whole job on this machine with DirectRunner, on the embedded synthetic sample:
# generate GA360 sessions -> preprocess (TF Transform) -> train WALS -> evaluate (known visitors,
# and new visitors held out whole and folded in) -> batch predict -> export a SavedModel, and show
# what each step produced.
#
#   ./run_local.sh                       # defaults below
#   SESSIONS=20000 ./run_local.sh        # a bigger sample
#   ./run_local.sh --direct_num_workers 2 --direct_running_mode multi_processing
#
# Extra arguments go to the preprocessing pipeline (any of its flags or Beam's);
# TRAIN_FLAGS="--latent_factors 16 --num_iters 10" passes flags to the trainer.
#
# The terminal shows each step's progress, results and warnings. Everything a step writes to
# stderr (TensorFlow's C++ start-up lines, Beam's and TF Transform's notices, tracebacks) goes to
# $WORK_DIR/logs/<step>.log; when a step fails, the end of its log is printed.
set -euo pipefail
cd "$(dirname "$0")"

WORK_DIR="${WORK_DIR:-runs/local}"
SESSIONS="${SESSIONS:-4000}"
SEED="${SEED:-42}"
DATA="$WORK_DIR/data/ga_sessions-$SESSIONS-$SEED.json.gz"
PREPROCESSED="$WORK_DIR/preprocessed"
MODEL="$WORK_DIR/model"
PREDICTIONS="$WORK_DIR/predictions.tsv"
LOGS="$WORK_DIR/logs"
mkdir -p "$WORK_DIR/data" "$LOGS"

log=""  # The log of the step under way.
on_exit() {
  local status=$?
  if [ "$status" -ne 0 ] && [ -n "$log" ]; then
    echo >&2
    echo "FAILED (exit status $status). The last lines of $log:" >&2
    tail -n 30 "$log" | sed 's/^/  | /' >&2
  fi
}
trap on_exit EXIT

# Installing: "creating virtualenv" / "installing ..." show; pip's own output goes to
# $LOGS/install.log, and its end is printed only when an install fails (scripts/ensure_venv.sh).
# A sourced script sees the caller's arguments as its own: keep ours from becoming extras.
preprocess_args=("$@")
set --
PIP_LOG="$LOGS/install.log"
# shellcheck source=scripts/ensure_venv.sh
source scripts/ensure_venv.sh
PY="$VENV/bin/python"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
# Our CLIs log what is meant for the user to this descriptor (common/cli.py), and the rest of
# stderr to the step's log.
export GA_WALS_CONSOLE_FD=3

# step NAME COMMAND...: runs COMMAND with its stderr in $LOGS/NAME.log and its stdout and the
# user's share of its logging on the terminal.
step() {
  log="$LOGS/$1.log"
  shift
  "$@" 3>&2 2>"$log"
}

if [ ! -f "$DATA" ]; then
  echo "== generating $SESSIONS synthetic GA360 sessions (seed $SEED) -> $DATA"
  step generate "$PY" -m pipeline.synthetic --output "$DATA" --sessions "$SESSIONS" \
    --seed "$SEED" --bad_lines 6
fi

echo
echo "== preprocessing with TF Transform on Beam's DirectRunner -> $PREPROCESSED"
# 10% of visitors are held out whole, to measure what new visitors are served (fold-in).
# (bash 3.2: empty arrays are unset, hence the ${a[@]+...} form.)
step preprocess "$PY" -m pipeline.preprocess --input "$DATA" --output_dir "$PREPROCESSED" \
  --overwrite --holdout_visitors 0.1 ${preprocess_args[@]+"${preprocess_args[@]}"}
echo
step describe "$PY" -m pipeline.describe "$PREPROCESSED"

echo
echo "== training WALS -> $MODEL"
# trainer.task logs one line of headline metrics; trainer.show below prints the whole table.
# shellcheck disable=SC2086
step train "$PY" -m trainer.task --input_dir "$PREPROCESSED" --output_dir "$MODEL" --overwrite \
  --no_progress ${TRAIN_FLAGS:-}

echo
echo "== batch prediction -> $PREDICTIONS"
step predict "$PY" -m trainer.batch_predict --model_dir "$MODEL" --output "$PREDICTIONS" --k 10 \
  --no_progress
step show "$PY" -m trainer.show "$MODEL" --predictions "$PREDICTIONS"

log=""
echo
echo "Done. Each step's full output (TensorFlow's and Beam's messages included) is in $LOGS/."
