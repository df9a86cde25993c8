#!/usr/bin/env bash
# Device A/B of a KV4 attention kernel change: builds csrc/attention of the working tree and of
# the same tree with the files under .devold/ put back (build_kv4_lib.py), runs the KV4 GPU tests
# on the new build, then the decode sweep of benchmarks/attention.py for each build in its own
# process (old: qoq_kv4 only; new: with the FA3 baselines when vLLM is there).  Run it through
# benchmarks/device/session.sh after the vLLM install for the baselines.  Results under $OUT.
set -eo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
bash benchmarks/device/old_tree.sh
t=$(date +%s)
(MAX_JOBS=8 python3 benchmarks/device/build_kv4_lib.py kv4new > "$OUT/log.txt" 2>&1; echo "new build rc $?") &
(cd /tmp/old && MAX_JOBS=8 python3 benchmarks/device/build_kv4_lib.py kv4old > /tmp/old-build.log 2>&1; echo "old build rc $?") &
wait
echo "builds took $(( $(date +%s) - t )) s"
NEW=/tmp/kv4libs/kv4new/kv4new.so OLD=/tmp/kv4libs/kv4old/kv4old.so
t=$(date +%s)
VLLM_QOQ_DISABLE_KERNELS=1 QOQ_KV4_LIB=$NEW python3 -m pytest -q tests/gpu/test_kv4_kernels.py tests/gpu/test_kv4_prefill.py \
  -k "not vllm" -p no:cacheprovider 2>&1 | tail -4
echo "tests took $(( $(date +%s) - t )) s"
VLLM_QOQ_DISABLE_KERNELS=1 python3 benchmarks/attention.py --phases decode --impls qoq_kv4 --lib $OLD \
  --out "$OUT/attn-old.json" 2>&1 | tail -1
VLLM_QOQ_DISABLE_KERNELS=1 python3 benchmarks/attention.py --phases decode --impls ${AB_IMPLS:-qoq_kv4 fa3_bf16 fa3_fp8} \
  --lib $NEW --out "$OUT/attn-new.json" 2>&1 | tail -1
if [ -n "${AB_EXTRA_ENV:-}" ]; then  # e.g. AB_EXTRA_ENV=VLLM_QOQ_KV4_DENSE=on: the new build once more
  env $AB_EXTRA_ENV VLLM_QOQ_DISABLE_KERNELS=1 python3 benchmarks/attention.py --phases decode --impls qoq_kv4 \
    --lib $NEW --out "$OUT/attn-new-env.json" 2>&1 | tail -1
fi
rm -f "$OUT"/attn-old.md "$OUT"/attn-new-env.md
echo done
