"""Reference quantizers: the math every kernel and converter must reproduce.

Weights (offline, round-to-nearest; the QoQ recipe adds clipping/GPTQ on top):
  * per-channel asymmetric UINT4 (qoq.md §1 "g-1"), post-scale fp16 zero;
  * progressive g128 (qoq.md §1): level 1 per-channel symmetric to [-P, P]
    with an fp16 scale (not rounded), level 2 per 128-group asymmetric UINT4 with
    integer scale 1..16 and integer zero 0..15.  K is zero-padded to a multiple
    of 128 first (format.py): zeros change neither level (a group's range always
    includes 0) and quantize to the code u = z, i.e. q8 = 0.
Activations (runtime): symmetric INT8 per token (qoq.md §2).

All functions are plain PyTorch and deterministic.  Division is IEEE division
(no reciprocal multiply) and rounding is round-half-to-even, which is what the
CUDA kernels use (`__fdiv_rn`, `__float2int_rn`).
"""

from __future__ import annotations

import torch

from ..format import (
    DEFAULT_PROTECTIVE_RANGE,
    GROUP_SIZE_G128,
    check_k,
    pack_int4,
    pad_k,
)

_EPS = 1e-8  # smallest scale: guards max == min rows/groups (all-equal weights)


def quantize_weight_per_channel(
    w: torch.Tensor,
    clip_ratio: torch.Tensor | float | None = None,
) -> dict[str, torch.Tensor]:
    """RTN per-channel UINT4 of W [N, K] -> {qweight, scales, szeros} (format.py).

    clip_ratio (scalar or [N]) shrinks min/max before computing the scale, as the
    clipping search of the QoQ recipe does; None means no clipping.
    """
    n, k = w.shape
    check_k(k, -1)
    w = w.to(torch.float32)
    wmax = w.amax(dim=1)
    wmin = w.amin(dim=1)
    if clip_ratio is not None:
        r = torch.as_tensor(clip_ratio, dtype=torch.float32, device=w.device)
        wmax = wmax * r
        wmin = wmin * r
    scales = ((wmax - wmin) / 15.0).clamp_min(_EPS).to(torch.float16)
    szeros = (-wmin).to(torch.float16)
    u = torch.round((w + szeros.float()[:, None]) / scales.float()[:, None]).clamp_(0, 15)
    return {"qweight": pack_int4(u.to(torch.uint8)), "scales": scales, "szeros": szeros}


