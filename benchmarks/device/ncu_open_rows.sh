#!/usr/bin/env bash
# Nsight Compute profiles of the two rows the issues still miss (device-side; needs no vLLM):
#   KV4 decode, head_dim 128, batch 64 x context 4k (66% of HBM, target 70%), next to 64 x 16k
#   (77%) for contrast;  GEMM path 1, g128, M = 16 on 4096 x 4096 (0.91x of Marlin W4A16).
# Writes $OUT/ncu-open-rows.txt (full) and prints a summary.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
F="$OUT/ncu-open-rows.txt"
S="--section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis --section SchedulerStats"
t=$(date +%s)
LIB=$(MAX_JOBS=16 python3 benchmarks/device/build_kv4_lib.py kv4cur 2> "$OUT/build-kv4.log" | tail -1)
TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py -q build_ext --inplace > "$OUT/build-ext.log" 2>&1 || tail -5 "$OUT/build-ext.log"
echo "builds took $(( $(date +%s) - t )) s; kv4 lib $LIB"
for shape in "64 4096 128" "64 16384 128"; do
  echo "=== kv4 decode $shape" >> "$F"
  QOQ_KV4_LIB=$LIB VLLM_QOQ_DISABLE_KERNELS=1 timeout 150 ncu --clock-control none --kernel-name regex:kv4_attention_kernel \
    --launch-skip 1 --launch-count 1 $S --print-details all python3 benchmarks/device/kv4_decode_once.py $shape >> "$F" 2>&1 \
    || echo "ncu rc $? for kv4 $shape"
done
for c in "g128 16 4096 4096 1" "chn 16 4096 4096 1"; do
  echo "=== gemm $c" >> "$F"
  timeout 120 ncu --clock-control none --kernel-name regex:w4a8 --launch-skip 1 --launch-count 1 $S --print-details all \
    python3 benchmarks/device/gemm_once.py $c >> "$F" 2>&1 || echo "ncu rc $? for gemm $c"
done
grep -E "^===|Duration|DRAM Throughput|Memory Throughput|Issue Slots Busy|Achieved Occupancy|Registers Per|Waves Per SM|Grid Size|Block Size|Stall [A-Z][a-z]+ *(Long|Short|Wait|Barrier|Math|No|Not|MIO|LG|Branch|Dispatch|Drain|Membar|Sleep|Tex|Selected|Misc)|Warp Cycles Per Issued|No Eligible|Active Warps Per" "$F" | cut -c1-150 | head -120
