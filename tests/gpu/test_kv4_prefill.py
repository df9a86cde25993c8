"""The KV4 prefill path on the GPU: gather + dequantize kernel, FlashAttention varlen.

* `kv4_gather_dequant` is bit-exact against the reference (head_dim 64/128/256,
  block sizes 16/32, partial pages, many sequences, fp16/bf16, arbitrary finite
  scales and zeros);
* vLLM's FlashAttention varlen with causal=True aligns the mask bottom-right
  (seqlen_q < seqlen_k), which is our semantics;
* the backend's split execution (decodes on the fused kernel, prefill groups as
  gather + FA varlen, over-cap requests fused) and the builder + impl forward
  equal the reference kv4_attention over mixed and chunked-prefill batches.

Tests that need vLLM's FlashAttention skip when `vllm.vllm_flash_attn` is not
importable.  QOQ_KV4_LIB=/path/lib.so loads a separately built kernel library first
(python -m vllm_qoq.attention.build).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from kv4_common import DEV, GPU_ONLY, _kernels, ops, ref  # noqa: F401  (_kernels: autouse fixture)

pytestmark = GPU_ONLY


def _fa():
    pytest.importorskip("vllm.vllm_flash_attn")
    from vllm_qoq import compat

    fa = compat.flash_attn_varlen()
    if fa is None:
        pytest.skip("vLLM's FlashAttention does not support this GPU")
    return fa


def _slots(row, start, n, bs):
    pos = torch.arange(start, start + n, device=row.device)
    return row.long()[pos // bs] * bs + pos % bs


def _tables(lens, bs, g):
    max_blocks = max(math.ceil(n / bs) for n in lens) + 1
    nb = len(lens) * max_blocks + 3
    perm = torch.randperm(nb, device=DEV, generator=g).to(torch.int32)
    return perm[: len(lens) * max_blocks].view(len(lens), max_blocks).contiguous(), nb


# ------------------------------------------------------------------ gather + dequantize
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d,bs,hkv", [(64, 16, 2), (128, 16, 8), (128, 32, 1), (256, 16, 4), (256, 32, 3)])
def test_gather_dequant_is_bit_exact_on_arbitrary_pages(dtype, d, bs, hkv):
    g = torch.Generator(device=DEV).manual_seed(d * bs + hkv)
    lens = [1, 2, bs - 1, bs, bs + 1, 3 * bs + 7, 600] + torch.randint(1, 300, (60,), generator=g,
                                                                        device=DEV).tolist()
    table, nb = _tables(lens, bs, g)
    cache = torch.randint(0, 256, ref.kv_cache_shape(nb, bs, hkv, d), dtype=torch.uint8, device=DEV,
                          generator=g)
    sz = ref.split_cache(cache, d)[1]  # every (scale, zero) finite: scale in ~[1e-4, 60], |zero| <= 1024
    sz[..., 0] = torch.exp(torch.rand(sz.shape[:-1], device=DEV, generator=g) * 13 - 9).half()
    sz[..., 1] = ((torch.rand(sz.shape[:-1], device=DEV, generator=g) - 0.5) * 2048).half()
    sz[0, 0, 0, 0, 1] = 1024.0
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    total = int(cu[-1])
    got_k = torch.full((total + 8, hkv, d), 3.0, dtype=dtype, device=DEV)
    got_v = got_k.clone()
    want_k, want_v = got_k.clone(), got_v.clone()
    ops.kv4_gather_dequant(cache, table, cu, max(lens) + 5, got_k, got_v)  # the hint may exceed
    ref.kv4_gather_dequant(cache, table, cu, max(lens), want_k, want_v)
    torch.cuda.synchronize()
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    assert bool((got_k[total:] == 3).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gather_dequant_of_written_kv_is_bit_exact(dtype, d):
    """K/V written by the cache-write kernel, gathered for a group of sequences."""
    g = torch.Generator(device=DEV).manual_seed(d)
    hkv, bs = 4, 16
    lens = [1000, 17, 1, 256, 333]
    table, nb = _tables(lens, bs, g)
    cache = torch.randint(0, 256, ref.kv_cache_shape(nb, bs, hkv, d), dtype=torch.uint8, device=DEV,
                          generator=g)
    for i, n in enumerate(lens):
        k = (torch.randn(n, hkv, d, device=DEV, generator=g) * 4).to(dtype)
        v = torch.randn(n, hkv, d, device=DEV, generator=g).to(dtype)
        ops.kv4_cache_write(k, v, cache, _slots(table[i], 0, n, bs))
    # a sub-batch: rows 1..4 of the block table
    sub = lens[1:]
    cu = torch.tensor([0, *torch.tensor(sub).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    got = [torch.empty(int(cu[-1]), hkv, d, dtype=dtype, device=DEV) for _ in range(2)]
    want = [torch.empty_like(got[0]) for _ in range(2)]
    ops.kv4_gather_dequant(cache, table[1:], cu, max(sub), *got)
    ref.kv4_gather_dequant(cache, table[1:], cu, max(sub), *want)
    torch.cuda.synchronize()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_gather_dequant_checks_its_arguments():
    cache = torch.zeros(ref.kv_cache_shape(4, 16, 2, 128), dtype=torch.uint8, device=DEV)
    table = torch.zeros(1, 4, dtype=torch.int32, device=DEV)
    cu = torch.tensor([0, 10], dtype=torch.int32, device=DEV)
    out = torch.empty(10, 2, 128, dtype=torch.bfloat16, device=DEV)
    with pytest.raises(ValueError, match="exceeds the block table"):
        ops.kv4_gather_dequant(cache, table, cu, 65, out, out.clone())
    with pytest.raises(ValueError, match="KV heads"):
        bad = torch.empty(10, 3, 128, dtype=torch.bfloat16, device=DEV)
        ops.kv4_gather_dequant(cache, table, cu, 10, bad, bad.clone())


# ------------------------------------------------------------------ FlashAttention alignment
@pytest.mark.parametrize("d", [64, 128])
def test_flash_attn_causal_is_bottom_right_aligned(d):
    fa, version = _fa()
    g = torch.Generator(device=DEV).manual_seed(d)
    hq, hkv = 8, 2
    pairs = [(5, 300), (1, 64), (128, 128), (77, 1000)]  # (q_len, k_len)
    cu_q = torch.tensor([0, *torch.tensor([m for m, _ in pairs]).cumsum(0).tolist()], dtype=torch.int32,
                        device=DEV)
    cu_k = torch.tensor([0, *torch.tensor([n for _, n in pairs]).cumsum(0).tolist()], dtype=torch.int32,
                        device=DEV)
    q = torch.randn(int(cu_q[-1]), hq, d, device=DEV, generator=g).to(torch.bfloat16)
    k = torch.randn(int(cu_k[-1]), hkv, d, device=DEV, generator=g).to(torch.bfloat16)
    v = torch.randn(int(cu_k[-1]), hkv, d, device=DEV, generator=g).to(torch.bfloat16)
    out = torch.empty_like(q)
    fa(q, k, v, max_seqlen_q=128, cu_seqlens_q=cu_q, max_seqlen_k=1000, cu_seqlens_k=cu_k,
       softmax_scale=d**-0.5, causal=True, out=out, fa_version=version)
    want = ref.varlen_attention(q, k, v, cu_q, cu_k, d**-0.5)
    torch.cuda.synchronize()
    assert float((out.float() - want).abs().max()) < 2e-2


# ------------------------------------------------------------------ the split path
def _make(specs, hq, hkv, d, bs, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    lens = [c for c, _ in specs]
    table, nb = _tables(lens, bs, g)
    cache = torch.randint(0, 256, ref.kv_cache_shape(nb, bs, hkv, d), dtype=torch.uint8, device=DEV,
                          generator=g)
    qs, qsl = [], [0]
    for i, (ctx, ql) in enumerate(specs):
        k = torch.randn(ctx, hkv, d, device=DEV, generator=g) * 2
        k += torch.randn(1, hkv, d, device=DEV, generator=g) * 3
        v = torch.randn(ctx, hkv, d, device=DEV, generator=g)
        ops.kv4_cache_write(k.to(dtype), v.to(dtype), cache, _slots(table[i], 0, ctx, bs))
        qs.append(torch.randn(ql, hq, d, device=DEV, generator=g).to(dtype))
        qsl.append(qsl[-1] + ql)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    return torch.cat(qs), cache, table, seq_lens, torch.tensor(qsl, dtype=torch.int32, device=DEV)


def _want(q, cache, table, seq_lens, qsl, scale):
    want = torch.empty(q.shape, dtype=torch.float32, device=DEV)
    ref.kv4_attention(want, q, cache, table, seq_lens, qsl, 1, 1, scale, 0)
    return want


def _assert_close(got, want, dtype):
    torch.cuda.synchronize()
    tol = 1.5e-2 if dtype == torch.bfloat16 else 4e-3
    assert torch.isfinite(got).all()
    err = float((got.float() - want).abs().max())
    assert err <= tol + tol * float(want.abs().max()), err


MIXED = [(1, 1), (15, 1), (4097, 1), (100, 1),  # decodes first
         (300, 300), (1000, 137), (64, 16), (2049, 512), (777, 512), (33, 2)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d,bs", [(32, 8, 128, 16), (12, 2, 64, 32), (8, 8, 128, 64), (14, 2, 64, 16)])
@pytest.mark.parametrize("cap", [32768, 1500])
def test_split_path_matches_the_reference(dtype, hq, hkv, d, bs, cap):
    fa = _fa()  # skips without vLLM's FlashAttention, before the backend imports vLLM
    from vllm_qoq.attention import backend as kb

    q, cache, table, seq_lens, qsl = _make(MIXED, hq, hkv, d, bs, dtype, seed=hq + d)
    scale = d**-0.5
    plan = kb.plan_split(qsl.tolist(), seq_lens.tolist(), 4, cap)
    assert plan.groups and (cap > 4097 or plan.fused)
    plan = kb.materialize(plan, DEV)

    def ws(rows):
        assert rows <= cap
        return kb.Workspace.get(rows, hkv, d, dtype, q.device, cap)

    got = torch.full_like(q, float("nan"))
    kb.run_split(plan, got, q, cache, table, seq_lens, qsl, int(seq_lens.max()), scale, ws,
                 kb.flash_attn_varlen_runner(*fa))
    _assert_close(got, _want(q, cache, table, seq_lens, qsl, scale), dtype)


def test_chunked_prefill_over_a_kv4_prefix_equals_one_shot():
    """A 3000-token prompt in one step vs in chunks of 1024, both on the prefill path."""
    raw = _fa()  # skips without vLLM's FlashAttention, before the backend imports vLLM
    from vllm_qoq.attention import backend as kb

    fa = kb.flash_attn_varlen_runner(*raw)
    hq, hkv, d, bs, dtype, n = 16, 4, 128, 16, torch.bfloat16, 3000
    q, cache, table, seq_lens, _ = _make([(n, n)], hq, hkv, d, bs, dtype, seed=7)
    scale = d**-0.5

    def ws(rows):
        return kb.Workspace.get(rows, hkv, d, dtype, q.device, 1 << 20)

    def step(t0, t1):
        qsl = torch.tensor([0, t1 - t0], dtype=torch.int32, device=DEV)
        lens = torch.tensor([t1], dtype=torch.int32, device=DEV)
        plan = kb.materialize(kb.plan_split([0, t1 - t0], [t1], 0, 1 << 20), DEV)
        out = torch.empty_like(q[t0:t1])
        kb.run_split(plan, out, q[t0:t1].contiguous(), cache, table, lens, qsl, t1, scale, ws, fa)
        return out

    one = step(0, n)
    chunked = torch.cat([step(a, min(a + 1024, n)) for a in range(0, n, 1024)])
    torch.cuda.synchronize()
    assert float((one.float() - chunked.float()).abs().max()) <= 1e-2
    qsl = torch.tensor([0, n], dtype=torch.int32, device=DEV)
    _assert_close(one, _want(q, cache, table, seq_lens, qsl, scale), dtype)


def test_backend_forward_on_a_mixed_batch():
    """Builder (host copies only) + impl.forward: decodes fused, prefills gather + FA, one over the cap."""
    pytest.importorskip("vllm")
    from vllm_qoq import compat
    from vllm_qoq.attention import backend as kb

    fa = _fa()
    hq, hkv, d, bs, dtype = 32, 8, 128, 16, torch.bfloat16
    q, cache, table, seq_lens, qsl = _make(MIXED, hq, hkv, d, bs, dtype, seed=3)
    builder = object.__new__(kb.QoQKV4MetadataBuilder)
    builder.reorder_batch_threshold = 1
    builder._cap, builder._varlen = 2048, kb.flash_attn_varlen_runner(*fa)
    builder._max_model_len, builder.device = 8192, torch.device(DEV)
    qsl_cpu, lens_cpu = qsl.cpu(), seq_lens.cpu()
    n = int(qsl_cpu[-1])
    cam = SimpleNamespace(
        num_reqs=len(MIXED), num_actual_tokens=n, max_query_len=512, max_seq_len=int(lens_cpu.max()),
        query_start_loc=qsl, query_start_loc_cpu=qsl_cpu, seq_lens=seq_lens, block_table_tensor=table,
        slot_mapping=torch.zeros(n, dtype=torch.long, device=DEV), seq_lens_cpu_upper_bound=lens_cpu,
        _seq_lens_cpu=None, is_prefilling=None, causal=True)
    md = builder.build(0, cam)
    assert md.split is not None and md.split.num_decodes == 4
    assert md.split.fused and md.split.groups  # 4097 > cap: fused
    impl = kb.QoQKV4AttentionImpl(hq, d, d**-0.5, hkv, kv_cache_dtype=compat.KV4_CACHE_DTYPE)
    output = torch.full((n + 16, hq * d), float("nan"), dtype=dtype, device=DEV)
    impl.forward(None, q.reshape(n, -1), None, None, cache, md, output=output)
    _assert_close(output[:n].view(n, hq, d), _want(q, cache, table, seq_lens, qsl, d**-0.5), dtype)
    assert bool(output[n:].isnan().all())
