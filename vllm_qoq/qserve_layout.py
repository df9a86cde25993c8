"""QServe's checkpoint layout (model zoo "...-QServe[-g128]"), to and from ours.

Facts from qoq.md §6 (QServe's kernel fragment order), restated:
  qweight int8 [N, K/2], UINT4 codes in mma fragment order.  With
      n = 32*nt + 16*a + 8*b + c     (a, b in {0,1}, c in 0..7)
      k = 32*kt + 16*d + 4*e + f     (d in {0,1}, e, f in 0..3)
  code u[n, k] is in byte ((nt*K/32 + kt)*32 + 4*c + e)*16 + 8*d + 4*b + f of
  the flattened tensor; a = 0 -> low nibble, a = 1 -> high nibble.
  Per-channel: s1_scales, s1_szeros fp16 [N], W_hat = s1*u - s1_szeros (same
  post-scale convention as ours, so they map to scales/szeros unchanged).
  g128: s2_scales, s2_zeros int8 [K/128, N], columns permuted inside each block
  of 32 so that stored column j holds channel (j % 4)*8 + j // 4; s2_zeros
  holds (-z*s2) mod 256.

Slicing this layout along N in multiples of 32 keeps it valid; along K it does
not (a row-parallel shard would cut fragments), which is why vLLM loads it only
without row-parallel splitting.  Both directions are provided so tests (and the
importer) can build synthetic QServe checkpoints.
"""

from __future__ import annotations

import torch

from .format import GROUP_SIZE_G128


def _byte_and_nibble(n: int, k: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """For every natural (n, k): flat byte index and nibble (0 low / 1 high), [N, K] each."""
    if n % 32 or k % 32:
        raise ValueError(f"QServe layout needs N and K multiples of 32, got N={n}, K={k}")
    nn_ = torch.arange(n, device=device).view(n, 1)
    kk = torch.arange(k, device=device).view(1, k)
    nt, a, b, c = nn_ // 32, (nn_ % 32) // 16, (nn_ % 16) // 8, nn_ % 8
    kt, d, e, f = kk // 32, (kk % 32) // 16, (kk % 16) // 4, kk % 4
    byte = ((nt * (k // 32) + kt) * 32 + 4 * c + e) * 16 + 8 * d + 4 * b + f
    return byte, a.expand(n, k)


def qweight_to_natural(qweight: torch.Tensor) -> torch.Tensor:
    """QServe int8 [N, K/2] (fragment order) -> codes uint8 [N, K] in natural order."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    flat = qweight.reshape(-1).view(torch.uint8)
    byte, nib = _byte_and_nibble(n, k, qweight.device)
    vals = flat[byte]
    return torch.where(nib == 0, vals & 0xF, vals >> 4)


def qweight_from_natural(u: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] (0..15) -> QServe int8 [N, K/2] in fragment order."""
    n, k = u.shape
    byte, nib = _byte_and_nibble(n, k, u.device)
    u = u.to(torch.uint8)
    flat = torch.zeros(n * k // 2, dtype=torch.uint8, device=u.device)
    lo = nib == 0
    flat[byte[lo]] |= u[lo]
    flat[byte[~lo]] |= u[~lo] << 4
    return flat.view(torch.int8).reshape(n, k // 2)


def _col_perm(n: int, device=None) -> torch.Tensor:
    """perm[j] = natural channel stored at column j (within blocks of 32)."""
    j = torch.arange(n, device=device)
    base, r = (j // 32) * 32, j % 32
    return base + (r % 4) * 8 + r // 4


def s2_to_natural(
    s2_scales: torch.Tensor, s2_zeros: torch.Tensor, where: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """QServe int8 [K/128, N] (permuted, pre-negated zeros) -> ours uint8 [N, K/128] (s2, z)."""
    g, n = s2_scales.shape
    if n % 32:
        raise ValueError(f"{where}: QServe s2 tensors need N % 32 == 0, got N={n}")
    perm = _col_perm(n, s2_scales.device)
    s2 = torch.empty_like(s2_scales, dtype=torch.int32)
    zs = torch.empty_like(s2_zeros, dtype=torch.int32)
    s2[:, perm] = s2_scales.to(torch.int32)
    zs[:, perm] = s2_zeros.view(torch.uint8).to(torch.int32)
    if int(s2.min()) < 1 or int(s2.max()) > 16:
        raise ValueError(f"{where}: s2_scales outside 1..16: not a QServe g128 checkpoint")
    neg = (256 - zs) % 256  # = z * s2
    if bool((neg % s2).any()):
        raise ValueError(
            f"{where}: s2_zeros is not a multiple of s2_scales: the zeros are not in "
            "QServe's (-z*s2) mod 256 form (or the column order differs — e.g. the 2025 "
            "deepcompressor order); re-export with QServe's layout"
        )
    z = neg // s2
    if int(z.max()) > 15:
        raise ValueError(f"{where}: level-2 zero above 15: not a QServe g128 checkpoint")
    return s2.t().contiguous().to(torch.uint8), z.t().contiguous().to(torch.uint8)


def s2_from_natural(s2: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ours uint8 [N, K/128] (s2, z) -> QServe int8 [K/128, N] (permuted, (-z*s2) mod 256)."""
    n = s2.shape[0]
    perm = _col_perm(n, s2.device)
    s2_t = s2.to(torch.int32).t()[:, perm]
    zneg = ((-(z.to(torch.int32) * s2.to(torch.int32))) % 256).t()[:, perm]
    return s2_t.to(torch.int8).contiguous(), zneg.to(torch.uint8).view(torch.int8).contiguous()


def to_ours(tensors: dict[str, torch.Tensor], group_size: int, where: str = "") -> dict:
    """One layer's QServe tensors -> our natural-layout tensors (format.py names)."""
    from .format import pack_int4

    u = qweight_to_natural(tensors["qweight"])
    if group_size == -1:
        return {
            "qweight": pack_int4(u),
            "scales": tensors["s1_scales"].to(torch.float16).reshape(-1),
            "szeros": tensors["s1_szeros"].to(torch.float16).reshape(-1),
        }
    if group_size != GROUP_SIZE_G128:
        raise ValueError(f"{where}: unsupported group_size {group_size}")
    s2, z = s2_to_natural(tensors["s2_scales"], tensors["s2_zeros"], where)
    return {
        "qweight": pack_int4(u),
        "s1_scales": tensors["s1_scales"].to(torch.float16).reshape(-1),
        "s2_scales": s2,
        "s2_zeros": z,
    }
