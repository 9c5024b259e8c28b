#!/usr/bin/env bash
# Every GPU check and figure of issue 13 (shape-stable CUDA execution) in one call of at most 8 minutes,
# on a machine with CUDA, onnxruntime-gpu and torch (the tests export a tiny bundle):
#   1. pytest -m gpu tests/test_gpu.py: CUDA engine = CPU engine; graphs on = graphs off = CPU; each graph
#      id only sees its shape and address; start-up captured every (variant, bucket) (describe() logged)
#   2. mixed-task batch time / fixed-shape batch time (demo8, batch 32): target <= 1.2
#   3. cross-task / per-task throughput at equal p99 (P2, demo8: 8 tasks): target >= 3
#   4. tasks scaling, 100-task / 1-task throughput (and memory): target >= 0.8
#
# Usage: scripts/gpu_check.sh [--device cuda|cpu] [--out DIR] [--seconds S]
#   --device cpu: dry run of the same steps on the CPU (the gpu tests are collected, not run; the CPU
#   twins in tests/test_buckets.py run instead), short points. Default out: results/bench-gpu (cuda),
#   /tmp/gpu_check_dry (cpu). Every step has its own time box; the log says which one ran out.
# Bundles: bundles/demo (P2's server start check), bundles/bench/demo8, bundles/bench/scale-t{1,10,100}.
# Missing ones are built first (needs torch; NOT inside the 8 minutes: about 2 min for demo8 + 1/10
# tasks, 4-15 min for 100 tasks by core count); build them beforehand:
#   python scripts/make_bench_bundles.py --only demo8 && python scripts/make_scaling_bundles.py
set -uo pipefail
device=cuda
out=""
secs=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --seconds) secs=$2; shift 2 ;;
    *) echo "unknown argument $1 (usage: $0 [--device cuda|cpu] [--out DIR] [--seconds S])" >&2; exit 2 ;;
  esac
done
case "$device" in cuda|cpu) ;; *) echo "--device cuda or cpu" >&2; exit 2 ;; esac
if [ "$device" = cuda ]; then out=${out:-results/bench-gpu}; secs=${secs:-4}; else out=${out:-/tmp/gpu_check_dry}; secs=${secs:-1}; fi
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
fail=0
stamp() { echo "== $(date +%T) $*"; }
step() {  # step SECONDS NAME CMD...: run with a time box, record a failure without stopping
  local limit=$1 name=$2; shift 2
  stamp "$name (time box ${limit}s)"
  timeout "$limit" "$@"
  local rc=$?
  if [ $rc -ne 0 ]; then
    fail=1
    if [ $rc -eq 124 ]; then echo "!! $name: ran out of its ${limit}s"; else echo "!! $name: exit $rc"; fi
  fi
}
{
  stamp "machine ($device)"
  if [ "$device" = cuda ]; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; fi
  "$py" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
  lscpu | grep -E '^(Model name|CPU\(s\)|Flags)' | cut -c1-200
  for b in demo8; do
    [ -f "bundles/bench/$b/manifest.json" ] || { stamp "building $b (outside the time budget)"; "$py" scripts/make_bench_bundles.py --only "$b" 2>&1 | tail -2; }
  done
  for n in 1 10 100; do
    [ -f "bundles/bench/scale-t$n/manifest.json" ] || { stamp "building scale-t$n (outside the time budget)"; "$py" scripts/make_scaling_bundles.py --tasks "$n" 2>&1 | tail -2; }
  done
  t0=$(date +%s)
  if [ "$device" = cuda ]; then
    step 200 "gpu tests" "$py" -m pytest -m gpu tests/test_gpu.py -q -s -p no:cacheprovider -o addopts="" -rs
  else
    step 200 "gpu tests (collected) + their CPU twins" bash -c \
      "'$py' -m pytest -m gpu tests/test_gpu.py -q --collect-only -p no:cacheprovider -o addopts='' | tail -1 && '$py' -m pytest tests/test_buckets.py -q -p no:cacheprovider"
  fi
  step 60 "mixed-batch (mixed / fixed-shape batch time)" \
    "$py" -m service.cli bench mixed-batch --device "$device" --seconds "$((secs * 2))" --scaling-rounds 4 --out "$out"
  step 150 "tasks-scaling (1/10/100 tasks)" \
    "$py" -m service.cli bench tasks-scaling --device "$device" --seconds "$((secs * 3))" --scaling-rounds 4 --out "$out"
  if [ -f bundles/demo/manifest.json ]; then
    step 170 "cross-task P2 (demo8, 8 tasks, equal p99)" \
      "$py" -m service.cli bench cross-task --models demo --device "$device" --seconds "$secs" --out "$out"
  else
    echo "!! cross-task P2 skipped: bundles/demo missing (docs/trainer.md builds it)"; fail=1
  fi
  stamp "done in $(($(date +%s) - t0)) s (budget 480 s); figures:"
  for f in "$out"/mixed-batch-"$device".json "$out"/tasks-scaling-"$device".json "$out"/cross-task-demo.json; do
    [ -f "$f" ] && "$py" -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1], json.dumps(d.get('figure')))" "$f"
  done
  tar cf "$out/bench.tar" -C "$out" --exclude bench.tar . 2>/dev/null
  exit $fail
} 2>&1 | tee "$out/gpu_check-$device.log"
exit "${PIPESTATUS[0]}"
