#!/usr/bin/env bash
# Set up .venv (if needed) and run the test suite: the README's test command, and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[train,serve,dev,deploy-check]"
.venv/bin/python -m pip install -q --no-deps "animal-mnist==0.4"   # its metadata pins old deps
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
