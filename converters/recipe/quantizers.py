"""Weight quantizers of the QoQ recipe on top of vllm_qoq/reference/quantize.py.

* ``output_error``: per-output-channel layer-output error Σ_t (x_t·(w − ŵ))²,
  computed from the input Hessian H = Σ_t x_tᵀ x_t as (w − ŵ) H (w − ŵ)ᵀ.
* ``clip_search``: per-output-channel clipping ratio from a grid (1.0 first,
  so the chosen ratio never does worse than no clipping on the calibration
  data), quantizing with the reference RTN quantizers.
* ``gptq_quantize``: GPTQ (Frantar et al., arXiv 2210.17323: quantize one input
  column at a time and spread its error over the columns not yet quantized
  through the Cholesky factor of H⁻¹) applied to the final 4-bit step:
  per-channel UINT4 codes, or for progressive g128 the level-2 codes of the
  level-1 values x1 = W/s1 (level 1 is not rounded, so it needs no GPTQ).
  Quantization parameters come from the reference quantizers (and the clip
  ratio); with a diagonal H the result is bit-identical to the reference RTN.
  g128 with K % 128 != 0: W is padded with zero columns to a multiple of 128
  (the stored layout, vllm_qoq/format.py); the searches and errors use [N, K].
All outputs are in our on-disk format (vllm_qoq/format.py).
"""

from __future__ import annotations

import torch

from vllm_qoq import format as fmt
from vllm_qoq.reference.quantize import (
    level1_g128,
    level2_params,
    quantize_level2,
    quantize_weight,
    quantize_weight_per_channel,
)

G = fmt.GROUP_SIZE_G128


class HessianAccumulator:
    """Running H = mean_t x_tᵀ x_t over the tokens of a linear's input (float32)."""

    def __init__(self, k: int, device) -> None:
        self.h = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.h.dtype)
        t = x.shape[0]
        self.h.mul_(self.n / (self.n + t)).addmm_(x.T, x, alpha=1.0 / (self.n + t))
        self.n += t


