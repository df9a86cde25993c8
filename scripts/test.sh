#!/usr/bin/env bash
# Install (scripts/install.sh), compile-check the CUDA sources, run the test suite.
# GPU-only tests (tests/gpu, marker "gpu") skip themselves on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
  python3 .ci/cuda_build_check.py
fi
python3 -m pytest -q -ra tests "$@"
