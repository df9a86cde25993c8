"""The KV4 reference (vllm_qoq/reference/kv4.py) and its ops on CPU: the spec itself."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_qoq.attention import ops
from vllm_qoq.format import unpack_int4
from vllm_qoq.reference import kv4 as ref

ops.register_ops()


def _cache(num_blocks, block_size, heads, d):
    return torch.zeros(ref.kv_cache_shape(num_blocks, block_size, heads, d), dtype=torch.uint8)


def _slots(block_row, start, n, bs):
    pos = torch.arange(start, start + n)
    return block_row.long()[pos // bs] * bs + pos % bs


# ---------------------------------------------------------------- quantizer
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_quantize_round_trip_error_is_half_a_step(dtype, d):
    torch.manual_seed(d)
    x = (torch.randn(300, d) * torch.rand(300, 1) * 8 + torch.randn(300, 1) * 3).to(dtype)
    codes, s, z = ref.quantize_kv4(x)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert s.dtype == torch.float16 and z.dtype == torch.float16
    xf = x.float()
    rng = xf.amax(-1) - xf.amin(-1)
    # scale = (max - min) / 15 rounded to fp16 (the guard does not bite here)
    torch.testing.assert_close(s.float(), (rng / 15).half().float())
    err = (ref.dequantize_kv4(codes, s, z) - xf).abs().amax(-1)
    # half a step for rounding + half a step for the fp16 zero (|zero| <= 1024) + fp16 slack
    assert bool((err <= s.float() * 1.01 + 1e-3).all())
    # the extremes are hit: min -> code near 0, max -> code near 15
    assert int(codes.amin(-1).max()) <= 1 and int(codes.amax(-1).min()) >= 14


def test_quantize_guards_constant_and_zero_vectors():
    x = torch.stack([torch.full((64,), 5.0), torch.zeros(64), torch.full((64,), -1e-3),
                     torch.full((64,), 6e4)])
    codes, s, z = ref.quantize_kv4(x)
    assert torch.isfinite(s.float()).all() and torch.isfinite(z.float()).all()
    assert bool((s.float() >= 2.0**-14).all())
    xh = ref.dequantize_kv4(codes, s, z)
    rel = (xh - x).abs() / x.abs().clamp(min=1e-3)
    assert float(rel.max()) <= 2.0**-10  # |zero| <= 1024 keeps the constant exact to fp16 steps
    assert bool((z.float().abs() <= 1024).all())


def test_quantize_tiny_range_on_large_offset_keeps_zero_representable():
    x = 100.0 + torch.linspace(0, 0.05, 128).unsqueeze(0)
    codes, s, z = ref.quantize_kv4(x)
    assert float(z.float().abs().max()) <= 1024
    assert float((ref.dequantize_kv4(codes, s, z) - x).abs().max()) <= float(s.float()) * 1.01


def test_codes_stay_in_range_where_fp16_zero_rounding_is_coarsest():
    # offsets that put |zero| between 512 and 1024, where fp16 zero steps are 0.5
    torch.manual_seed(1)
    base = torch.randn(2000, 1) * 50
    x = base + torch.rand(2000, 128) * base.abs() / 600
    codes, s, z = ref.quantize_kv4(x)
    assert float(z.float().abs().max()) > 512
    assert int(codes.max()) <= 15
    err = (ref.dequantize_kv4(codes, s, z) - x).abs().amax(-1)
    assert bool((err <= 0.76 * s.float() + 1e-6).all())  # half a step + the zero's quarter step


# ---------------------------------------------------------------- page layout
def test_layout_bytes_of_one_token_head():
    d, bs, heads = 64, 16, 3
    kv = _cache(4, bs, heads, d)
    key = torch.randn(1, heads, d)
    val = torch.randn(1, heads, d)
    block, off, head = 2, 5, 1
    ref.kv4_cache_write(key, val, kv, torch.tensor([block * bs + off]))
    for side, x in ((0, key), (1, val)):
        region = kv[block, side, head]
        codes, s, z = ref.quantize_kv4(x[0, head])
        packed = region[off * d // 2 : (off + 1) * d // 2]
        assert torch.equal(unpack_int4(packed), codes)
        assert torch.equal(packed, codes[0::2] | (codes[1::2] << 4))  # even dim low nibble
        sz = region[bs * d // 2 + 4 * off : bs * d // 2 + 4 * off + 4].view(torch.float16)
        assert torch.equal(sz, torch.stack((s, z)))
    # nothing else was written
    mask = torch.ones_like(kv, dtype=torch.bool)
    for side in (0, 1):
        mask[block, side, head, off * d // 2 : (off + 1) * d // 2] = False
        mask[block, side, head, bs * d // 2 + 4 * off : bs * d // 2 + 4 * off + 4] = False
    written = kv.clone()
    written[~mask] = 0
    others = [h for h in range(heads) if h != head]
    assert int(written[block][:, others].count_nonzero()) > 0  # other heads of the token
    assert int(written[[b for b in range(4) if b != block]].count_nonzero()) == 0


def test_page_budget_matches_vllm_int4_per_token_head():
    # vLLM budgets head_size/2 + 4 bytes per token-head for K and again for V
    for d, bs, h in ((64, 16, 2), (128, 32, 8), (256, 16, 1)):
        shape = ref.kv_cache_shape(10, bs, h, d)
        assert math.prod(shape[1:]) == bs * h * 2 * (d // 2 + 4)


def test_padding_slots_are_skipped_and_round_trip():
    d, bs, h = 128, 16, 2
    kv = _cache(6, bs, h, d)
    row = torch.tensor([4, 1, 3], dtype=torch.int32)
    k = torch.randn(40, h, d, dtype=torch.float16)
    v = torch.randn(40, h, d, dtype=torch.float16)
    slots = _slots(row, 0, 40, bs)
    padded = torch.cat([slots, torch.full((5,), -1)])
    kp = torch.cat([k, torch.randn(5, h, d, dtype=torch.float16)])
    vp = torch.cat([v, torch.randn(5, h, d, dtype=torch.float16)])
    ops.kv4_cache_write(kp, vp, kv, padded)
    kk, vv = ref.read_kv4(kv, row, 40, d)
    for got, x in ((kk, k), (vv, v)):
        c, s, z = ref.quantize_kv4(x)
        torch.testing.assert_close(got, ref.dequantize_kv4(c, s, z), rtol=0, atol=0)
    # blocks outside the row were not touched by the padding tokens
    assert int(kv[[0, 2, 5]].count_nonzero()) == 0


# ---------------------------------------------------------------- attention
def _sdpa(q, k, v, scale, q_offset):
    """Independent float reference: torch SDPA with an explicit bool mask."""
    lq, hq, d = q.shape
    lk, hkv, _ = k.shape
    g = hq // hkv
    qq = q.float().permute(1, 0, 2)
    kk = k.float().repeat_interleave(g, 1).permute(1, 0, 2)
    vv = v.float().repeat_interleave(g, 1).permute(1, 0, 2)
    mask = torch.arange(lk)[None, :] <= (q_offset + torch.arange(lq))[:, None]
    o = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale)
    return o.permute(1, 0, 2)


def _batch(specs, hq, hkv, d, bs, dtype, seed=0):
    """specs: list of (ctx_len, q_len).  Writes all ctx tokens; returns tensors + float K/V."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(math.ceil(c / bs) for c, _ in specs) + 1
    nb = len(specs) * max_blocks + 3
    perm = torch.randperm(nb, generator=g)
    kv = _cache(nb, bs, hkv, d)
    table = torch.zeros(len(specs), max_blocks, dtype=torch.int32)
    qs, qsl, kvs = [], [0], []
    for i, (ctx, ql) in enumerate(specs):
        table[i] = perm[i * max_blocks : (i + 1) * max_blocks].to(torch.int32)
        k = (torch.randn(ctx, hkv, d, generator=g) * 2 + torch.randn(1, hkv, d, generator=g))
        v = torch.randn(ctx, hkv, d, generator=g)
        ref.kv4_cache_write(k.to(dtype), v.to(dtype), kv, _slots(table[i], 0, ctx, bs))
        kvs.append(ref.read_kv4(kv, table[i], ctx, d))
        qs.append(torch.randn(ql, hq, d, generator=g).to(dtype))
        qsl.append(qsl[-1] + ql)
    q = torch.cat(qs)
    seq_lens = torch.tensor([c for c, _ in specs], dtype=torch.int32)
    return q, kv, table, seq_lens, torch.tensor(qsl, dtype=torch.int32), kvs