def output_error(
    w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Per-row (w − ŵ) H (w − ŵ)ᵀ [N], computed in `dtype` (the searches use float32)."""
    d = w.to(dtype) - w_hat.to(dtype)
    return ((d @ h.to(dtype)) * d).sum(dim=1)


def relative_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """‖X(W − Ŵ)ᵀ‖² / ‖XWᵀ‖² on the calibration inputs (X folded into H)."""
    den = float(output_error(w, torch.zeros_like(w), h).sum())
    return float(output_error(w, w_hat, h).sum()) / max(den, 1e-30)


def clip_grid(steps: int, min_ratio: float = 0.2) -> list[float]:
    """1.0, then steps values down to min_ratio (qoq.md §1: 1.0, 0.99 .. 0.20 for 80 steps)."""
    return [1.0 - i * (1.0 - min_ratio) / steps for i in range(steps + 1)]


def clip_search(
    w: torch.Tensor,
    h: torch.Tensor,
    group_size: int,
    steps: int = 80,
    min_ratio: float = 0.2,
    protective_range: int = fmt.DEFAULT_PROTECTIVE_RANGE,
) -> torch.Tensor:
    """Best per-output-channel clip ratio [N] (float32) for RTN under the H-weighted error.

    Per-channel: the ratio shrinks the row's min/max.  g128: it shrinks every
    level-2 group's min/max of the row (level 1 stays the full range).
    """
    n = w.shape[0]
    w = w.to(torch.float32)
    hd = h.to(torch.float32)
    level1 = level1_g128(w, protective_range) if group_size != -1 else None
    best_err = torch.full((n,), float("inf"), dtype=torch.float32, device=w.device)
    best = torch.ones(n, dtype=torch.float32, device=w.device)
    for r in clip_grid(steps, min_ratio):
        ratio = torch.full((n, 1), r, dtype=torch.float32, device=w.device)
        err = output_error(w, fake_quantize(w, group_size, ratio[:, 0], level1=level1), hd, torch.float32)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    return best


def fake_quantize(
    w: torch.Tensor,
    group_size: int,
    clip_ratio: torch.Tensor | None = None,
    protective_range: int = fmt.DEFAULT_PROTECTIVE_RANGE,
    level1: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """dequantize(rtn_quantize(w, ...)) without packing (bit-identical; for the searches).

    level1 may pass a precomputed level1_g128(w) (it does not depend on the ratio).
    """
    w = w.to(torch.float32)
    if group_size == -1:  # the arithmetic of reference quantize_weight_per_channel
        wmax, wmin = w.amax(dim=1), w.amin(dim=1)
        if clip_ratio is not None:
            wmax, wmin = wmax * clip_ratio, wmin * clip_ratio
        s = ((wmax - wmin) / 15.0).clamp_min(1e-8).to(torch.float16).float()[:, None]
        sz = (-wmin).to(torch.float16).float()[:, None]
        u = torch.round((w + sz) / s).clamp_(0, 15)
        return s * u - sz
    s1, x1 = level1 if level1 is not None else level1_g128(w, protective_range)
    n, k = w.shape
    x1 = fmt.pad_k(x1, G)  # K zero-padded to a multiple of 128, as the reference quantizer does
    kp = x1.shape[1]
    r = None if clip_ratio is None else clip_ratio.reshape(n, 1)
    s2, z = level2_params(x1, r)
    u = quantize_level2(x1, s2, z).to(torch.float32).view(n, kp // G, G)
    q8 = s2.to(torch.float32)[..., None] * (u - z.to(torch.float32)[..., None])
    return (s1.float()[:, None] * q8.view(n, kp))[:, :k]


def _gptq_hinv(h: torch.Tensor, w: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of (H + λI)⁻¹ (float64); zeroes W columns of dead inputs."""
    h = h.to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0
    lam = damp * torch.mean(torch.diag(h))
    idx = torch.arange(h.shape[0], device=h.device)
    for attempt in range(6):  # grow the damping if H is numerically singular
        hh = h.clone()
        hh[idx, idx] += lam * (10 ** attempt)
        chol, info = torch.linalg.cholesky_ex(hh)
        if int(info) == 0:
            break
    else:
        raise RuntimeError("GPTQ: the input Hessian is not positive definite even with damping")
    hinv = torch.cholesky_inverse(chol)
    return torch.linalg.cholesky(hinv, upper=True), w


def _gptq_loop(x: torch.Tensor, hinv: torch.Tensor, block: int, quant_col, start_group=None):
    """Generic GPTQ sweep over columns of x [N, K] (float32, modified); returns codes uint8 [N, K].

    quant_col(col_index, column) -> (codes, dequantized column).
    start_group(col_index, x_block_view) is called at each group start (lazy group params).
    """
    n, k = x.shape
    codes = torch.empty(n, k, dtype=torch.uint8, device=x.device)
    hinv = hinv.to(x.dtype)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        x1 = x[:, i1:i2].clone()
        err1 = torch.zeros_like(x1)
        hb = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if start_group is not None and col % G == 0:
                start_group(col, x1[:, i : i + G])
            c, dq = quant_col(col, x1[:, i])
            codes[:, col] = c
            e = (x1[:, i] - dq) / hb[i, i]
            x1[:, i:] -= e[:, None] * hb[i, i:][None, :]
            err1[:, i] = e
        x[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    group_size: int,
    clip_ratio: torch.Tensor | None = None,
    protective_range: int = fmt.DEFAULT_PROTECTIVE_RANGE,
    damp: float = 0.01,
    block: int = 128,
) -> dict[str, torch.Tensor]:
    """GPTQ on W [N, K] with input Hessian H [K, K] -> our format tensors."""
    n, k = w.shape
    fmt.check_k(k, group_size)
    w = w.to(torch.float32).clone()
    hinv, w = _gptq_hinv(h, w, damp)
    if group_size == -1:
        ref = quantize_weight_per_channel(w, clip_ratio=clip_ratio)
        s = ref["scales"].float()
        sz = ref["szeros"].float()

        def quant_col(_, col):  # same rounding as quantize_weight_per_channel
            u = torch.round((col + sz) / s).clamp_(0, 15)
            return u.to(torch.uint8), s * u - sz

        codes = _gptq_loop(w, hinv, block, quant_col)
        return {"qweight": fmt.pack_int4(codes), "scales": ref["scales"], "szeros": ref["szeros"]}

    if group_size != G:
        raise ValueError(f"unsupported group_size {group_size}")
    if block % G:
        raise ValueError("GPTQ block must be a multiple of 128 for g128")
    kp = fmt.padded_k(k, G)
    if kp != k:
        # K % 128 != 0: the stored layer has kp - k zero columns (format.py).  Give them an
        # input of their own, uncoupled from the real inputs (an identity block in H, hence
        # in the Cholesky factor of H⁻¹): GPTQ then moves no error into them, they stay 0
        # and get the zero code u = z, exactly as the reference quantizer pads.
        eye = torch.eye(kp - k, dtype=hinv.dtype, device=hinv.device)
        hinv = torch.block_diag(hinv, eye)
    s1, x1 = level1_g128(fmt.pad_k(w, G), protective_range)
    ng = kp // G
    s2_all = torch.empty(n, ng, dtype=torch.int32, device=w.device)
    z_all = torch.empty(n, ng, dtype=torch.int32, device=w.device)
    cur: dict[str, torch.Tensor] = {}
    ratio = None if clip_ratio is None else clip_ratio.reshape(n, 1).to(torch.float32)

    def start_group(col, xg):  # level-2 parameters from the current (updated) group values
        s2, z = level2_params(xg.contiguous(), ratio)
        g = col // G
        s2_all[:, g], z_all[:, g] = s2[:, 0], z[:, 0]
        s2f, zf = s2[:, 0].to(torch.float32), z[:, 0].to(torch.float32)
        cur["s2"], cur["z"] = s2f, zf
        # same INT8-safe code bounds as reference quantize_level2
        cur["hi"] = torch.minimum(torch.full_like(zf, 15.0), zf + torch.floor(127.0 / s2f))
        cur["lo"] = torch.maximum(torch.zeros_like(zf), zf - torch.floor(128.0 / s2f))

    def quant_col(_, col):  # same rounding as reference quantize_level2
        u = torch.round(col / cur["s2"] + cur["z"])
        u = torch.maximum(torch.minimum(u, cur["hi"]), cur["lo"])
        return u.to(torch.uint8), cur["s2"] * (u - cur["z"])

    codes = _gptq_loop(x1, hinv, block, quant_col, start_group)
    return {
        "qweight": fmt.pack_int4(codes),
        "s1_scales": s1,
        "s2_scales": s2_all.to(torch.uint8),
        "s2_zeros": z_all.to(torch.uint8),
    }


def rtn_quantize(
    w: torch.Tensor,
    group_size: int,
    clip_ratio: torch.Tensor | None = None,
    protective_range: int = fmt.DEFAULT_PROTECTIVE_RANGE,
) -> dict[str, torch.Tensor]:
    """Reference RTN with an optional per-output-channel clip ratio [N]."""
    if group_size == -1:
        return quantize_weight_per_channel(w, clip_ratio=clip_ratio)
    r = None if clip_ratio is None else clip_ratio.reshape(-1, 1)
    return quantize_weight(w, group_size, protective_range=protective_range, clip_ratio=r)
