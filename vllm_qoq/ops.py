"""One registration point for the `qoq` torch ops.

Schemas are defined here, in Python, once.  Implementations:
  * CPU: always the pure-PyTorch reference (vllm_qoq.reference), on the natural
    on-disk layout;
  * CUDA: the compiled kernels of the extension `vllm_qoq._C` (csrc/, registered
    with TORCH_LIBRARY_IMPL(qoq, CUDA, ...)) when it was built, otherwise the
    reference as well;
    VLLM_QOQ_DISABLE_KERNELS=1 forces the reference on CUDA too (debugging,
    and the "reference path on the GPU" end-to-end runs);
  * Meta/fake: shape-only functions, so Dynamo (fullgraph) and CUDA graphs can
    trace the linear method.

The CUDA kernels may want the weights in a kernel-specific order.  That
reordering is done by `prepare_weights` (called from the linear method's
process_weights_after_loading) and only when the kernels will run; tensors keep
their shapes ([N, K/2] qweight, [N] scales) so the fake functions stay valid.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from .reference import gemm as ref_gemm
from .reference.quantize import quantize_activation

logger = logging.getLogger(__name__)

_SCHEMAS = {
    "quantize_per_token": "quantize_per_token(Tensor x) -> (Tensor, Tensor, Tensor)",
    "w4a8_chn_gemm": (
        "w4a8_chn_gemm(Tensor qx, Tensor sx, Tensor qsum, Tensor qweight, Tensor scales, "
        "Tensor szeros, Tensor? bias, ScalarType out_dtype) -> Tensor"
    ),
    "w4a8_g128_gemm": (
        "w4a8_g128_gemm(Tensor qx, Tensor sx, Tensor qweight, Tensor s1_scales, "
        "Tensor s2_scales, Tensor s2_zeros, Tensor? bias, ScalarType out_dtype) -> Tensor"
    ),
}

_REFERENCE = {
    "quantize_per_token": quantize_activation,
    "w4a8_chn_gemm": ref_gemm.w4a8_chn_gemm,
    "w4a8_g128_gemm": ref_gemm.w4a8_g128_gemm,
}


def _fake_quantize_per_token(x):
    m = x.shape[:-1]
    return (
        x.new_empty(x.shape, dtype=torch.int8),
        x.new_empty(m, dtype=torch.float32),
        x.new_empty(m, dtype=torch.int32),
    )


def _fake_chn_gemm(qx, sx, qsum, qweight, scales, szeros, bias, out_dtype):
    return qx.new_empty((qx.shape[0], scales.shape[0]), dtype=out_dtype)


def _fake_g128_gemm(qx, sx, qweight, s1_scales, s2_scales, s2_zeros, bias, out_dtype):
    return qx.new_empty((qx.shape[0], s1_scales.shape[0]), dtype=out_dtype)


_FAKE = {
    "quantize_per_token": _fake_quantize_per_token,
    "w4a8_chn_gemm": _fake_chn_gemm,
    "w4a8_g128_gemm": _fake_g128_gemm,
}

_state: dict[str, Any] = {"lib": None, "ext": None, "ext_error": None}


def _load_extension():
    if os.environ.get("VLLM_QOQ_DISABLE_KERNELS") == "1":
        _state["ext_error"] = "disabled by VLLM_QOQ_DISABLE_KERNELS=1"
        return None
    try:
        from . import _C  # noqa: F401  (registers CUDA impls on import)
    except ImportError as e:  # pure-Python install, or CPU-only torch
        _state["ext_error"] = str(e)
        return None
    return _C


def register_ops() -> None:
    """Define the `qoq` ops (idempotent; safe in every vLLM process)."""
    if _state["lib"] is not None:
        return
    if hasattr(torch.ops, "qoq") and hasattr(torch.ops.qoq, "w4a8_g128_gemm"):
        # Defined by another copy of this module (e.g. re-import under a new name).
        _state["lib"] = "external"
        return
    lib = torch.library.Library("qoq", "DEF")
    for name, schema in _SCHEMAS.items():
        lib.define(schema)
        lib.impl(name, _REFERENCE[name], "CPU")
        torch.library.register_fake(f"qoq::{name}", lib=lib)(_FAKE[name])
    _state["lib"] = lib
    _state["ext"] = _load_extension()
    if _state["ext"] is None:
        for name in _SCHEMAS:
            lib.impl(name, _REFERENCE[name], "CUDA")


def has_cuda_kernels() -> bool:
    """True when the compiled CUDA extension is loaded (the fast path)."""
    register_ops()
    return _state["ext"] is not None


def extension_error() -> str | None:
    register_ops()
    return _state["ext_error"]


def uses_kernel_layout(device: torch.device) -> bool:
    """Whether weights on `device` are consumed by the CUDA kernels (kernel layout)."""
    return device.type == "cuda" and has_cuda_kernels()


def prepare_weights(tensors: dict[str, torch.Tensor], group_size: int) -> dict[str, torch.Tensor]:
    """Natural layout -> the layout the ops on this device consume.

    Identity for the reference path.  With the CUDA extension this calls its
    reorder function (defined next to the kernel that reads the layout).
    """
    device = tensors["qweight"].device
    if not uses_kernel_layout(device):
        return tensors
    from . import kernel_layout

    return kernel_layout.to_kernel_layout(tensors, group_size)


# Thin wrappers, in the style of vllm/_custom_ops.py.
def quantize_per_token(x: torch.Tensor):
    return torch.ops.qoq.quantize_per_token(x)


def w4a8_chn_gemm(qx, sx, qsum, qweight, scales, szeros, bias, out_dtype):
    return torch.ops.qoq.w4a8_chn_gemm(qx, sx, qsum, qweight, scales, szeros, bias, out_dtype)


def w4a8_g128_gemm(qx, sx, qweight, s1_scales, s2_scales, s2_zeros, bias, out_dtype):
    return torch.ops.qoq.w4a8_g128_gemm(
        qx, sx, qweight, s1_scales, s2_scales, s2_zeros, bias, out_dtype
    )

register_ops()
