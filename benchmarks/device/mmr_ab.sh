#!/usr/bin/env bash
# Path 8 (the weight stream through per-warp cp.async rings, csrc/gemm/w4a8_gemv.cu) against
# path 1 (mma.sync tiles, the sm_90 default at M = 3-16), path 6 (the MMV), path 5 (the GEMV) and FP8 at M = 1-32
# on the Llama-3-8B/-70B shapes.  Needs no vLLM.  Two calls, back to back on one machine:
#   bash benchmarks/device/mmr_ab.sh build   # the extension for sm_90a, then the GEMM GPU tests
#   bash benchmarks/device/mmr_ab.sh time    # one process with the defaults (32-channel
#                                            # blocks, split policy 2), one per other split policy
#                                            # (VLLM_QOQ_MMR_SPLIT=0, 1) and one with 64-channel
#                                            # blocks (VLLM_QOQ_MMR_BLOCKS=2)
# or both in one call, without the tests: `bash benchmarks/device/mmr_ab.sh build-time`.
#   bash benchmarks/device/mmr_ab.sh ab      # carry .devold/ (older kernel files): builds both
#                                            # trees (build_trees.sh), times path 8 of each,
#                                            # the old one under $AB_OLD_ENV, the new one with its
#                                            # defaults and under each split policy in $AB_POLICIES
#                                            # (gemm-*-mmr-ab-{old,new,sP}.json); AB_TESTS=1: then
#                                            # the GEMM GPU tests
# Results under $OUT: build.log, tests.log, gemm-*-mmr*.json (the markdown and plots stay in
# $OUT/../mmr-md, so that a call returns few files).  MMR_M overrides the M list.
set -eo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$(pwd) PYTHONUNBUFFERED=1
M=${MMR_M:-1,2,4,8,16,32}
MODELS=llama3-8b,llama3-70b
build() {
    t=$(date +%s)
    TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 \
      || { tail -30 "$OUT/build.log"; exit 1; }
    echo "build took $(( $(date +%s) - t )) s"
}
# The GEMM GPU tests, then path 8's exactness under each of its A/B knobs (logs under $OUT).
gemm_tests() {
    python3 -m pytest -q tests/gpu/test_gemm_kernels.py > "$OUT/tests.log" 2>&1 || true
    grep -E "passed|failed|error" "$OUT/tests.log" | tail -15
    for v in VLLM_QOQ_MMR_SPLIT=0 VLLM_QOQ_MMR_SPLIT=1 VLLM_QOQ_MMR_BLOCKS=2; do
      env $v python3 -m pytest -q tests/gpu/test_gemm_kernels.py -k "weight_stream_every_small_m and 8" > "$OUT/tests-$v.log" 2>&1 || true
      echo "$v: $(tail -1 "$OUT/tests-$v.log")"
    done
}
case "${1:-}" in
  build-time) build ;;&
  build)
    build
    gemm_tests ;;
  time|build-time)
    MD=$(dirname "$OUT")/mmr-md; mkdir -p "$MD"
    # qoq_*@8: 32-channel blocks, split policy 2 (the defaults); then one process per other setting
    python3 benchmarks/gemm.py --no-quant --m "$M" --models $MODELS --tag=-mmr --out "$MD" \
      --impls qoq_chn,qoq_g128,qoq_chn@1,qoq_chn@5,qoq_chn@8,qoq_g128@1,qoq_g128@5,qoq_g128@8,qoq_chn@1:bf16,qoq_chn@8:bf16,qoq_g128@1:bf16,qoq_g128@8:bf16,fp8 \
      > "$OUT/time.log" 2>&1 || { tail -20 "$OUT/time.log"; exit 1; }
    for v in "split0 VLLM_QOQ_MMR_SPLIT=0" "split1 VLLM_QOQ_MMR_SPLIT=1" "nb2 VLLM_QOQ_MMR_BLOCKS=2"; do
      set -- $v
      env "$2" python3 benchmarks/gemm.py --no-quant --m "$M" --models $MODELS --tag=-mmr-$1 \
        --out "$MD" --impls qoq_chn@8,qoq_g128@8 > "$MD/time-$1.log" 2>&1 || { tail -20 "$MD/time-$1.log"; exit 1; }
    done
    cp "$MD"/*.json "$OUT"/
    echo done ;;
  ab)
    MD=$(dirname "$OUT")/mmr-md; mkdir -p "$MD"
    LOGS=$MD bash benchmarks/device/build_trees.sh
    I=qoq_chn@1,qoq_chn@8,qoq_g128@1,qoq_g128@8
    [ -d /tmp/old ] && (cd /tmp/old && PYTHONPATH=/tmp/old env ${AB_OLD_ENV:-VLLM_QOQ_MMR_BLOCKS=1} python3 benchmarks/gemm.py --no-quant --m "$M" \
      --models $MODELS --tag=-mmr-ab-old --out "$MD" --impls $I > "$MD/time-old.log" 2>&1) \
      || { tail -20 "$MD/time-old.log"; exit 1; }
    # the new tree: its defaults (with the bf16 epilogue rows), then each other split policy
    python3 benchmarks/gemm.py --no-quant --m "$M" --models $MODELS --tag=-mmr-ab-new --out "$MD" \
      --impls $I,qoq_chn,qoq_g128,qoq_chn@1:bf16,qoq_chn@8:bf16,qoq_g128@1:bf16,qoq_g128@8:bf16 \
      > "$MD/time-new.log" 2>&1 || { tail -20 "$MD/time-new.log"; exit 1; }
    for p in ${AB_POLICIES:-}; do
      VLLM_QOQ_MMR_SPLIT=$p python3 benchmarks/gemm.py --no-quant --m "$M" --models $MODELS \
        --tag=-mmr-ab-s$p --out "$MD" --impls qoq_chn@8,qoq_g128@8 > "$MD/time-s$p.log" 2>&1 \
        || { tail -20 "$MD/time-s$p.log"; exit 1; }
    done
    cp "$MD"/*.json "$OUT"/
    if [ "${AB_TESTS:-0}" = 1 ]; then gemm_tests; fi
    echo done ;;
  *) echo "usage: $0 build|time|build-time|ab"; exit 2 ;;
esac
