#!/usr/bin/env bash
# Steps of a GPU session on the device machine (vLLM comes from the .devcarry chunks,
# see ../shared/device/README.md). Usage, each in its own `run` call, back to back:
#   bash benchmarks/device/session.sh install N      # once per carry chunk (N = number of chunks)
#   bash benchmarks/device/session.sh build          # CUDA extension for sm_90a + entry point
#   bash benchmarks/device/session.sh <cmd...>       # anything else, with the environment set
# Carry .devdata (a copy of ../shared/data: sotu/ and wikitext-2-raw/) in the calls that need data.
# The vLLM tests need it too (tests/test_vllm_e2e.py, test_vllm_gpu_kv4_with_cuda_graphs: the
# tiny test model's tokenizer is trained on sotu/). Write long outputs to $OUT or /tmp and
# print a summary, rather than piping a long command through `tail`: a call that times out
# returns nothing of a pipe.
# Results go under $OUT (the device tool brings them back).
set -eo pipefail
export PYTHONPATH=$(pwd):/tmp/site:${PYTHONPATH:-} PATH=/tmp/site/bin:$PATH VLLM_USE_FLASHINFER_SAMPLER=0
export PYTHONUNBUFFERED=1 VLLM_QOQ_CACHE=/tmp/qoq-cache
# ../shared/data as on the CI machines, from the carried .devdata folder
if [ ! -d ../shared/data ] && [ -d .devdata ]; then mkdir -p ../shared && cp -r .devdata ../shared/data; fi
g=$(ls /tmp/models/*.gguf 2>/dev/null | head -1 || true)
[ -n "$g" ] && export VLLM_QOQ_SMOLLM2_GGUF="$g"
case "${1:-}" in
  install)
    s=$(ls .devcarry/p*/device-install.sh | head -1); bash "$s" "$2" ;;
  build)
    t=$(date +%s)
    TORCH_CUDA_ARCH_LIST="${ARCH:-9.0a}" MAX_JOBS=16 python3 setup.py -q build_ext --inplace 2>&1 | grep -E -v "^(copying|running)" | tail -20
    # register the vllm.general_plugins entry point without pip (no network there)
    d=/tmp/site/vllm_qoq-0.1.0.dist-info; mkdir -p $d
    printf 'Metadata-Version: 2.1\nName: vllm_qoq\nVersion: 0.1.0\n' > $d/METADATA
    printf '[vllm.general_plugins]\nqoq = vllm_qoq:register\n' > $d/entry_points.txt
    python3 -c "import vllm_qoq.ops as o; print('extension loaded:', o.has_cuda_kernels(), o.extension_error())"
    echo "build took $(( $(date +%s) - t )) s" ;;
  *)
    "$@" ;;
esac
