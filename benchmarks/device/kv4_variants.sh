#!/usr/bin/env bash
# Compile-time variants of csrc/attention (build_kv4_lib.py NAME -DMACRO=V ...), built in
# parallel, then the decode sweep of benchmarks/attention.py (qoq_kv4, --flush read) for each
# in its own process, in the order given, and the first one again at the end (drift).
# The KV4 kernel tests run on the first build (SKIP_TESTS=1: not).  Results (one JSON per
# run, tests.log) under $OUT; the logs stay in /tmp.
#   bash benchmarks/device/kv4_variants.sh base "s64_8=-DQOQ_KV4_STAGES_64=8" ...
set -eo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
t=$(date +%s)
names=()
for v in "$@"; do
  name=${v%%=*}; defs=""; [ "$name" != "$v" ] && defs=$(echo "${v#*=}" | tr ',' ' ')
  names+=("$name")
  (MAX_JOBS=4 python3 benchmarks/device/build_kv4_lib.py "$name" $defs > "/tmp/build-$name.log" 2>&1 \
     || echo "build $name failed: $(tail -3 /tmp/build-$name.log)") &
done
wait
echo "builds took $(( $(date +%s) - t )) s"
first=${names[0]}
if [ -z "${SKIP_TESTS:-}" ]; then
  t=$(date +%s)
  VLLM_QOQ_DISABLE_KERNELS=1 QOQ_KV4_LIB=/tmp/kv4libs/$first/$first.so python3 -m pytest -q \
    tests/gpu/test_kv4_kernels.py tests/gpu/test_kv4_prefill.py -k "not vllm" -p no:cacheprovider \
    > /tmp/tests.log 2>&1 || true
  cp /tmp/tests.log "$OUT/tests.log"
  echo "tests ($first): $(tail -1 /tmp/tests.log), $(( $(date +%s) - t )) s"
fi
i=0
for name in "${names[@]}" "$first"; do
  i=$((i + 1))
  VLLM_QOQ_DISABLE_KERNELS=1 python3 benchmarks/attention.py --phases decode --impls qoq_kv4 \
    --lib /tmp/kv4libs/$name/$name.so --flush read --out "$OUT/v$i-$name.json" > "/tmp/v$i-$name.log" 2>&1 \
    || echo "run $name failed: $(tail -2 "/tmp/v$i-$name.log")"
  rm -f "$OUT/v$i-$name.md"
done
echo done
