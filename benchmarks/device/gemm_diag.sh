# Per-channel qoq vs FP8 on the Llama-3-8B shapes at M = 64 and 256, each variant in its own
# process (the small-grid timing question in benchmarks/results/gemm-notes.md; answered
# 2026-11-22 by gemm_small.sh: the fast numbers were the split-K workspace slices).  Kept to
# reproduce the numbers recorded with it.
#   bash benchmarks/device/gemm_diag.sh impls   # same M list, other impl sets and quant rows
#   bash benchmarks/device/gemm_diag.sh mlist   # same impls, M list 17..512 vs 64,256
set -o pipefail
run() {  # TAG M-LIST gemm.py-args...
  local tag=$1 ml=$2; shift 2
  python3 benchmarks/gemm.py --models llama3-8b --m "$ml" "$@" --tag=-diag$tag --out /tmp/diag > /dev/null 2>&1
  python3 - /tmp/diag/gemm-h100-diag$tag.json "$tag $ml" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
t = {(r["N"], r["K"], r["M"], r["impl"]): r["us"] for r in d["rows"]}
print(sys.argv[2], " ".join(f"{n}x{k}@{m}:{t[(n, k, m, 'qoq_chn')]:.1f}/{t[(n, k, m, 'fp8')]:.1f}"
                            for (n, k, m, i) in sorted(t) if i == "qoq_chn" and m in (64, 256)))
PY
}
case "${1:-impls}" in
  impls)
    run A 64,256 --no-quant --impls qoq_chn,fp8
    run B 64,256 --no-quant --impls qoq_chn,machete_w4a16,marlin_w4a16,fp8
    run C 64,256 --impls qoq_chn,fp8
    run D 64,256 --no-quant --impls marlin_w4a16,qoq_chn,fp8 ;;
  mlist)
    run E 17,32,48,64,96,128,256,512 --no-quant --impls qoq_chn,fp8
    run F 64,256 --no-quant --impls qoq_chn,fp8 ;;
esac
