#!/usr/bin/env bash
# The test command: sets up a fresh machine if needed, then runs the test suite.
# Extra arguments go to pytest (e.g. -k conv, -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec "${PYTHON:-python3}" -m pytest tests -q "$@"
