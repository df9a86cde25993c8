#!/usr/bin/env bash
# Device probe of the KV4 decode kernel: builds compile-time variants of csrc/attention
# (build_kv4_lib.py), times decode for each (benchmarks/attention.py --quick --iters 20 --lib, its own
# process each), profiles the default build with Nsight Compute at two shapes, and dumps its
# SASS.  Needs no vLLM.  Results under $OUT.
set -eo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 VLLM_QOQ_DISABLE_KERNELS=1
declare -A V=( [v0]="" [v1]="-DQOQ_KV4_MIN_BLOCKS_128=4 -DQOQ_KV4_MIN_BLOCKS_64=5" [v2]="-DQOQ_KV4_MIN_BLOCKS_64=6" )
t=$(date +%s)
for k in "${!V[@]}"; do
  (MAX_JOBS=5 python3 benchmarks/device/build_kv4_lib.py kv4$k ${V[$k]} > "$OUT/build-$k.log" 2>&1; echo "$k build rc $?") &
done
wait
echo "builds took $(( $(date +%s) - t )) s"
for k in v0 v1 v2 v0; do
  python3 benchmarks/attention.py --phases decode --impls qoq_kv4 --quick --iters 20 --lib /tmp/kv4libs/kv4$k/kv4$k.so \
    --out "$OUT/attn-$k.json" 2>&1 | tail -1
  python3 - "$OUT/attn-$k.json" "${V[$k]}" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(sys.argv[2] or "default", " ".join(f"{r['batch']}x{r['context']}/{r['head_dim']}:{r['us']:.1f}({r.get('pct_hbm')}%)" for r in d["rows"]))
PY
done
LIB=/tmp/kv4libs/kv4v0/kv4v0.so
cuobjdump -sass "$LIB" | gzip > "$OUT/kv4v0-sass.txt.gz" || true
for shape in "64 4096 128" "256 32768 128" "64 4096 64"; do
  tag=$(echo $shape | tr ' ' x)
  QOQ_KV4_LIB=$LIB timeout 240 ncu --clock-control none --kernel-name regex:kv4_attention_kernel --launch-skip 1 --launch-count 1 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
    --section SchedulerStats --section LaunchStats --section ComputeWorkloadAnalysis --section InstructionStats \
    python3 benchmarks/device/kv4_decode_once.py $shape > "$OUT/ncu-$tag.txt" 2>&1 || echo "ncu $tag rc $?"
  grep -E "Memory Throughput|DRAM Throughput|Duration|Achieved Occupancy|Issue Slots Busy|No Eligible|Registers Per|Warp Cycles Per Issued" "$OUT/ncu-$tag.txt" | head -12
done
echo done
