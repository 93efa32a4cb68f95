#!/usr/bin/env bash
# Makes a fresh machine ready: the Python packages, then the extension (built in place, so that
# later runs recompile only what changed). Sourced by scripts/test.sh and scripts/run.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-python3}
# torch's CUDA toolkit guess can land on /usr/local (then linking fails on -lcudart).
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi

if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
  echo "setup: installing torch and torchvision" >&2
  "$PY" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
missing=$("$PY" - <<'PYEOF'
import importlib.util as u
need = {"numpy": "numpy", "pytest": "pytest", "pytest_benchmark": "pytest-benchmark",
        "ninja": "ninja", "pybind11": "pybind11", "setuptools": "setuptools", "wheel": "wheel"}
print(" ".join(pkg for mod, pkg in need.items() if u.find_spec(mod) is None))
PYEOF
)
if [ -n "$missing" ]; then
  echo "setup: installing $missing" >&2
  "$PY" -m pip install -q $missing
fi
# Optional extras (pip install 'deeparch-kernels[lesson]'): the digits data set and the plots of
# `deeparch-bench lesson` and the main job. Small wheels; without them those parts say so and the
# tests that need them skip, so a failed install is not fatal.
optional=$("$PY" - <<'PYEOF'
import importlib.util as u
print(" ".join(pkg for mod, pkg in {"sklearn": "scikit-learn", "matplotlib": "matplotlib"}.items()
               if u.find_spec(mod) is None))
PYEOF
)
if [ -n "$optional" ]; then
  echo "setup: installing $optional (optional)" >&2
  "$PY" -m pip install -q $optional || echo "setup: could not install $optional; the lesson's data/plots are skipped" >&2
fi

# The CUTLASS headers for the sm_90a conv kernels (the 'cutlass' backend), pinned; headers only
# (--no-deps: its Python dependencies would re-pin cuda-bindings under torch). Where nvcc is
# there and the arch list is the default (which has 9.0), the build must then compile those
# kernels (DEEPARCH_CUTLASS=1 fails it otherwise), so that CI runs their tests, not skips them.
CUTLASS_PIN="nvidia-cutlass==4.2.0.0"  # keep in step with setup.py's CUTLASS_VERSION
if [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
  if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('cutlass_library') is None)" 2>/dev/null; then
    echo "setup: installing $CUTLASS_PIN (headers)" >&2
    "$PY" -m pip install -q --no-deps "$CUTLASS_PIN"
  fi
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then export DEEPARCH_CUTLASS=${DEEPARCH_CUTLASS:-1}; fi
fi

# Register the package (editable, for the console script deeparch-bench) once without compiling,
# then build the extension in place: one build, and later runs recompile only what changed.
if ! "$PY" -m pip show -q deeparch-kernels >/dev/null 2>&1; then
  echo "setup: pip install --no-build-isolation --no-deps -e ." >&2
  DEEPARCH_SKIP_BUILD=1 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
fi
echo "setup: building the extension (incremental)" >&2
start=$(date +%s)
"$PY" setup.py -q build_ext --inplace >/tmp/deeparch-build.log 2>&1 || { tail -50 /tmp/deeparch-build.log; exit 1; }
echo "setup: extension ready in $(( $(date +%s) - start )) s ($(grep -o 'building CPU[^(]*' /tmp/deeparch-build.log | head -1); CUTLASS: $(grep -o 'CUTLASS sm_90a conv kernels: [a-z]*' /tmp/deeparch-build.log | head -1 | cut -d: -f2))" >&2
