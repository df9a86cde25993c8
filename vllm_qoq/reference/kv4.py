"""The KV4 paged cache: layout, quantizer and attention, in plain PyTorch.

This module is THE specification of vllm_qoq's 4-bit KV cache (the
`int4_per_token_head` cache dtype when our attention backend is selected).
The CUDA kernels in csrc/attention/ are tested against it, and the CPU path of
the backend runs it.  docs/kv4.md has the prose version.

Quantization (QServe §3 / qoq.md §3), for every token and KV head, separately
for K (after RoPE, and after SmoothAttention when the converter folded it into
the weights: nothing here assumes unsmoothed keys) and for V, over the head_dim
values x[0..D):

    mn, mx  = min(x), max(x)                                   (fp32)
    s32     = max((mx - mn) / 15, max(|mn|, |mx|) * 2^-10, 2^-14)
    scale   = fp16(min(s32, 65504))
    zero    = fp16(-mn / scale)
    code    = clamp(round_half_even(x / scale + zero), 0, 15)
    x_hat   = (code - zero) * scale                            (fp32)

The second and third terms of s32 are the guard for max == min (QServe has none):
they keep |zero| <= 1024, where fp16 still holds integers exactly (so the zero
is off by at most half a step), and keep scale a normal fp16 number.  They only
bite when the range is below ~1.5% of the magnitude.  The clamp catches the code
16 that fp16 rounding of scale can produce.

Page layout.  vLLM allocates `num_blocks` pages; our backend views them as a
uint8 tensor of shape (get_kv_cache_shape)

    kv_cache[num_blocks, 2, num_kv_heads, block_size * (D/2 + 4)]
             block      K/V  head         one (block, K|V, head) region

and one region holds, for the block_size tokens of the block:

    bytes [0, bs*D/2)            codes[t, j] = c[t, 2j] | c[t, 2j+1] << 4
                                 (token-major; even dim in the low nibble, as
                                 the weights in vllm_qoq/format.py)
    bytes [bs*D/2, bs*(D/2+4))   sz[t] = (scale, zero) as two fp16, token-major

so a token-head costs D/2 + 4 bytes for K and the same for V: exactly the page
budget vLLM gives `int4_per_token_head` (4-bit code + fp16 scale + fp16 zero).
A token's slot is slot = block * block_size + offset (vLLM's slot_mapping);
slot -1 marks a padding token that is not written.

Attention (the paged op): for sequence b with query tokens
query[qsl[b]:qsl[b+1]] (q_len of them) and seq_lens[b] = ctx cached tokens
(the new tokens included: the cache is written before attention runs), query
token i sits at position ctx - q_len + i and attends causally to cached
positions 0..ctx - q_len + i, reading K/V *from the KV4 cache* for every
position: the prefix (prefix caching), earlier chunks (chunked prefill) and
the current chunk alike, so the result does not depend on how a prompt was
chunked.  Query head h uses KV head h // (Hq / Hkv) (GQA).
"""

from __future__ import annotations

import torch

from ..format import pack_int4, unpack_int4

SZ_BYTES = 4  # fp16 scale + fp16 zero per token-head
_RANGE_GUARD = 2.0**-10
_MIN_SCALE = 2.0**-14  # smallest normal fp16
_MAX_FP16 = 65504.0


def region_bytes(head_size: int, block_size: int) -> int:
    """Bytes of one (block, K|V, head) region: block_size * (head_size/2 + 4)."""
    return block_size * (head_size // 2 + SZ_BYTES)


def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int):
    if head_size % 2:
        raise ValueError(f"KV4 needs an even head_size (two codes per byte), got {head_size}")
    return (num_blocks, 2, num_kv_heads, region_bytes(head_size, block_size))


