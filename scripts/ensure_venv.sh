# Sourced by run_local.sh and run_tests.sh: makes sure $VENV (default .venv) exists and holds the
# project installed (editable) with the extras named in "$@". Reinstalls only when setup.py changed.
#
# The terminal shows only "creating virtualenv ..." and "installing ..." (on stderr). pip's own
# output (progress, build and deprecation warnings) goes to $PIP_LOG (default $VENV/pip.log); when
# an install fails, the end of that log is printed and the sourcing script stops (status 1).
VENV="${VENV:-.venv}"
PIP_LOG="${PIP_LOG:-$VENV/pip.log}"

# ensure_venv_pip ARGS...: runs "$VENV/bin/python -m pip ARGS..." with its output in $PIP_LOG
# (started afresh by the first install of this sourcing).
ensure_venv_started=""
ensure_venv_pip() {
  if [ -z "$ensure_venv_started" ]; then
    mkdir -p "$(dirname "$PIP_LOG")"
    : >"$PIP_LOG"
    ensure_venv_started=1
  fi
  if ! "$VENV/bin/python" -m pip "$@" >>"$PIP_LOG" 2>&1; then
    echo "pip install failed; the last lines of $PIP_LOG:" >&2
    tail -n 40 "$PIP_LOG" | sed 's/^/  | /' >&2
    return 1
  fi
}

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtualenv $VENV" >&2
  python3 -m venv "$VENV"
  ensure_venv_pip install -q --upgrade pip setuptools wheel
fi
extras=$(IFS=,; echo "$*")
stamp="$VENV/.installed-$(cat setup.py | sha256sum | cut -c1-16)-${extras:-none}"
if [ ! -f "$stamp" ]; then
  echo "installing the project into $VENV (extras: ${extras:-none}); the first time takes a few minutes" >&2
  if [ -n "$extras" ]; then target=".[$extras]"; else target="."; fi
  ensure_venv_pip install -q -e "$target"
  touch "$stamp"
fi
unset -f ensure_venv_pip
unset ensure_venv_started
