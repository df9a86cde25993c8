"""Reference W4A8 GEMMs on the on-disk (natural) layout: the spec for the kernels.

Both variants accumulate exactly in int32 (qoq.md §1 "What the GEMM computes"):

per-channel:  acc[m, n] = sum_k qx[m, k] * u[n, k]
              y[m, n]   = sx[m] * (s[n] * acc[m, n] - szeros[n] * qsum[m])
    qsum is the row sum of the *quantized* activation (sum_k qx), so y equals
    dequant(qx) @ dequant(W)^T exactly up to fp32 rounding.  (QServe uses the
    unquantized row sum instead; we chose the exact form so the runtime matches
    its fake-quant reference.)
g128:         acc[m, n] = sum_k qx[m, k] * q8[n, k],  q8 = s2 * (u - z)
              y[m, n]   = sx[m] * s1[n] * acc[m, n]
g128 weights are stored with K zero-padded to Kp (a multiple of 128): the
caller pads x with zeros to Kp before quantizing it (zeros quantize to 0, so
the result is the unpadded product; vllm_qoq/linear.py does this).
Then + bias, cast to the output dtype.  The float epilogue is done in fp32 in
exactly the order written above.
"""

from __future__ import annotations

import torch

from ..format import int8_weight_g128, unpack_int4

# fp32 sums integers exactly up to 2^24; products of two int8 are at most 2^14 in magnitude.
_FP32_EXACT_K = 1 << 10


def int_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """Exact int32 a [M, K] int8 @ b_t[N, K]^T int8 -> int32 [M, N].

    CPU: fp32 matmuls over K-chunks of 1024, summed in int32.  Exact: every
    product is an integer with |a*b| <= 128*128 = 2^14, so every partial sum
    in a chunk is an integer of magnitude <= 1024 * 2^14 = 2^24, which fp32
    holds exactly whatever order the BLAS adds in.  (torch._int_mm on CPU is
    ~40x slower than this on 2 cores: a SmolLM2 perplexity window took minutes.)
    Falls back to float64 when fp32 matmuls may run in reduced precision
    (torch.set_float32_matmul_precision other than "highest").
    Elsewhere float64, which is exact because K * 2^14 < 2^53.
    """
    if a.device.type == "cpu" and torch.get_float32_matmul_precision() == "highest":
        out = torch.zeros(a.shape[0], b_t.shape[0], dtype=torch.int32)
        for k in range(0, a.shape[-1], _FP32_EXACT_K):
            part = a[:, k:k + _FP32_EXACT_K].to(torch.float32) @ b_t[:, k:k + _FP32_EXACT_K].to(torch.float32).t()
            out += part.to(torch.int32)
        return out
    return (a.to(torch.float64) @ b_t.to(torch.float64).t()).to(torch.int32)


def _epilogue(y: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)


def w4a8_chn_gemm(
    qx: torch.Tensor,
    sx: torch.Tensor,
    qsum: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    szeros: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    u = unpack_int4(qweight).to(torch.int8)
    acc = int_matmul(qx, u).to(torch.float32)
    y = acc * scales.to(torch.float32)[None, :] - qsum.to(torch.float32)[:, None] * szeros.to(
        torch.float32
    )[None, :]
    return _epilogue(y * sx.to(torch.float32)[:, None], bias, out_dtype)


def w4a8_g128_gemm(
    qx: torch.Tensor,
    sx: torch.Tensor,
    qweight: torch.Tensor,
    s1_scales: torch.Tensor,
    s2_scales: torch.Tensor,
    s2_zeros: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    q8 = int8_weight_g128(qweight, s2_scales, s2_zeros)
    if qx.shape[-1] != q8.shape[1]:
        raise ValueError(
            f"w4a8_g128_gemm: activations have K={qx.shape[-1]}, the weight {q8.shape[1]} "
            "(g128 weights are padded to a multiple of 128: pad the activations with zeros)"
        )
    acc = int_matmul(qx, q8).to(torch.float32)
    y = acc * sx.to(torch.float32)[:, None] * s1_scales.to(torch.float32)[None, :]
    return _epilogue(y, bias, out_dtype)
