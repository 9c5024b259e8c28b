#!/usr/bin/env bash
# Issue 12's GPU figure in one call of at most 8 minutes: P1 = service / engine at saturation for
# resnet50@224 (bottom:1, 16 tasks), `/v2` FP32 tensor and `/predict` JPEG (single-image requests), the
# server run with `--workers 1`, `4` and `8` in the same call, the engine timed before, between and after
# every service run (`mtserve bench overhead --service-workers 1,4,8`). Target: P1 JPEG >= 0.8 with the
# workers the machine allows.
#
# Usage: scripts/gpu_p1.sh [--device cuda|cpu] [--out DIR] [--seconds S] [--workers LIST]
#   --device cpu: dry run of the same call on the demo bundle with --workers 0,1 and short points.
#   Default out: results/bench-gpu (cuda), /tmp/gpu_p1_dry (cpu).
# Bundle: bundles/bench/r50-mt16, built beforehand (about 3 minutes, needs torch; not inside the budget):
#   python scripts/make_bench_bundles.py --only r50-mt
set -uo pipefail
device=cuda
out=""
secs=""
workers=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --seconds) secs=$2; shift 2 ;;
    --workers) workers=$2; shift 2 ;;
    *) echo "unknown argument $1 (usage: $0 [--device cuda|cpu] [--out DIR] [--seconds S] [--workers LIST])" >&2; exit 2 ;;
  esac
done
case "$device" in cuda|cpu) ;; *) echo "--device cuda or cpu" >&2; exit 2 ;; esac
if [ "$device" = cuda ]; then
  out=${out:-results/bench-gpu}; secs=${secs:-4}; workers=${workers:-1,4,8}
  models=(--models r50)
  [ -f bundles/bench/r50-mt16/manifest.json ] || {
    echo "bundles/bench/r50-mt16 missing: python scripts/make_bench_bundles.py --only r50-mt" >&2; exit 2; }
else
  out=${out:-/tmp/gpu_p1_dry}; secs=${secs:-1}; workers=${workers:-0,1}
  models=(--models demo)
fi
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
  echo "== $(date +%T) machine ($device)"
  if [ "$device" = cuda ]; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; fi
  nproc
  t0=$(date +%s)
  timeout 450 "$py" -m service.cli bench overhead "${models[@]}" --device "$device" --seconds "$secs" \
    --service-workers "$workers" --loadgen auto --out "$out"
  rc=$?
  [ $rc -eq 124 ] && echo "!! overhead ran out of its 450 s"
  echo "== done in $(($(date +%s) - t0)) s (budget 480 s), exit $rc"
  for f in "$out"/overhead-*.md; do [ -f "$f" ] && cat "$f"; done
  exit $rc
} 2>&1 | tee "$out/gpu_p1-$device.log"
exit "${PIPESTATUS[0]}"
