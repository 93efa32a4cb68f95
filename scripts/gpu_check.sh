#!/usr/bin/env bash
# The GPU check, run on the lent H100/H200 (device tool) from the repo root:
#   build the extension there, run the GPU tests, run compute-sanitizer on the CUDA kernels,
#   run the benchmark suite, and leave the results under $OUT (at most 8 files come back).
# Budget: well inside 10 minutes: build ~1-2 min (one arch, 16 jobs), then each step under its
# own `timeout` (tests 180 s, sanitizers 60 + 40 s, benchmarks 190 s with a 150 s soft budget).
# Each step is timed and logged; a failing step does not stop the later ones (their logs are
# what we need), but the script's exit code reports it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # this card only: each arch costs minutes
export MAX_JOBS=${MAX_JOBS:-16}
status=0
step() {  # step NAME LOG CMD...: run CMD, log to $OUT/LOG, time it
  local name=$1 log=$2; shift 2
  local t0=$(date +%s)
  echo "== $name" | tee -a "$OUT/$log"
  "$@" >>"$OUT/$log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/$log" "$OUT/summary.txt"
  [ $rc -eq 0 ] || status=1
  return $rc
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; \
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())"; } \
  > "$OUT/summary.txt" 2>&1

step build build.log python3 -m pip install -v --no-deps --no-build-isolation -e . || { tail -40 "$OUT/build.log"; exit 1; }
python3 -c "import deeparch_kernels as dk; print(dk.available_backends())" | tee -a "$OUT/summary.txt"

# The whole suite on the GPU. Triton conv takes one heuristic config per shape here (autotuning
# every test shape would cost minutes of compiling); test_triton_every_config checks them all.
step tests tests.log env DEEPARCH_TRITON_AUTOTUNE=0 timeout 180 python3 -m pytest tests -q -p no:cacheprovider --durations=15

# compute-sanitizer on the CUDA kernels (memcheck, then racecheck) over small shapes.
if command -v compute-sanitizer >/dev/null; then
  step memcheck sanitizer.log timeout 60 compute-sanitizer --tool memcheck --error-exitcode 9 python3 scripts/sanitize_cases.py
  step racecheck sanitizer.log timeout 40 compute-sanitizer --tool racecheck --error-exitcode 9 python3 scripts/sanitize_cases.py
fi

# The main job: verify + benchmark, JSON + markdown straight into $OUT.
step bench bench.log timeout 190 python3 -m deeparch_kernels --budget 150 --out "$OUT/bench"
for f in "$OUT"/bench/*.json "$OUT"/bench/*.md; do [ -f "$f" ] && cp "$f" "$OUT/"; done
rm -rf "$OUT/bench"
echo "gpu_check: status $status" | tee -a "$OUT/summary.txt"
exit $status
