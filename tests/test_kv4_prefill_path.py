"""The KV4 prefill path on CPU: gather + dequantize, the decode-first split, grouping.

The CUDA path runs decodes on the fused kernel and prefill groups as
`kv4_gather_dequant` + FlashAttention varlen (causal, bottom-right aligned).
Here the same plan/execution code (backend.plan_split / run_split) runs with the
reference ops and a reference varlen attention in place of FlashAttention, and must
equal the reference kv4_attention over the whole batch.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm_qoq.attention import backend as kb  # noqa: E402
from vllm_qoq.attention import ops  # noqa: E402
from vllm_qoq.format import unpack_int4  # noqa: E402
from vllm_qoq.reference import kv4 as ref  # noqa: E402

ops.register_ops()


def _slots(row, start, n, bs):
    pos = torch.arange(start, start + n)
    return row.long()[pos // bs] * bs + pos % bs


def _batch(specs, hq, hkv, d, bs, dtype, seed=0):
    """specs: [(seq_len, q_len)] -> q, cache (stale bytes in unused slots), table, lens, qsl."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(math.ceil(c / bs) for c, _ in specs) + 1
    nb = len(specs) * max_blocks + 1
    perm = torch.randperm(nb, generator=g).to(torch.int32)
    cache = torch.randint(0, 256, ref.kv_cache_shape(nb, bs, hkv, d), dtype=torch.uint8, generator=g)
    table = torch.zeros(len(specs), max_blocks, dtype=torch.int32)
    qs, qsl = [], [0]
    for i, (ctx, ql) in enumerate(specs):
        table[i] = perm[i * max_blocks : (i + 1) * max_blocks]
        k = torch.randn(ctx, hkv, d, generator=g) * 2 + torch.randn(1, hkv, d, generator=g) * 3
        v = torch.randn(ctx, hkv, d, generator=g)
        ref.kv4_cache_write(k.to(dtype), v.to(dtype), cache, _slots(table[i], 0, ctx, bs))
        qs.append(torch.randn(ql, hq, d, generator=g).to(dtype))
        qsl.append(qsl[-1] + ql)
    seq_lens = torch.tensor([c for c, _ in specs], dtype=torch.int32)
    return torch.cat(qs), cache, table, seq_lens, torch.tensor(qsl, dtype=torch.int32)


def _ref_varlen(q, k, v, out, cu_q, cu_k, max_q, max_k, scale):
    assert int(cu_k[-1]) == k.shape[0] and int(cu_q[-1]) == q.shape[0]
    assert max_k >= int((cu_k[1:] - cu_k[:-1]).max()) and max_q >= int((cu_q[1:] - cu_q[:-1]).max())
    out.copy_(ref.varlen_attention(q, k, v, cu_q, cu_k, scale).to(out.dtype))


def _top_left_varlen(q, k, v, out, cu_q, cu_k, max_q, max_k, scale):
    """The wrong alignment (query i sees keys 0..i): must NOT match our semantics."""
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        o = ref.attention(q[cq[b] : cq[b + 1]], k[ck[b] : ck[b + 1]], v[ck[b] : ck[b + 1]], scale, 0)
        out[cq[b] : cq[b + 1]] = o.to(out.dtype)


def _fresh_workspace(hkv, d, dtype, seen):
    def ws(rows):
        seen.append(rows)
        buf = torch.full((2, rows, hkv, d), float("nan"), dtype=dtype)
        return buf[0], buf[1]

    return ws


def _num_decodes(qsl, threshold=1):
    n = 0
    while n + 1 < len(qsl) and qsl[n + 1] - qsl[n] <= threshold:
        n += 1
    return n


