#!/usr/bin/env bash
# Device A/B of a GEMM kernel change: builds the working tree (vllm_qoq._C in place) and, in
# /tmp/old, the same tree with the files under .devold/ (their previous versions) put back;
# runs the GEMM GPU tests on the new build, then benchmarks/gemm.py on each build in its own
# process.  Needs no vLLM (the qoq/fp8/bf16 rows only).  Results under $OUT.
#   bash benchmarks/device/g128_dequant_ab.sh            (carry .devold)
set -eo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/device.txt"
LOGS="$OUT" bash benchmarks/device/build_trees.sh
t=$(date +%s)
python3 -m pytest -q -x tests/gpu/test_gemm_kernels.py -k "not pingpong" -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/pytest-gemm.txt"
VLLM_QOQ_GEMM_P7_SCHEDULE=pingpong python3 -m pytest -q -x tests/gpu/test_gemm_kernels.py \
  -k "g128_every or g128_extreme or int32_accumulators_exact" -p no:cacheprovider 2>&1 | tail -3 | tee -a "$OUT/pytest-gemm.txt"
echo "tests took $(( $(date +%s) - t )) s"
M=${AB_M:-256,1024,4096,16384}
IMPLS=${AB_IMPLS:-qoq_chn@7:bf16,qoq_g128@7:bf16,qoq_g128@3:bf16,qoq_g128@7,qoq_chn@7,fp8,bf16}
for side in new old; do
  d=.; [ $side = old ] && d=/tmp/old
  (cd $d && python3 benchmarks/gemm.py --m "$M" --impls "$IMPLS" --no-quant --tag="-ab-$side" --out "$OUT") 2>&1 | tail -3
done
echo "done"