@pytest.mark.parametrize(
    "hq,hkv,d,bs,dtype",
    [(4, 2, 64, 16, torch.float16), (8, 8, 128, 32, torch.bfloat16),
     (12, 2, 128, 16, torch.float32), (4, 1, 256, 128, torch.float16)],
)
def test_attention_matches_sdpa_on_dequantized_kv(hq, hkv, d, bs, dtype):
    # decodes, partial pages, a chunk over a prefix, a whole prompt, an empty row
    specs = [(1, 1), (17, 1), (bs, 1), (bs + 1, 5), (3 * bs - 2, 3 * bs - 2), (40, 0)]
    q, kv, table, seq_lens, qsl, kvs = _batch(specs, hq, hkv, d, bs, dtype)
    out = torch.full_like(q, float("nan"))
    scale = d**-0.5
    ops.kv4_attention(out, q, kv, table, seq_lens, qsl, int(max(s[1] for s in specs)),
                      int(seq_lens.max()), scale, 0)
    for i, (ctx, ql) in enumerate(specs):
        if ql == 0:
            continue
        k, v = kvs[i]
        want = _sdpa(q[qsl[i] : qsl[i + 1]], k, v, scale, ctx - ql)
        torch.testing.assert_close(out[qsl[i] : qsl[i + 1]].float(), want,
                                   rtol=1e-2, atol=2e-2 if dtype != torch.float32 else 1e-4)


