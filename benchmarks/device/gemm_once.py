"""Run one qoq GEMM a few times (for ncu).  Device-side helper.

    python benchmarks/device/gemm_once.py chn|g128 M N K [PATH]
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gemm as G  # noqa: E402  (benchmarks/gemm.py)

variant, m, n, k = sys.argv[1], *(int(v) for v in sys.argv[2:5])
path = int(sys.argv[5]) if len(sys.argv) > 5 else None
gen = torch.Generator(device="cuda").manual_seed(0)
fn = G.build_qoq(variant, m, n, k, gen, path=path, epilogue=path is not None)
for _ in range(3):
    fn()
torch.cuda.synchronize()
print("ok", variant, m, n, k, path)