def block_size_of(kv_cache: torch.Tensor, head_size: int) -> int:
    per_token = head_size // 2 + SZ_BYTES
    if kv_cache.dim() != 4 or kv_cache.shape[1] != 2 or kv_cache.shape[3] % per_token:
        raise ValueError(
            f"not a KV4 cache for head_size {head_size}: shape {tuple(kv_cache.shape)}, "
            f"expected [num_blocks, 2, num_kv_heads, block_size*{per_token}]"
        )
    return kv_cache.shape[3] // per_token


def split_cache(kv_cache: torch.Tensor, head_size: int):
    """Views (codes [nb, 2, H, bs, D/2] uint8, sz [nb, 2, H, bs, 2] fp16) of a KV4 cache."""
    if kv_cache.dtype != torch.uint8:
        raise TypeError(f"KV4 cache must be uint8, got {kv_cache.dtype}")
    bs = block_size_of(kv_cache, head_size)
    nb, _, h, _ = kv_cache.shape
    ncode = bs * head_size // 2
    codes = kv_cache[..., :ncode].view(nb, 2, h, bs, head_size // 2)
    sz = kv_cache[..., ncode:].view(torch.float16).view(nb, 2, h, bs, 2)
    return codes, sz


def quantize_kv4(x: torch.Tensor):
    """x [..., D] -> (codes uint8 [..., D] in 0..15, scale fp16 [...], zero fp16 [...])."""
    xf = x.float()
    mn = xf.amin(dim=-1)
    mx = xf.amax(dim=-1)
    s32 = torch.maximum((mx - mn) / 15.0, torch.maximum(mn.abs(), mx.abs()) * _RANGE_GUARD)
    s32 = s32.clamp(min=_MIN_SCALE, max=_MAX_FP16)
    scale = s32.to(torch.float16)
    zero = (-mn / scale.float()).to(torch.float16)
    q = torch.round(xf / scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1))
    codes = q.clamp(0, 15).to(torch.uint8)
    return codes, scale, zero


def dequantize_kv4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(code - zero) * scale in fp32; codes [..., D], scale/zero [...].

    Exactly two fp32 operations, each rounded (a subtraction, then a product; never
    fused): the dequantization kernel (csrc/attention/kv4_dequant.cu) computes the
    same and then rounds once to the output dtype, so it matches bit for bit.
    """
    return (codes.float() - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)


def fake_quantize_kv4(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] after the KV4 cache's round trip (per row of D), in x's dtype (fake quant)."""
    return dequantize_kv4(*quantize_kv4(x)).to(x.dtype)


