#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, build the demo bundle if it is missing
# (offline demo data -> train -> export; a few minutes on 2 CPU cores), then serve it on
# 127.0.0.1:8000. Extra arguments go to `mtserve serve` (e.g. --port 9000).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUNDLE=${MTSERVE_DEMO_BUNDLE:-bundles/demo}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, timm, onnxruntime, fastapi" 2>/dev/null; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[train,serve]"
  .venv/bin/python -m pip install -q --no-deps "animal-mnist==0.4"
fi
if [ ! -f "$BUNDLE/manifest.json" ]; then
  echo "== building the demo bundle ($BUNDLE): data -> train -> export"
  .venv/bin/mtserve data demo --out data/demo
  rm -rf runs/demo
  .venv/bin/mtserve train --config training/configs/demo.yaml --out runs/demo
  rm -rf "$BUNDLE"
  .venv/bin/mtserve export runs/demo --out "$BUNDLE"
fi
.venv/bin/mtserve inspect "$BUNDLE"
exec .venv/bin/mtserve serve "$BUNDLE" --host 127.0.0.1 --port 8000 "$@"
