# KV4 launch-policy probe (device only): patches a scratch copy of the tree, never this one.
#   EXP_SPLITS=N             forces the decode split count (capped as the policy caps it);
#   dense rule               counts every CTA of the launch, split launches included;
#   VLLM_QOQ_KV4_DENSE=on    then forces the dense build on every decode launch.
# As run on 2026-11-22 (docs/kv4.md, "Batch 64 x 4k"): copy the tree to /tmp/exp, run
# `python3 benchmarks/device/kv4_exp_patch.py /tmp/exp`, build it with build_kv4_lib.py, then
# time `benchmarks/attention.py --phases decode --impls qoq_kv4 --lib ...` under each setting.
import sys
p = sys.argv[1] + "/csrc/attention/kv4_attention.cu"
s = open(p).read()
a = "  // workspace: splits x [T, Hq, D + 1] fp32"
assert s.count(a) == 1
s = s.replace(a, '  if (const char* e = std::getenv("EXP_SPLITS")) splits = std::min<int64_t>(std::atoi(e), max_splits);\n' + a)
b = "    if (a.num_splits == 1 && policy != 1 && !r2) {"
assert s.count(b) == 1
s = s.replace(b, "    if (policy != 1 && !r2) {")
c = "      const int64_t ctas = (int64_t)grid.y * grid.z;"
assert s.count(c) == 1
s = s.replace(c, "      const int64_t ctas = (int64_t)grid.x * grid.y * grid.z;")
open(p, "w").write(s)
print("patched")
