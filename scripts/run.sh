#!/usr/bin/env bash
# The main job: sets up a fresh machine if needed, then verifies every available backend and
# benchmarks it against eager PyTorch and torch.compile on the device present (the GPU when
# there is one, else the CPU). Extra arguments go to deeparch-bench (try --help, --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec "${PYTHON:-python3}" -m deeparch_kernels "$@"