# ---------------------------------------------------------------- gather + dequantize
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d,bs", [(64, 16), (128, 32), (256, 16)])
def test_gather_dequant_is_the_rounded_dequantization(dtype, d, bs):
    hkv = 3
    specs = [(1, 1), (bs, 1), (bs + 5, 1), (3 * bs - 1, 1)]
    _, cache, table, seq_lens, _ = _batch(specs, hkv, hkv, d, bs, torch.float32, seed=d + bs)
    cu = torch.tensor([0, *torch.cumsum(seq_lens, 0).tolist()], dtype=torch.int32)
    total = int(cu[-1])
    k = torch.full((total + 3, hkv, d), 7.0, dtype=dtype)  # 3 rows past the end: untouched
    v = k.clone()
    ops.kv4_gather_dequant(cache, table, cu, int(seq_lens.max()), k, v)
    assert bool((k[total:] == 7).all()) and bool((v[total:] == 7).all())
    codes, sz = ref.split_cache(cache, d)
    for b, n in enumerate(seq_lens.tolist()):
        for t in (0, n // 2, n - 1):
            blk, off = int(table[b, t // bs]), t % bs
            for side, got in ((0, k), (1, v)):
                c = unpack_int4(codes[blk, side, :, off]).float()  # [H, D]
                s, z = sz[blk, side, :, off, 0].float(), sz[blk, side, :, off, 1].float()
                want = ((c - z[:, None]) * s[:, None]).to(dtype)
                assert torch.equal(got[int(cu[b]) + t], want)


def test_gather_dequant_rejects_a_too_small_hint():
    _, cache, table, seq_lens, _ = _batch([(40, 1)], 2, 2, 64, 16, torch.float32)
    k = torch.empty(40, 2, 64)
    with pytest.raises(ValueError, match="max_seqlen_k"):
        ops.kv4_gather_dequant(cache, table, torch.tensor([0, 40], dtype=torch.int32), 39, k, k.clone())


# ---------------------------------------------------------------- the plan
def test_plan_groups_under_the_cap_and_sends_long_requests_to_the_fused_kernel():
    # 2 decodes, then prefills with seq_lens 40, 30, 100 (> cap), 120 (> cap), 20, 65,
    # a padding request (no tokens), 10
    qlens = [1, 1, 10, 30, 5, 7, 20, 3, 0, 4]
    lens = [9, 500, 40, 30, 100, 120, 20, 65, 0, 10]
    qsl = [0]
    for q in qlens:
        qsl.append(qsl[-1] + q)
    plan = kb.plan_split(qsl, lens, 2, cap_tokens=80)
    assert (plan.num_decodes, plan.num_decode_tokens, plan.max_decode_query_len) == (2, 2, 1)
    got = [(g.req_start, g.req_end, g.tok_start, g.tok_end, g.num_k, g.max_seqlen_q, g.max_seqlen_k,
            g.cu_seqlens_q, g.cu_seqlens_k) for g in plan.groups]
    assert got == [
        (2, 4, 2, 42, 70, 30, 40, [0, 10, 40], [0, 40, 70]),
        (6, 7, 54, 74, 20, 20, 20, [0, 20], [0, 20]),  # 20 + 65 > 80: a new group
        (7, 8, 74, 77, 65, 3, 65, [0, 3], [0, 65]),
        (9, 10, 77, 81, 10, 4, 10, [0, 4], [0, 10]),  # the padding request ends a group
    ]
    assert [(r.req_start, r.req_end, r.tok_start, r.tok_end, r.max_seqlen_q, r.max_seqlen_k,
             r.query_start_loc) for r in plan.fused] == [(4, 6, 42, 54, 7, 120, [0, 5, 12])]
    # every query token of the batch is covered exactly once
    covered = [0] * qsl[-1]
    for a, b in [(0, plan.num_decode_tokens)] + [(g.tok_start, g.tok_end) for g in plan.groups] + \
            [(r.tok_start, r.tok_end) for r in plan.fused]:
        for t in range(a, b):
            covered[t] += 1
    assert covered == [1] * qsl[-1]


def test_plan_refuses_inconsistent_lengths():
    with pytest.raises(ValueError, match="shorter"):
        kb.plan_split([0, 10], [5], 0, 100)


def test_prefill_mode_knob(monkeypatch):
    monkeypatch.delenv(kb.PREFILL_ENV, raising=False)
    assert kb.prefill_mode() == "auto"
    monkeypatch.setenv(kb.PREFILL_ENV, "fused")
    assert kb.prefill_mode() == "fused"
    monkeypatch.setenv(kb.PREFILL_ENV, "fast")
    with pytest.raises(ValueError, match=kb.PREFILL_ENV):
        kb.prefill_mode()
    monkeypatch.delenv(kb.WORKSPACE_ENV, raising=False)
    assert kb.workspace_tokens(8192) == kb.MIN_WORKSPACE_TOKENS
    assert kb.workspace_tokens(65536) == 65536
    monkeypatch.setenv(kb.WORKSPACE_ENV, "100")
    assert kb.workspace_tokens(65536) == 100


# ---------------------------------------------------------------- split execution == reference
MIXED = [  # (seq_len incl. this step, query tokens), decodes first
    (1, 1), (17, 1), (300, 1), (64, 1),
    (300, 300),  # a fresh prompt
    (1000, 137),  # a chunk behind a 863-token KV4 prefix (prefix hit / earlier chunks)
    (64, 16),  # a chunk on a page boundary
    (777, 512),  # a chunk ending mid-page
    (33, 2),  # a two-token extend
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d,bs", [(8, 2, 128, 16), (6, 6, 64, 32), (12, 2, 64, 16)])
@pytest.mark.parametrize("cap", [4096, 800, 310])
def test_split_equals_reference_attention(dtype, hq, hkv, d, bs, cap):
    q, cache, table, seq_lens, qsl = _batch(MIXED, hq, hkv, d, bs, dtype, seed=hq + d + cap)
    scale = d**-0.5
    qsl_l = qsl.tolist()
    plan = kb.plan_split(qsl_l, seq_lens.tolist(), _num_decodes(qsl_l), cap)
    assert plan.num_decodes == 4
    if cap < 1000:
        assert plan.fused, "a request over the cap must take the fused kernel"
    if cap == 310:
        assert len(plan.groups) >= 3
    plan = kb.materialize(plan, "cpu")
    rows = []
    got = torch.full_like(q, float("nan"))
    kb.run_split(plan, got, q, cache, table, seq_lens, qsl, int(seq_lens.max()), scale,
                 _fresh_workspace(hkv, d, dtype, rows), _ref_varlen)
    assert rows and max(rows) <= cap
    want = torch.empty(q.shape, dtype=torch.float32)
    ref.kv4_attention(want, q, cache, table, seq_lens, qsl, int((qsl[1:] - qsl[:-1]).max()),
                      int(seq_lens.max()), scale, 0)
    assert torch.isfinite(got).all()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # dense K/V rounded to bf16 before the attention
        err = (got.float() - want).abs().max()
        assert float(err) <= 1.5e-2 * (1 + float(want.abs().max())), float(err)


def test_top_left_causal_alignment_would_be_caught():
    q, cache, table, seq_lens, qsl = _batch(MIXED, 4, 2, 64, 16, torch.float32, seed=3)
    plan = kb.materialize(kb.plan_split(qsl.tolist(), seq_lens.tolist(), 4, 4096), "cpu")
    got = torch.zeros_like(q)
    kb.run_split(plan, got, q, cache, table, seq_lens, qsl, int(seq_lens.max()), 0.125,
                 _fresh_workspace(2, 64, torch.float32, []), _top_left_varlen)
    want = torch.empty(q.shape, dtype=torch.float32)
    ref.kv4_attention(want, q, cache, table, seq_lens, qsl, 512, 1000, 0.125, 0)
    t0 = plan.num_decode_tokens + 300  # the chunk behind a prefix
    assert float((got[t0:] - want[t0:]).abs().max()) > 1e-2
    # the fresh prompt (seq_len == query tokens) is the same under both alignments
    torch.testing.assert_close(got[4:304], want[4:304], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- through the backend
def _builder(cap, varlen):
    b = object.__new__(kb.QoQKV4MetadataBuilder)
    b.reorder_batch_threshold = 1
    b._cap, b._varlen, b._max_model_len, b.device = cap, varlen, 4096, torch.device("cpu")
    return b


def _cam(qsl, seq_lens, table, upper=True):
    qlens = qsl[1:] - qsl[:-1]
    return SimpleNamespace(
        num_reqs=len(seq_lens), num_actual_tokens=int(qsl[-1]), max_query_len=int(qlens.max()),
        max_seq_len=int(seq_lens.max()), query_start_loc=qsl, query_start_loc_cpu=qsl,
        seq_lens=seq_lens, block_table_tensor=table, slot_mapping=torch.zeros(int(qsl[-1]), dtype=torch.long),
        seq_lens_cpu_upper_bound=seq_lens.clone() if upper else None, _seq_lens_cpu=None,
        is_prefilling=None, causal=True)


def test_builder_and_impl_run_the_split_from_host_copies():
    hq, hkv, d, bs = 8, 2, 64, 16
    q, cache, table, seq_lens, qsl = _batch(MIXED, hq, hkv, d, bs, torch.float32, seed=11)
    builder = _builder(400, _ref_varlen)
    md = builder.build(0, _cam(qsl, seq_lens, table))
    assert md.split is not None and md.split.num_decodes == 4 and md.split.fused and md.split.groups
    assert md.split.varlen is _ref_varlen and md.workspace_tokens == 400
    impl = kb.QoQKV4AttentionImpl(hq, d, d**-0.5, hkv, kv_cache_dtype=kb.compat.KV4_CACHE_DTYPE)
    n = q.shape[0]
    output = torch.full((n + 5, hq * d), float("nan"))  # vLLM's (padded) output buffer
    impl.forward(None, q.reshape(n, -1), None, None, cache, md, output=output)
    want = torch.empty(q.shape, dtype=torch.float32)
    ref.kv4_attention(want, q, cache, table, seq_lens, qsl, 512, 1000, d**-0.5, 0)
    torch.testing.assert_close(output[:n].view(n, hq, d), want, rtol=1e-5, atol=1e-5)
    assert bool(output[n:].isnan().all())


def test_builder_falls_back_to_one_fused_launch():
    q, cache, table, seq_lens, qsl = _batch(MIXED, 4, 2, 64, 16, torch.float32)
    # no FlashAttention (CPU, VLLM_QOQ_KV4_PREFILL=fused, unsupported head size)
    assert _builder(400, None).build(0, _cam(qsl, seq_lens, table)).split is None
    # no exact host copy of seq_lens: never sync, run fused
    assert _builder(400, _ref_varlen).build(0, _cam(qsl, seq_lens, table, upper=False)).split is None
    # a pure decode batch (the CUDA-graph case)
    dq = torch.arange(5, dtype=torch.int32)
    dl = torch.tensor([5, 9, 1, 30], dtype=torch.int32)
    assert _builder(400, _ref_varlen).build(0, _cam(dq, dl, table[:4])).split is None