def level1_g128(
    w: torch.Tensor, protective_range: int = DEFAULT_PROTECTIVE_RANGE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Level 1 of progressive quantization: (s1 fp16 [N], x1 float32 [N, K] in [-P, P])."""
    w = w.to(torch.float32)
    s1 = (w.abs().amax(dim=1) / protective_range).clamp_min(_EPS).to(torch.float16)
    x1 = (w / s1.float()[:, None]).clamp_(-protective_range, protective_range)
    return s1, x1


def level2_params(
    x1: torch.Tensor, clip_ratio: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer scale s2 (1..16) and zero z (0..15) per 128-group of x1 [N, K].

    K must be a multiple of 128 (pad with zeros first: format.pad_k).
    Returns int32 tensors [N, K/128].  clip_ratio (scalar or [N, K/128]) shrinks
    the group's min/max first (clipping search).
    """
    n, k = x1.shape
    g = x1.reshape(n, k // GROUP_SIZE_G128, GROUP_SIZE_G128)
    gmax = g.amax(dim=2).clamp_min(0)
    gmin = g.amin(dim=2).clamp_max(0)
    if clip_ratio is not None:
        r = torch.as_tensor(clip_ratio, dtype=torch.float32, device=x1.device)
        gmax, gmin = gmax * r, gmin * r
    s2 = torch.round((gmax - gmin) / 15.0).clamp_(1, 16).to(torch.int32)
    z = torch.round(-gmin / s2).clamp_(0, 15).to(torch.int32)
    return s2, z


def quantize_level2(x1: torch.Tensor, s2: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """UINT4 codes u [N, K] of x1 for level-2 parameters, kept inside INT8.

    The code is clamped so that q8 = s2 * (u - z) stays in [-128, 127]: that is
    the invariant the kernels rely on (packed 8-bit lanes never overflow).
    """
    n, k = x1.shape
    ng = k // GROUP_SIZE_G128
    s2f = s2.to(torch.float32).reshape(n, ng, 1)
    zf = z.to(torch.float32).reshape(n, ng, 1)
    u = torch.round(x1.reshape(n, ng, GROUP_SIZE_G128) / s2f + zf)
    hi = torch.minimum(torch.full_like(zf, 15.0), zf + torch.floor(127.0 / s2f))
    lo = torch.maximum(torch.zeros_like(zf), zf - torch.floor(128.0 / s2f))
    u = torch.maximum(torch.minimum(u, hi), lo)
    return u.reshape(n, k).to(torch.uint8)


def quantize_weight_g128(
    w: torch.Tensor,
    protective_range: int = DEFAULT_PROTECTIVE_RANGE,
    clip_ratio: torch.Tensor | float | None = None,
) -> dict[str, torch.Tensor]:
    """RTN progressive g128 of W [N, K] -> {qweight, s1_scales, s2_scales, s2_zeros}.

    Any K: the tensors hold Kp = ceil(K/128)*128 columns (format.py), the
    padding columns the zero code.  clip_ratio: scalar or [N, Kp/128].
    """
    n, k = w.shape
    check_k(k, GROUP_SIZE_G128)
    s1, x1 = level1_g128(pad_k(w, GROUP_SIZE_G128), protective_range)
    s2, z = level2_params(x1, clip_ratio)
    u = quantize_level2(x1, s2, z)
    return {
        "qweight": pack_int4(u),
        "s1_scales": s1,
        "s2_scales": s2.to(torch.uint8),
        "s2_zeros": z.to(torch.uint8),
    }


def quantize_weight(w: torch.Tensor, group_size: int, **kw) -> dict[str, torch.Tensor]:
    """Dispatch to the per-channel (-1) or g128 (128) RTN quantizer."""
    if group_size == -1:
        return quantize_weight_per_channel(w, **kw)
    if group_size == GROUP_SIZE_G128:
        return quantize_weight_g128(w, **kw)
    raise ValueError(f"unsupported group_size {group_size}; use -1 or 128")


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token symmetric INT8 of x [M, K] (fp16/bf16/fp32).

    Returns qx int8 [M, K], sx float32 [M] (amax/127; 1.0 for an all-zero row)
    and qsum int32 [M] = sum_k qx (the row sum the per-channel GEMM's zero-point
    term needs; exact, so the GEMM equals the dequantized product).
    """
    xf = x.to(torch.float32)
    amax = xf.abs().amax(dim=-1)
    # a tensor divisor: PyTorch turns division by a Python scalar into a multiply
    # by its reciprocal on CUDA, which can differ from IEEE division by one ulp
    sx = torch.where(amax > 0, amax / torch.full_like(amax, 127.0), torch.ones_like(amax))
    qx = torch.round(xf / sx[..., None]).clamp_(-127, 127).to(torch.int8)
    qsum = qx.to(torch.int32).sum(dim=-1, dtype=torch.int32)
    return qx, sx, qsum


def dequantize_activation(qx: torch.Tensor, sx: torch.Tensor) -> torch.Tensor:
    return qx.to(torch.float32) * sx[..., None]


def fake_quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] after the runtime's per-token INT8 round trip, in x's dtype (fake quant)."""
    qx, sx, _ = quantize_activation(x.reshape(-1, x.shape[-1]))
    return dequantize_activation(qx, sx).reshape(x.shape).to(x.dtype)
