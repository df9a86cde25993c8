#!/usr/bin/env bash
# For the GEMM A/B scripts: builds this tree's extension in place (sm_90a) and, when .devold/
# is carried, /tmp/old (old_tree.sh: this tree with the .devold/ files put back) after it, one
# build at a time (each ~40 s with 16 jobs; a call that ran two in parallel did not finish in
# 10 minutes, cause not established).  Prints where each side's extension is imported from, so
# that an A/B never compares a build with itself.  Build logs under $LOGS (default /tmp);
# BUILD_OLD=0 skips /tmp/old even with .devold/ carried.
LOGS=${LOGS:-/tmp}; mkdir -p "$LOGS"
old=0; [ -d .devold ] && [ "${BUILD_OLD:-1}" != 0 ] && old=1
t=$(date +%s)
TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py -q build_ext --inplace > "$LOGS/build-new.log" 2>&1 || { echo "new build failed"; grep -m5 -i error "$LOGS/build-new.log"; }
if [ $old = 1 ]; then
  bash benchmarks/device/old_tree.sh
  (cd /tmp/old && TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 setup.py -q build_ext --inplace > "$LOGS/build-old.log" 2>&1) || echo "old build failed"
fi
echo "builds took $(( $(date +%s) - t )) s"
for d in . /tmp/old; do
  [ "$d" = /tmp/old ] && [ $old = 0 ] && continue
  (cd "$d" && python3 -c "import vllm_qoq.ops as o, os; print('extension', os.path.dirname(o.__file__), o.has_cuda_kernels(), o.extension_error())")
done
