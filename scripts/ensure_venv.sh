# Sourced by run_local.sh and run_tests.sh: makes sure $VENV (default .venv) exists and holds the
# project installed (editable) with the extras named in "$@". Reinstalls only when setup.py changed.
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtualenv $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
fi
extras=$(IFS=,; echo "$*")
stamp="$VENV/.installed-$(cat setup.py | sha256sum | cut -c1-16)-${extras:-none}"
if [ ! -f "$stamp" ]; then
  echo "installing the project into $VENV (extras: ${extras:-none}); the first time takes a few minutes" >&2
  if [ -n "$extras" ]; then target=".[$extras]"; else target="."; fi
  "$VENV/bin/python" -m pip install -q -e "$target"
  touch "$stamp"
fi
