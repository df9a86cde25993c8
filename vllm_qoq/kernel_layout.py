"""Natural (on-disk) layout -> the layout the CUDA W4A8 GEMMs read.

Called through ``ops.prepare_weights`` from the linear method's
process_weights_after_loading, only when the CUDA kernels will run.  The reader
of every layout below is csrc/gemm/w4a8_sm80.cuh (mma.sync path; the Hopper
path reads the same bytes), whose header comment describes the same layouts.

qweight  uint8 [N, K/2] -> uint8 [Np, K/2]   (Np = N rounded up to 32; shape kept when N % 32 == 0)
    The bytes, viewed as [Np/32][K/32][32 lanes][4 words][4 bytes]: one 512-byte block per
    32 output x 32 input channels.  With lane = 4*g + t (g in 0..7, t in 0..3), word j
    (0..3) and byte i (0..3) of block (nc, kc):
        low nibble  = u[32*nc + 8*j + g, 32*kc + 4*t + i]
        high nibble = u[32*nc + 8*j + g, 32*kc + 16 + 4*t + i]
    i.e. word j is lane (g, t)'s B operand of mma.m16n8k32 for the 8 channels 8j..8j+7 of
    the block: b0 = w & 0x0F0F0F0F, b1 = (w >> 4) & 0x0F0F0F0F.  A warp's 16-byte loads of
    one block are one contiguous 512-byte run.  Rows N..Np-1 (padding) hold code 0.
scales, szeros, s1_scales  fp16 [N]: unchanged.
s2_scales  uint8 [N, K/128] -> uint8 [K/128, Np]: transposed (one row per group) and the
    columns of every block of 32 permuted so that position 4*g + j holds channel 8*j + g
    (lane g reads the 4 channels it serves as one 32-bit word).  Padding columns hold 0.
s2_zeros   uint8 [N, K/128] -> uint8 [K/128, Np]: the PRE-NEGATED zero (-z * s2) mod 256
    (what the kernel adds per byte after multiplying the codes by s2), same order.
Anything else in the dict (bias, ...) passes through unchanged.

``from_kernel_layout`` inverts it (tests, debugging).
"""

from __future__ import annotations

import torch

from .format import GROUP_SIZE_G128, pack_int4, unpack_int4

_BLOCK_N = 32  # output channels per block (one warp's four n8 MMA tiles)
_BLOCK_K = 32  # input channels per block (one m16n8k32 step)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    pad = t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))
    return torch.cat([t, pad], dim=0)


def padded_n(n: int) -> int:
    return (n + _BLOCK_N - 1) // _BLOCK_N * _BLOCK_N


def pack_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] natural -> uint8 [Np, K/2] kernel block order (see module doc)."""
    n, half_k = qweight.shape
    k = 2 * half_k
    if k % _BLOCK_K:
        raise ValueError(
            f"the CUDA W4A8 kernels need K % 32 == 0, got K={k}; leave this layer "
            "unquantized (modules_to_not_convert) or run without the CUDA extension"
        )
    np_ = padded_n(n)
    u = _pad_rows(unpack_int4(qweight), np_)  # [Np, K] codes
    # n = 32*nc + 8*j + g ; k = 32*kc + 16*h + 4*t + i
    u = u.reshape(np_ // 32, 4, 8, k // 32, 2, 4, 4)  # nc j g kc h t i
    u = u.permute(0, 3, 2, 5, 1, 6, 4)  # nc kc g t j i h
    return pack_int4(u.reshape(-1, 2)).reshape(np_, half_k).contiguous()


def unpack_qweight(kq: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_qweight: uint8 [Np, K/2] kernel order -> uint8 [N, K/2] natural."""
    np_, half_k = kq.shape
    k = 2 * half_k
    u = unpack_int4(kq.reshape(-1, 1)).reshape(np_ // 32, k // 32, 8, 4, 4, 4, 2)  # nc kc g t j i h
    u = u.permute(0, 4, 2, 1, 6, 3, 5).reshape(np_, k)  # nc j g kc h t i
    return pack_int4(u[:n])


def _perm32(np_: int, device) -> torch.Tensor:
    """Column order inside blocks of 32: position 4*g + j <- channel 8*j + g."""
    pos = torch.arange(32, device=device)
    src = 8 * (pos % 4) + pos // 4
    return (torch.arange(0, np_, 32, device=device)[:, None] + src[None, :]).reshape(-1)


def pack_group_params(s2_scales: torch.Tensor, s2_zeros: torch.Tensor):
    """uint8 [N, G] s2, z -> (s2, zneg) uint8 [G, Np] in the kernel's column order."""
    n = s2_scales.shape[0]
    np_ = padded_n(n)
    s2 = s2_scales.to(torch.int32)
    zneg = torch.remainder(-s2_zeros.to(torch.int32) * s2, 256)
    perm = _perm32(np_, s2_scales.device)
    s2 = _pad_rows(s2, np_)[perm].t().contiguous().to(torch.uint8)
    zneg = _pad_rows(zneg, np_)[perm].t().contiguous().to(torch.uint8)
    return s2, zneg


def unpack_group_params(ks2: torch.Tensor, kzneg: torch.Tensor, n: int):
    """Inverse of pack_group_params -> (s2_scales, s2_zeros) uint8 [N, G]."""
    np_ = ks2.shape[1]
    inv = torch.argsort(_perm32(np_, ks2.device))
    s2 = ks2.t()[inv][:n].to(torch.int32)
    zneg = kzneg.t()[inv][:n].to(torch.int32)
    # zneg = -z*s2 mod 256 with z*s2 <= 240: z = ((256 - zneg) % 256) / s2
    z = torch.remainder(256 - zneg, 256) // s2.clamp_min(1)
    return s2.to(torch.uint8), z.to(torch.uint8)


def to_kernel_layout(tensors: dict[str, torch.Tensor], group_size: int) -> dict[str, torch.Tensor]:
    """One layer's natural-layout tensors -> the CUDA kernels' layout (module doc)."""
    out = dict(tensors)
    out["qweight"] = pack_qweight(tensors["qweight"])
    if group_size == GROUP_SIZE_G128:
        out["s2_scales"], out["s2_zeros"] = pack_group_params(
            tensors["s2_scales"], tensors["s2_zeros"]
        )
    elif group_size != -1:
        raise ValueError(f"unsupported group_size {group_size}; use -1 or 128")
    return out


def from_kernel_layout(tensors: dict[str, torch.Tensor], group_size: int) -> dict[str, torch.Tensor]:
    """Inverse of to_kernel_layout (N is taken from the fp16 scales)."""
    out = dict(tensors)
    n = tensors["scales" if group_size == -1 else "s1_scales"].shape[0]
    out["qweight"] = unpack_qweight(tensors["qweight"], n)
    if group_size == GROUP_SIZE_G128:
        out["s2_scales"], out["s2_zeros"] = unpack_group_params(
            tensors["s2_scales"], tensors["s2_zeros"], n
        )
    return out
