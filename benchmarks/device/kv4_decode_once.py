"""Run the qoq KV4 decode kernel on one shape a few times (for ncu).  Device-side helper.

    QOQ_KV4_LIB=lib.so VLLM_QOQ_DISABLE_KERNELS=1 python benchmarks/device/kv4_decode_once.py B CTX D
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if os.environ.get("QOQ_KV4_LIB"):
    torch.ops.load_library(os.environ["QOQ_KV4_LIB"])
import attention as A  # noqa: E402  (benchmarks/attention.py)
from vllm_qoq.attention import ops  # noqa: E402

ops.register_ops()

b, ctx, d = (int(v) for v in sys.argv[1:4])
run, _ = A.qoq_kv4(A.Case(b, ctx, 1, 32, 8, d))
for _ in range(3):
    run()
torch.cuda.synchronize()
print("ok", b, ctx, d)
