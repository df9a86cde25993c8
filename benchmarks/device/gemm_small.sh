#!/usr/bin/env bash
# The small-grid questions of benchmarks/results/gemm-notes.md (M = 16-256, path 3 split-K),
# with the GPU's clocks and power sampled throughout (nvidia-smi, 4 Hz) so that each timing
# phase can be read against them.  Needs no vLLM.  Two steps, back to back on one machine:
#   bash benchmarks/device/gemm_small.sh time    # builds the tree (and, with GS_OLD=1, /tmp/old
#                                                # from the carried .devold/: build_trees.sh),
#                                                # times paths 1/3 and the defaults at M = 4-256
#   bash benchmarks/device/gemm_small.sh tests   # GEMM GPU tests, ncu of paths 3 and 1
# Results under $OUT: phases.txt (one line per phase with its clocks), gemm-*.json.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/gs
export PYTHONUNBUFFERED=1
if ! pgrep -f "nvidia-smi --query-gpu=timestamp" > /dev/null; then
  nohup nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active \
    --format=csv,noheader,nounits -lms 250 >> /tmp/gs/smi.csv 2> /dev/null &
fi
stamp() { date -u +%Y/%m/%d\ %H:%M:%S.%3N; }
phase() {  # NAME DIR ENV... -- gemm.py args
  local name=$1 dir=$2; shift 2
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  local t0; t0=$(stamp)
  (cd "$dir" && env "${envs[@]}" python3 benchmarks/gemm.py --no-quant --tag="-gs-$name" --out /tmp/gs "$@" > /tmp/gs/$name.log 2>&1) \
    || { echo "phase $name failed"; tail -5 /tmp/gs/$name.log; }
  echo "$name|$t0|$(stamp)" >> /tmp/gs/phases.idx
}
summary() {
  python3 - <<'PY' | tee "$OUT/phases.txt"
import csv, glob, json, datetime as dt
def t(s): return dt.datetime.strptime(s.strip(), "%Y/%m/%d %H:%M:%S.%f")
smi = []
for row in csv.reader(open("/tmp/gs/smi.csv")):
    try: smi.append((t(row[0]), float(row[1]), float(row[2]), float(row[3]), float(row[4]), row[5].strip()))
    except Exception: pass
for line in open("/tmp/gs/phases.idx"):
    name, a, b = line.strip().split("|")
    s = [r for r in smi if t(a) <= r[0] <= t(b)]
    clk = f"sm {min(r[1] for r in s):.0f}-{max(r[1] for r in s):.0f} MHz, mem {s[0][2]:.0f}, " \
          f"power <= {max(r[3] for r in s):.0f} W, temp <= {max(r[4] for r in s):.0f} C, " \
          f"reasons {sorted(set(r[5] for r in s))}" if s else "no samples"
    print(f"== {name}: {clk}")
    f = glob.glob(f"/tmp/gs/gemm-*-gs-{name}.json")
    if not f: continue
    rows = json.load(open(f[0]))["rows"]
    tab = {}
    for r in rows: tab.setdefault((r["N"], r["K"], r["M"]), {})[r["impl"]] = r["us"]
    for key in sorted(tab):
        print("  %6d x %-6d M=%-5d " % key + "  ".join(f"{i} {u:.1f}" for i, u in tab[key].items()))
PY
  cp /tmp/gs/gemm-*-gs-*.json "$OUT/" 2> /dev/null
  python3 - "$OUT" <<'PY'
import glob, json, os, sys
# one file for all phases (the device tool brings back few files)
d = {os.path.basename(f): json.load(open(f)) for f in sorted(glob.glob(sys.argv[1] + "/gemm-*-gs-*.json"))}
json.dump(d, open(sys.argv[1] + "/gemm-small-phases.json", "w"), indent=1)
for f in d: os.remove(os.path.join(sys.argv[1], f))
PY
}
case "${1:-time}" in
  time)
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader | tee "$OUT/device.txt"
    # the old side (phases OLD, OLD2) only with GS_OLD=1 and .devold/ carried
    LOGS=/tmp/gs BUILD_OLD=${GS_OLD:-0} bash benchmarks/device/build_trees.sh
    SM="--m 4,8,16,32,64,256"
    I=qoq_chn@1:bf16,qoq_g128@1:bf16,qoq_chn@3:bf16,qoq_g128@3:bf16,qoq_chn,qoq_g128
    phase NEW . -- $SM --impls $I,fp8
    [ "${GS_OLD:-0}" = 1 ] && phase OLD /tmp/old -- $SM --impls $I
    phase NEW2 . -- $SM --impls $I
    [ "${GS_OLD:-0}" = 1 ] && phase OLD2 /tmp/old -- $SM --impls $I
    summary ;;
  tests)
    t=$(date +%s)
    python3 -m pytest -q -x tests/gpu/test_gemm_kernels.py -k "not pingpong" -p no:cacheprovider 2>&1 | tail -3 | tee "$OUT/pytest-gemm.txt"
    echo "tests took $(( $(date +%s) - t )) s"
    S="--section SpeedOfLight --section LaunchStats --section WarpStateStats --section SourceCounters"
    for c in "chn 64 4096 4096 3" "chn 16 4096 4096 1"; do
      echo "=== $c" >> "$OUT/ncu-small.txt"
      timeout 100 ncu --clock-control none --kernel-name regex:w4a8 --launch-skip 1 --launch-count 1 $S --print-details all \
        python3 benchmarks/device/gemm_once.py $c >> "$OUT/ncu-small.txt" 2>&1 || echo "ncu rc $? for $c"
    done
    grep -E "^===|Duration|DRAM Throughput|Issue Slots Busy|Achieved Occupancy|Registers Per|Block Limit|Waves Per SM|Stall" "$OUT/ncu-small.txt" | cut -c1-150 | head -60 ;;
esac
