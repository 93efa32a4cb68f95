#!/usr/bin/env bash
# The GPU check, run on the lent H100/H200 (device tool) from the repo root:
#   build the extension there (the CUTLASS sm_90a kernels included), run the GPU tests,
#   benchmark every backend (cutlass, cuda, triton, aten) against cuDNN and torch.compile, time
#   the variants that are switches (the Triton TMA kernel off, the CUDA stem's channel padding
#   on), run compute-sanitizer on the CUDA and CUTLASS kernels, then check every Triton
#   configuration, and leave the results under $OUT (at most 8 files come back).
# Usage: OUT=dir [STEPS="build bench"] [DEADLINE=540] bash scripts/gpu_check.sh
#        bash scripts/gpu_check.sh --stage-cutlass   (here, before: see the CUTLASS note below)
#
# CUTLASS headers: the GPU machine can't reach pip. Stage them into .cutlass/ (in .gitignore,
# ~28 MB) with --stage-cutlass on a machine that has the nvidia-cutlass wheel, and name .cutlass
# in the device tool's `carry`; the build then requires the CUTLASS kernels (DEEPARCH_CUTLASS=1).
# Without headers the build goes on without them and the summary says so.
# Budget: the device tool allows 600 s a command; the whole script stops by DEADLINE (default
# 540 s after it starts): each step runs under `timeout min(its own limit, time left)`, the most
# informative steps first (build, tests, benchmark), the slow every-configuration Triton tests
# (minutes of compiling) last. Each step is timed and logged; a failing step does not stop the
# later ones (their logs are what we need), but the script's exit code reports it.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--stage-cutlass" ]; then
  src=$(python3 -c "import importlib.util as u, os; s = u.find_spec('cutlass_library'); print(os.path.join(list(s.submodule_search_locations)[0], 'source') if s else '')")
  [ -n "$src" ] || { echo "no nvidia-cutlass wheel here: pip install --no-deps nvidia-cutlass==4.2.0.0"; exit 1; }
  rm -rf .cutlass && mkdir -p .cutlass/tools/util
  cp -r "$src/include" .cutlass/ && cp -r "$src/tools/util/include" .cutlass/tools/util/
  echo "staged $(du -sh .cutlass | cut -f1) of CUTLASS headers in .cutlass/ (carry it)"
  exit 0
fi
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # this card only: each arch costs minutes
export MAX_JOBS=${MAX_JOBS:-16}
if [ -z "${DEEPARCH_CUTLASS_DIR:-}" ] && [ -d .cutlass/include ]; then export DEEPARCH_CUTLASS_DIR=$PWD/.cutlass; fi
if [ -n "${DEEPARCH_CUTLASS_DIR:-}" ] || python3 -c "import cutlass_library" 2>/dev/null; then
  export DEEPARCH_CUTLASS=${DEEPARCH_CUTLASS:-1}  # headers here: the build must have the kernels
fi
status=0
START=$(date +%s)
DEADLINE=${DEADLINE:-540}
# Which steps run (a rerun after a fix can take fewer):
#   build tests bench variants memcheck racecheck racecheck_cutlass allconfigs
STEPS=" ${STEPS:-build tests bench variants memcheck racecheck racecheck_cutlass allconfigs} "
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
grep -h "deeparch-kernels setup:" "$OUT/build.log" | tee -a "$OUT/summary.txt"
python3 -c "import deeparch_kernels as dk; print(dk._ext.build_info()); print(dk.available_backends())" | tee -a "$OUT/summary.txt"

# The suite on the GPU, but for the every-configuration Triton tests (last step). Triton conv
# takes one heuristic config per shape here (autotuning every test shape costs minutes).
ALLCFG="every_config or forced_configs"
step tests tests.log 200 env DEEPARCH_TRITON_AUTOTUNE=0 \
  python3 -m pytest tests -q -p no:cacheprovider --durations=15 -k "not ($ALLCFG)"

# The main job: verify + benchmark (Triton autotuned), JSON + markdown straight into $OUT.
step bench bench.log 200 python3 -m deeparch_kernels --budget 150 --out "$OUT/bench"
for f in "$OUT"/bench/*.json "$OUT"/bench/*.md; do [ -f "$f" ] && cp "$f" "$OUT/"; done
rm -rf "$OUT/bench"

# The switches the benchmark does not see (one log): the Triton conv with its TMA kernel off
# (the gather kernel on the same stride-1 layers), and the ResNet stem (C = 3) on the cuda
# backend with its channels zero-padded onto the tensor cores, against the SIMT kernel; fp16,
# no verification (the tests did it), no torch.compile (the bench step has it).
VARIANT="python3 -m deeparch_kernels --ops conv --models none --dtypes fp16 --no-verify --no-compile --no-save -q"
step variants variants.log 120 bash -c "
  echo '# Triton, TMA kernel on (default) vs off'
  $VARIANT --backends triton --shapes conv:256x56x1,conv:512x28x1,conv:512x14x1 --budget 40
  DEEPARCH_TRITON_TMA=0 $VARIANT --backends triton --shapes conv:256x56x1,conv:512x28x1,conv:512x14x1 --budget 40
  echo '# cuda, the C = 3 stem: SIMT (default) vs DEEPARCH_CUDA_PAD_CHANNELS=1'
  $VARIANT --backends cuda --shapes conv:3x224x2x64x7 --budget 15
  DEEPARCH_CUDA_PAD_CHANNELS=1 $VARIANT --backends cuda --shapes conv:3x224x2x64x7 --budget 15"

# compute-sanitizer over small shapes: memcheck on the CUDA and CUTLASS kernels, racecheck on
# our hand-written CUDA kernels, then on the CUTLASS ones apart (TMA and mbarrier pipelines: a
# report there is read before it is believed).
if command -v compute-sanitizer >/dev/null; then
  step memcheck sanitizer.log 90 compute-sanitizer --tool memcheck --error-exitcode 9 python3 scripts/sanitize_cases.py
  step racecheck sanitizer.log 40 compute-sanitizer --tool racecheck --error-exitcode 9 python3 scripts/sanitize_cases.py --backends cuda
  step racecheck_cutlass sanitizer.log 40 compute-sanitizer --tool racecheck --error-exitcode 9 python3 scripts/sanitize_cases.py --backends cutlass
fi

# Every Triton configuration the autotuner may pick, for correctness (pytorch #173068).
step allconfigs tests.log 300 python3 -m pytest tests -q -p no:cacheprovider -x -k "$ALLCFG"

echo "gpu_check: status $status in $(( $(date +%s) - START )) s" | tee -a "$OUT/summary.txt"
exit $status