def kv4_cache_write(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Quantize key/value [T, Hkv, D] and store them at slot_mapping[T] (-1: skip)."""
    head_size = key.shape[-1]
    codes_v, sz_v = split_cache(kv_cache, head_size)
    bs = codes_v.shape[3]
    t = slot_mapping.shape[0]
    slots = slot_mapping.to(torch.long)
    valid = slots >= 0
    if not bool(valid.any()):
        return
    slots = slots[valid]
    blocks, offs = slots // bs, slots % bs
    for kv, x in ((0, key), (1, value)):
        c, s, z = quantize_kv4(x[:t][valid])
        codes_v[blocks, kv, :, offs] = pack_int4(c)
        sz_v[blocks, kv, :, offs] = torch.stack((s, z), dim=-1)


def read_kv4(
    kv_cache: torch.Tensor, block_table_row: torch.Tensor, num_tokens: int, head_size: int
):
    """Dequantized (K, V), each fp32 [num_tokens, Hkv, D], of one sequence's first tokens."""
    codes_v, sz_v = split_cache(kv_cache, head_size)
    bs = codes_v.shape[3]
    pos = torch.arange(num_tokens, device=kv_cache.device)
    blocks = block_table_row.to(torch.long)[pos // bs]
    offs = pos % bs
    out = []
    for kv in (0, 1):
        c = unpack_int4(codes_v[blocks, kv, :, offs])  # [n, H, D]
        sz = sz_v[blocks, kv, :, offs]  # [n, H, 2]
        out.append(dequantize_kv4(c, sz[..., 0], sz[..., 1]))
    return out[0], out[1]


def kv4_gather_dequant(
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_k: int,
    k_out: torch.Tensor,
    v_out: torch.Tensor,
) -> None:
    """Dense K/V of the first tokens of several sequences (the prefill workspace).

    For sequence b, tokens [0, n_b) with n_b = cu_seqlens_k[b+1] - cu_seqlens_k[b]
    are read from the pages block_table[b] and written to rows
    cu_seqlens_k[b] + t of k_out / v_out ([N, Hkv, D]) as
    out_dtype((code - zero) * scale) (fp32 math, one rounding to the output dtype).
    Rows of k_out / v_out outside [cu[0], cu[-1]) are left alone.  max_seqlen_k is a
    launch hint for the kernel (>= every n_b).
    """
    head_size = k_out.shape[-1]
    cu = cu_seqlens_k.tolist()
    for b in range(len(cu) - 1):
        n = cu[b + 1] - cu[b]
        if n <= 0:
            continue
        if n > max_seqlen_k:
            raise ValueError(f"sequence {b}: {n} tokens > max_seqlen_k {max_seqlen_k}")
        k, v = read_kv4(kv_cache, block_table[b], n, head_size)
        k_out[cu[b] : cu[b + 1]] = k.to(k_out.dtype)
        v_out[cu[b] : cu[b + 1]] = v.to(v_out.dtype)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal GQA attention over packed sequences, the mask aligned bottom-right.

    Sequence b has queries q[cu_q[b]:cu_q[b+1]] (m of them) and keys/values
    k/v[cu_k[b]:cu_k[b+1]] (n >= m): query i sits at position n - m + i and sees
    keys 0..n - m + i — what FlashAttention's varlen `causal=True` computes, and
    exactly kv4_attention's semantics once k/v are the dequantized cache.  Returns
    fp32 [total_q, Hq, D].
    """
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        m, n = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        if m <= 0:
            continue
        if n < m:
            raise ValueError(f"sequence {b}: {n} keys for {m} queries")
        out[cq[b] : cq[b + 1]] = attention(q[cq[b] : cq[b + 1]], k[ck[b] : ck[b + 1]],
                                           v[ck[b] : ck[b + 1]], scale, n - m)
    return out


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, q_offset: int
) -> torch.Tensor:
    """Causal GQA attention in fp32: q [Lq, Hq, D], k/v [Lk, Hkv, D] -> [Lq, Hq, D].

    Query i sits at position q_offset + i and sees keys 0..q_offset + i.
    """
    lq, hq, _ = q.shape
    lk, hkv, _ = k.shape
    g = hq // hkv
    kf = k.float().repeat_interleave(g, dim=1)
    vf = v.float().repeat_interleave(g, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.float(), kf) * scale
    qpos = q_offset + torch.arange(lq, device=q.device).unsqueeze(1)
    kpos = torch.arange(lk, device=q.device).unsqueeze(0)
    s = s.masked_fill((kpos > qpos).unsqueeze(0), float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("hqk,khd->qhd", p, vf)


def kv4_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    num_splits: int,
) -> None:
    """Paged causal attention over the KV4 cache; writes out[:qsl[-1]] ([T, Hq, D]).

    max_query_len / max_seq_len / num_splits are hints for the kernels (launch
    shape, split-KV); the reference reads the exact lengths from the tensors.
    """
    head_size = query.shape[-1]
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for b, ctx in enumerate(lens):
        q0, q1 = qsl[b], qsl[b + 1]
        if q1 <= q0:
            continue
        if ctx < q1 - q0:
            raise ValueError(
                f"sequence {b}: seq_len {ctx} is shorter than its {q1 - q0} query tokens"
            )
        k, v = read_kv4(kv_cache, block_table[b], ctx, head_size)
        o = attention(query[q0:q1], k, v, scale, ctx - (q1 - q0))
        out[q0:q1] = o.to(out.dtype)
