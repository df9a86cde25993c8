#!/usr/bin/env bash
# Nsight Compute profiles of single qoq GEMM launches (device-side; builds the extension first).
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py -q build_ext --inplace > /tmp/build.log 2>&1 || { tail -20 /tmp/build.log; exit 1; }
S="--section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis"
for c in "chn 256 4096 4096" "chn 64 4096 4096" "chn 1024 4096 4096" "chn 256 6144 4096" "g128 1024 4096 4096"; do
  echo "=== $c" >> "$OUT/ncu-gemm.txt"
  timeout 120 ncu --clock-control none --kernel-name regex:w4a8 --launch-skip 1 --launch-count 1 $S --print-details all \
    python3 benchmarks/device/gemm_once.py $c >> "$OUT/ncu-gemm.txt" 2>&1 || echo "rc $? for $c"
done
grep -E "^===|w4a8.*\(|Duration|DRAM Throughput|Compute \(SM\) Throughput|Issue Slots Busy|Achieved Occupancy|Stall|stall" "$OUT/ncu-gemm.txt" | cut -c1-160 | head -120
