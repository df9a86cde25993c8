set -o pipefail
for v in "A --no-quant --impls qoq_chn,fp8" "B --no-quant --impls qoq_chn,machete_w4a16,marlin_w4a16,fp8" "C --impls qoq_chn,fp8" "D --no-quant --impls marlin_w4a16,qoq_chn,fp8"; do
  set -- $v; tag=$1; shift
  python3 benchmarks/gemm.py --models llama3-8b --m 64,256 "$@" --tag=-diag$tag --out /tmp/diag > /dev/null 2>&1
  python3 - /tmp/diag/gemm-h100-diag$tag.json $tag <<'PY'
import json,sys
d=json.load(open(sys.argv[1])); t={(r['N'],r['K'],r['M'],r['impl']):r['us'] for r in d['rows']}
print(sys.argv[2], " ".join(f"{n}x{k}@{m}:{t[(n,k,m,'qoq_chn')]:.1f}/{t[(n,k,m,'fp8')]:.1f}" for (n,k,m,i) in sorted(t) if i=='qoq_chn'))
PY
done
