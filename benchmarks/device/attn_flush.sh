#!/usr/bin/env bash
# The attention benchmark under each L2 flush of benchmarks/attention.py (--flush), one process
# per run, the KV4 kernels from a separately built library (build_kv4_lib.py).  Run it through
# benchmarks/device/session.sh after the vLLM install (FA3 baselines).  Results under $OUT.
#   bash benchmarks/device/attn_flush.sh decode "read write"      # decode sweep, 3 impls, per flush
#   bash benchmarks/device/attn_flush.sh prefill "read"           # prefill sweep, qoq_kv4 + fa3_bf16
set -eo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
phase=${1:-decode}; flushes=${2:-read write}
LIB=/tmp/kv4libs/kv4cur/kv4cur.so
if [ ! -f $LIB ]; then
  t=$(date +%s)
  MAX_JOBS=16 python3 benchmarks/device/build_kv4_lib.py kv4cur > "$OUT/build.log" 2>&1
  echo "build took $(( $(date +%s) - t )) s"
fi
if [ "$phase" = decode ]; then impls=${IMPLS:-qoq_kv4 fa3_bf16 fa3_fp8}; else impls=${IMPLS:-qoq_kv4 fa3_bf16}; fi
for f in $flushes; do
  t=$(date +%s)
  VLLM_QOQ_DISABLE_KERNELS=1 python3 benchmarks/attention.py --phases $phase --impls $impls \
    --lib $LIB --flush $f --out "$OUT/attn-$phase-$f.json" > "$OUT/attn-$phase-$f.log" 2>&1
  echo "$phase flush=$f: $(( $(date +%s) - t )) s, $(grep -c '"impl"' "$OUT/attn-$phase-$f.log") rows"
done
