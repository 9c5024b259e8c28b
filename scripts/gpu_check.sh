#!/usr/bin/env bash
# The GPU checks in one go, on a machine with CUDA and onnxruntime-gpu: the gpu-marked tests, then
# the engine, P1 and P2 scenarios with the CUDA provider (IOBinding) for the demo and resnet50 bundles.
# Usage: scripts/gpu_check.sh OUTDIR [SECONDS_PER_LOAD_POINT]. Needs bundles/demo; builds
# bundles/bench/demo8 and bundles/bench/r50-mt16 (random weights) when missing. Results land in
# OUTDIR: gpu_check.log and bench.tar (re-packed after each scenario).
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUTDIR [SECONDS]}
secs=${2:-2}
py=${PYTHON:-python3}
mkdir -p "$out"
res=$(mktemp -d)/bench
export PYTHONUNBUFFERED=1
stamp() { echo "== $(date +%T) $*"; }
{
  stamp machine
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$py" -c "import onnxruntime as o, torch; print('onnxruntime', o.__version__, o.get_available_providers()); print('torch', torch.__version__, torch.cuda.is_available())"
  stamp gpu tests
  "$py" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider -o addopts="" -rs
  for b in demo8 r50-mt; do
    if [ ! -f "bundles/bench/${b/r50-mt/r50-mt16}/manifest.json" ]; then
      stamp "building bundle $b"
      "$py" scripts/make_bench_bundles.py --only "$b" 2>&1 | tail -2
    fi
  done
  for scenario in engine overhead cross-task; do
    stamp "bench $scenario"
    "$py" -m service.cli bench "$scenario" --device cuda --models demo,r50 --seconds "$secs" \
      --r50-max-batch-size 32 --out "$res"
    tar cf "$out/bench.tar" -C "$(dirname "$res")" bench
  done
  "$py" -m service.cli bench summary --out "$res" > /dev/null
  stamp done
  tar cf "$out/bench.tar" -C "$(dirname "$res")" bench
} 2>&1 | tee "$out/gpu_check.log"