def test_chunked_prefill_equals_one_shot_prefill():
    """Chunks attend to the KV4 cache, so chunking never changes the result."""
    hq, hkv, d, bs, L = 8, 2, 64, 16, 70
    torch.manual_seed(3)
    k = torch.randn(L, hkv, d, dtype=torch.float16)
    v = torch.randn(L, hkv, d, dtype=torch.float16)
    q = torch.randn(L, hq, d, dtype=torch.float16)
    row = torch.tensor([[2, 0, 5, 1, 4]], dtype=torch.int32)
    outs = []
    for chunks in ([L], [20, 30, 20], [1] * L):
        kv = _cache(6, bs, hkv, d)
        out = torch.empty_like(q)
        start = 0
        for n in chunks:
            sl = slice(start, start + n)
            ops.kv4_cache_write(k[sl], v[sl], kv, _slots(row[0], start, n, bs))
            ops.kv4_attention(out[sl], q[sl], kv, row, torch.tensor([start + n], dtype=torch.int32),
                              torch.tensor([0, n], dtype=torch.int32), n, start + n, 0.125, 0)
            start += n
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=2e-3)
    torch.testing.assert_close(outs[2], outs[0], rtol=0, atol=2e-3)


def test_prefix_cached_pages_are_shared_between_sequences():
    """Two sequences whose block tables share the prefix pages see the same prefix."""
    hq, hkv, d, bs = 4, 2, 64, 16
    torch.manual_seed(4)
    kv = _cache(8, bs, hkv, d)
    prefix_k, prefix_v = torch.randn(32, hkv, d), torch.randn(32, hkv, d)
    table = torch.tensor([[5, 2, 7], [5, 2, 0]], dtype=torch.int32)
    ops.kv4_cache_write(prefix_k, prefix_v, kv, _slots(table[0], 0, 32, bs))
    tails = []
    for i, blk in ((0, 7), (1, 0)):
        tk, tv = torch.randn(4, hkv, d), torch.randn(4, hkv, d)
        ops.kv4_cache_write(tk, tv, kv, _slots(table[i], 32, 4, bs))
        tails.append((tk, tv))
    q = torch.randn(8, hq, d)
    out = torch.empty_like(q)
    ops.kv4_attention(out, q, kv, table, torch.tensor([36, 36], dtype=torch.int32),
                      torch.tensor([0, 4, 8], dtype=torch.int32), 4, 36, 0.125, 0)
    for i in range(2):
        k = torch.cat([prefix_k, tails[i][0]])
        v = torch.cat([prefix_v, tails[i][1]])
        deq = [ref.dequantize_kv4(*ref.quantize_kv4(x)) for x in (k, v)]
        torch.testing.assert_close(out[4 * i : 4 * i + 4], _sdpa(q[4 * i : 4 * i + 4], *deq, 0.125, 32),
                                   rtol=1e-4, atol=1e-4)


def test_bad_cache_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="not a KV4 cache"):
        ref.split_cache(torch.zeros(2, 2, 2, 100, dtype=torch.uint8), 64)
    with pytest.raises(ValueError, match="seq_len"):
        q = torch.randn(3, 2, 64)
        ref.kv4_attention(torch.empty_like(q), q, _cache(2, 16, 2, 64), torch.zeros(1, 2, dtype=torch.int32),
                          torch.tensor([2], dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32),
                          3, 2, 1.0, 0)
