#!/usr/bin/env bash
# The GPU check, run on the lent H100/H200 (device tool) from the repo root:
#   build the extension there, run the GPU tests, benchmark, run compute-sanitizer on the CUDA
#   kernels, then check every Triton configuration, and leave the results under $OUT (at most 8
#   files come back).
# Usage: OUT=dir [STEPS="build bench"] [DEADLINE=540] bash scripts/gpu_check.sh
# Budget: the device tool allows 600 s a command; the whole script stops by DEADLINE (default
# 540 s after it starts): each step runs under `timeout min(its own limit, time left)`, the most
# informative steps first (build, tests, benchmark), the slow every-configuration Triton tests
# (minutes of compiling) last. Each step is timed and logged; a failing step does not stop the
# later ones (their logs are what we need), but the script's exit code reports it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # this card only: each arch costs minutes
export MAX_JOBS=${MAX_JOBS:-16}
status=0
START=$(date +%s)
DEADLINE=${DEADLINE:-540}
# Which steps run (a rerun after a fix can take fewer): build tests bench memcheck racecheck allconfigs
STEPS=" ${STEPS:-build tests bench memcheck racecheck allconfigs} "
step() {  # step NAME LOG LIMIT CMD...: run CMD under timeout min(LIMIT, time left), log, time it
  local name=$1 log=$2 limit=$3; shift 3
  [[ $STEPS == *" $name "* ]] || return 0
  local left=$(( DEADLINE - ($(date +%s) - START) ))
  (( left < limit )) && limit=$left
  if (( limit < 15 )); then
    echo "== $name: skipped, ${left} s left of the ${DEADLINE} s deadline" | tee -a "$OUT/summary.txt"
    status=1
    return 1
  fi
  local t0=$(date +%s)
  echo "== $name (limit ${limit} s)" | tee -a "$OUT/$log"
  timeout "$limit" "$@" >>"$OUT/$log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 )) s$([ $rc -eq 124 ] && echo ' (timed out)')" \
    | tee -a "$OUT/$log" "$OUT/summary.txt"
  [ $rc -eq 0 ] || status=1
  return $rc
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; \
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())"; } \
  > "$OUT/summary.txt" 2>&1

step build build.log 300 python3 -m pip install -v --no-deps --no-build-isolation -e . || { tail -40 "$OUT/build.log"; exit 1; }
python3 -c "import deeparch_kernels as dk; print(dk.available_backends())" | tee -a "$OUT/summary.txt"

# The suite on the GPU, but for the every-configuration Triton tests (last step). Triton conv
# takes one heuristic config per shape here (autotuning every test shape costs minutes).
ALLCFG="every_config or forced_configs"
step tests tests.log 200 env DEEPARCH_TRITON_AUTOTUNE=0 \
  python3 -m pytest tests -q -p no:cacheprovider --durations=15 -k "not ($ALLCFG)"

# The main job: verify + benchmark (Triton autotuned), JSON + markdown straight into $OUT.
step bench bench.log 200 python3 -m deeparch_kernels --budget 150 --out "$OUT/bench"
for f in "$OUT"/bench/*.json "$OUT"/bench/*.md; do [ -f "$f" ] && cp "$f" "$OUT/"; done
rm -rf "$OUT/bench"

# compute-sanitizer on the CUDA kernels (memcheck, then racecheck) over small shapes.
if command -v compute-sanitizer >/dev/null; then
  step memcheck sanitizer.log 60 compute-sanitizer --tool memcheck --error-exitcode 9 python3 scripts/sanitize_cases.py
  step racecheck sanitizer.log 40 compute-sanitizer --tool racecheck --error-exitcode 9 python3 scripts/sanitize_cases.py
fi

# Every Triton configuration the autotuner may pick, for correctness (pytorch #173068).
step allconfigs tests.log 300 python3 -m pytest tests -q -p no:cacheprovider -x -k "$ALLCFG"

echo "gpu_check: status $status in $(( $(date +%s) - START )) s" | tee -a "$OUT/summary.txt"
exit $status
