# Does the M list change path 3's small-grid times?  Same shapes, two processes.
set -o pipefail
for ml in "17,32,48,64,96,128,256,512" "64,256"; do
  python3 benchmarks/gemm.py --models llama3-8b --m $ml --impls qoq_chn,fp8 --no-quant --tag=-d2 --out /tmp/d2 > /dev/null 2>&1
  python3 - /tmp/d2/gemm-h100-d2.json "$ml" <<'PY'
import json,sys
d=json.load(open(sys.argv[1])); t={(r['N'],r['K'],r['M'],r['impl']):r['us'] for r in d['rows']}
print(sys.argv[2], " ".join(f"{n}x{k}@{m}:{t[(n,k,m,'qoq_chn')]:.1f}/{t[(n,k,m,'fp8')]:.1f}" for (n,k,m,i) in sorted(t) if i=='qoq_chn' and m in (64,256)))
PY
done
