"""What the KV4 GPU test modules share: the kernel source and the device.

QOQ_KV4_LIB=/path/lib.so loads a separately built kernel library first (python -m
vllm_qoq.attention.build); otherwise the kernels come from the vllm_qoq._C extension.
"""

import os

import pytest
import torch

if torch.cuda.is_available() and os.environ.get("QOQ_KV4_LIB"):
    torch.ops.load_library(os.environ["QOQ_KV4_LIB"])

from vllm_qoq.attention import ops  # noqa: E402
from vllm_qoq.reference import kv4 as ref  # noqa: E402,F401  (re-exported for the tests)

DEV = "cuda"
GPU_ONLY = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]


@pytest.fixture(scope="module", autouse=True)
def _kernels():
    ops.register_ops()
    assert ops.has_cuda_kernels(), "the KV4 CUDA kernels are not built (vllm_qoq._C / QOQ_KV4_LIB)"
