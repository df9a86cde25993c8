"""KV4 CUDA kernels against the reference (vllm_qoq/reference/kv4.py).

Cache write: bit-exact (codes, scale, zero).  Attention: decode over 1..32k keys,
GQA 1/4/7/8, head_dim 64/128, block sizes 16/32/128, partially filled pages,
split-KV on and off, chunked prefill over a KV4 prefix, mixed batches, fp16/bf16,
a CUDA-graph replay with new lengths and block tables, and the inputs that make the
kernel's biased-code arithmetic cancel hardest (test_biased_codes_adversarial).

QOQ_KV4_LIB=/path/lib.so loads a separately built kernel library first (a targeted
build of csrc/attention/ with torch.utils.cpp_extension.load; benchmarks/attention.py
documents the command); otherwise the kernels come from the vllm_qoq._C extension.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from kv4_common import DEV, GPU_ONLY, _kernels, ops, ref  # noqa: F401  (_kernels: autouse fixture)

pytestmark = GPU_ONLY


def _slots(row, start, n, bs):
    pos = torch.arange(start, start + n, device=row.device)
    return row.long()[pos // bs] * bs + pos % bs


# ------------------------------------------------------------------ cache write
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d,bs,hkv", [(64, 16, 2), (128, 16, 8), (128, 32, 1), (256, 16, 4)])
def test_cache_write_is_bit_exact(dtype, d, bs, hkv):
    torch.manual_seed(d + bs)
    t, hq, nb = 333, 2 * hkv, 40
    # K/V as slices of a fused qkv output (row stride > Hkv*D), with outliers and
    # constant rows (the guard), and padding slots
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device=DEV) * 3
    qkv[::7] += torch.randn(t, 1, device=DEV)[::7] * 50
    qkv[5] = 2.5
    qkv = qkv.to(dtype)
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
    perm = torch.randperm(nb * bs, device=DEV)[:t]
    slots = perm.clone()
    slots[::11] = -1
    got = torch.zeros(ref.kv_cache_shape(nb, bs, hkv, d), dtype=torch.uint8, device=DEV)
    want = got.clone()
    ops.kv4_cache_write(k, v, got, slots)
    ref.kv4_cache_write(k, v, want, slots)
    torch.cuda.synchronize()
    assert torch.equal(got, want)


# ------------------------------------------------------------------ attention
def _make(specs, hq, hkv, d, bs, dtype, seed=0, q_off=0.0, k_case="", v_case=""):
    """specs: [(ctx, q_len)]; returns q, cache, block table, seq_lens, query_start_loc.

    q_off: a common offset added to every query element.  k_case / v_case:
    "zero_hi" (all values <= 0, max ~ 0: zero point ~ 15), "zero_lo" (all >= 0, min
    ~ 0: zero point ~ 0), "outlier" (one channel +40: the other codes crowd ~2 of 16).
    """

    def shape(x, case):
        if case == "zero_hi":
            return -x.abs()
        if case == "zero_lo":
            return x.abs()
        if case == "outlier":
            x[..., 5] += 40.0
        return x
    g = torch.Generator(device=DEV).manual_seed(seed)
    max_blocks = max(math.ceil(c / bs) for c, _ in specs) + 2
    nb = len(specs) * max_blocks + 1
    perm = torch.randperm(nb, device=DEV, generator=g).to(torch.int32)
    # stale bytes everywhere (NaN scales included): the kernel must mask them
    cache = torch.randint(0, 256, ref.kv_cache_shape(nb, bs, hkv, d), dtype=torch.uint8,
                          device=DEV, generator=g)
    table = torch.zeros(len(specs), max_blocks, dtype=torch.int32, device=DEV)
    qs, qsl = [], [0]
    for i, (ctx, ql) in enumerate(specs):
        table[i] = perm[i * max_blocks : (i + 1) * max_blocks]
        k = torch.randn(ctx, hkv, d, device=DEV, generator=g) * 2
        k += torch.randn(1, hkv, d, device=DEV, generator=g) * 3  # per-channel offsets (RoPE'd keys)
        v = torch.randn(ctx, hkv, d, device=DEV, generator=g)
        k, v = shape(k, k_case), shape(v, v_case)
        ops.kv4_cache_write(k.to(dtype), v.to(dtype), cache, _slots(table[i], 0, ctx, bs))
        qs.append((torch.randn(ql, hq, d, device=DEV, generator=g) + q_off).to(dtype))
        qsl.append(qsl[-1] + ql)
    q = torch.cat(qs)
    seq_lens = torch.tensor([c for c, _ in specs], dtype=torch.int32, device=DEV)
    return q, cache, table, seq_lens, torch.tensor(qsl, dtype=torch.int32, device=DEV)


def _check(specs, hq, hkv, d, bs, dtype, num_splits=0, seed=0, per_dim=False, **dist):
    """got vs the reference: |err| <= tol * (1 + max|want|), per head dim if per_dim."""
    q, cache, table, seq_lens, qsl = _make(specs, hq, hkv, d, bs, dtype, seed, **dist)
    max_q = max(ql for _, ql in specs)
    max_s = max(c for c, _ in specs)
    scale = d**-0.5
    got = torch.full_like(q, float("nan"))
    ops.kv4_attention(got, q, cache, table, seq_lens, qsl, max_q, max_s, scale, num_splits)
    want = torch.empty(q.shape, dtype=torch.float32, device=DEV)
    ref.kv4_attention(want, q, cache, table, seq_lens, qsl, max_q, max_s, scale, 0)
    torch.cuda.synchronize()
    err = (got.float() - want).abs()
    tol = 1.5e-2 if dtype == torch.bfloat16 else 4e-3
    assert torch.isfinite(got).all()
    if per_dim:  # no dim's tolerance borrowed from another dim's larger values
        bound = tol + tol * want.abs().amax(dim=(0, 1))
        assert bool((err.amax(dim=(0, 1)) <= bound).all()), float((err.amax(dim=(0, 1)) / bound).max())
    else:
        assert float(err.max()) <= tol + tol * float(want.abs().max()), float(err.max())
    return got


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "hq,hkv,d,bs",
    [(32, 8, 128, 16), (32, 32, 128, 16), (14, 2, 64, 32), (16, 2, 64, 16), (8, 1, 128, 128)],
)
def test_decode_batch(dtype, hq, hkv, d, bs):
    specs = [(1, 1), (15, 1), (16, 1), (17, 1), (100, 1), (1000, 1), (4097, 1)]
    _check(specs, hq, hkv, d, bs, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d,q_len", [(32, 8, 128, 2), (16, 8, 64, 3), (32, 8, 64, 2)])
def test_decode_several_tokens_few_rows(dtype, hq, hkv, d, q_len):
    """Speculative-decoding shapes: q_len * G <= 8 rows (the O^T decode build) whose causal
    ends differ by token; long contexts take the unmasked tiles below the first row's end,
    then the masked ones (kv4_attention.cu, kv_lo).  Contexts that are multiples of 16 end a
    warp's last tile pair exactly at the last token's key, which the earlier tokens' rows must
    not see: a kernel that skipped masking up to the last row's end fails there."""
    specs = [(q_len, q_len), (17, q_len), (80, q_len), (96, q_len), (128, q_len), (100, q_len),
             (1024, q_len), (2064, q_len), (4097, q_len)]
    _check(specs, hq, hkv, d, 16, dtype, num_splits=1)
    _check(specs, hq, hkv, d, 16, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,bs", [(32, 8, 16), (8, 2, 32)])
def test_decode_dense_occupancy_batch(dtype, hq, hkv, bs):
    """Unsplit head_dim-128 decode with 3 x SMs < CTAs <= 4 x SMs runs the 4-CTA-per-SM build
    (kv4_attention.cu, kDenseBlocks128); mixed lengths, partial pages, one key."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    batch = (3 * sms) // hkv + 1  # CTAs = batch * hkv (one row tile per KV head)
    assert 3 * sms < batch * hkv <= 4 * sms
    lens = [1, 17, 300, 1000, 2049, 4096, 33]
    specs = [(lens[i % len(lens)] + i, 1) for i in range(batch)]
    _check(specs, hq, hkv, 128, bs, dtype, num_splits=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 3, 0])
def test_long_decode_split_kv(num_splits, dtype):
    # num_splits=1: one CTA per row tile walks 32k keys, 512 tiles per warp (the V
    # bias folded every 8 of them)
    _check([(32768, 1), (20000, 1), (5, 1)], 32, 8, 128, 16, dtype, num_splits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d,bs", [(32, 8, 128, 16), (12, 2, 64, 32), (8, 8, 128, 64)])
def test_chunked_prefill_over_a_kv4_prefix(dtype, hq, hkv, d, bs):
    # (context incl. the chunk, chunk length): a fresh prompt, chunks behind prefixes of
    # every alignment, a decode mixed in, and a chunk ending mid-page
    specs = [(300, 300), (1000, 137), (64, 16), (2049, 1), (777, 512), (33, 2)]
    _check(specs, hq, hkv, d, bs, dtype)


# The kernel multiplies biased codes (fp16 1024 + 16c, bf16 128 + c) and takes the bias
# out in fp32 (B_q = M * sum(Q') for K, PS = M * sum(P') for V; kv4_attention.cu's
# header).  tests/test_kv4_bias_fold.py checks that algebra on the CPU and emulates its
# precision; these are the inputs where the cancellation bites hardest: a query with a
# large common offset (sum(q) >> q.c, B_q large), K / V zero points near 15 and near 0,
# a V outlier channel (the other codes crowd one end), long single-split contexts.
# Same tolerances as above, per head dim: the emulation (8192 keys in one warp, a
# truncating accumulator) uses 14% of them, 7% with an ideal fp32 accumulator.
ADVERSARIAL = [
    dict(q_off=8.0),
    dict(q_off=-20.0, k_case="zero_hi"),
    dict(k_case="zero_lo", v_case="zero_hi"),
    dict(q_off=3.0, v_case="zero_lo"),
    dict(v_case="outlier"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dist", ADVERSARIAL, ids=lambda x: "-".join(f"{k}={v}" for k, v in x.items()))
def test_biased_codes_adversarial(dtype, d, dist):
    # decode, GQA 4 (rows g+8 unused), split-KV chosen by the heuristic
    _check([(1, 1), (17, 1), (1000, 1), (4097, 1)], 32, 8, d, 16, dtype, per_dim=True, **dist)
    # decode on one split: 8192 keys through each CTA
    _check([(8192, 1), (300, 1)], 16, 2, d, 16, dtype, num_splits=1, per_dim=True, **dist)
    # prefill / chunked rows (R2: 16 rows per tile from several query tokens), GQA 7
    _check([(300, 300), (1000, 137), (33, 2)], 14, 2, d, 32, dtype, per_dim=True, **dist)


def test_prefill_with_splits_matches_without():
    specs = [(2000, 40), (50, 50)]
    a = _check(specs, 16, 2, 128, 16, torch.float16, num_splits=1, seed=5)
    b = _check(specs, 16, 2, 128, 16, torch.float16, num_splits=4, seed=5)
    torch.testing.assert_close(a, b, rtol=0, atol=2e-3)


def test_padded_batch_rows_are_left_alone():
    # cudagraph padding: trailing requests with no query tokens, trailing padding tokens
    q, cache, table, seq_lens, qsl = _make([(40, 1), (70, 1)], 8, 2, 128, 16, torch.float16)
    qp = torch.cat([q, torch.randn(3, 8, 128, device=DEV, dtype=q.dtype)])
    sl = torch.cat([seq_lens, torch.zeros(2, dtype=torch.int32, device=DEV)])
    qslp = torch.cat([qsl, qsl[-1:].repeat(2)])
    tab = torch.cat([table, torch.zeros(2, table.shape[1], dtype=torch.int32, device=DEV)])
    out = torch.full_like(qp, 7.0)
    ops.kv4_attention(out, qp, cache, tab, sl, qslp, 1, 70, 0.1, 2)
    want = torch.empty(q.shape, dtype=torch.float32, device=DEV)
    ref.kv4_attention(want, q, cache, table, seq_lens, qsl, 1, 70, 0.1, 0)
    torch.cuda.synchronize()
    assert float((out[:2].float() - want).abs().max()) < 4e-3
    assert bool((out[2:] == 7.0).all())


def test_cuda_graph_replay_with_new_lengths():
    hq, hkv, d, bs, b = 32, 8, 128, 16, 4
    q, cache, table, seq_lens, qsl = _make([(3000, 1)] * b, hq, hkv, d, bs, torch.bfloat16)
    out = torch.empty_like(q)
    max_seq = 4096  # what build_for_cudagraph_capture passes (max_model_len)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the graph
        ops.kv4_attention(out, q, cache, table, seq_lens, qsl, 1, max_seq, d**-0.5, 0)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.kv4_attention(out, q, cache, table, seq_lens, qsl, 1, max_seq, d**-0.5, 0)
    for lens in ([1, 17, 3000, 2048], [3000, 5, 64, 1]):
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        table.copy_(table.flip(0))
        q.normal_()
        graph.replay()
        want = torch.empty(q.shape, dtype=torch.float32, device=DEV)
        ref.kv4_attention(want, q, cache, table, seq_lens, qsl, 1, max_seq, d**-0.5, 0)
        torch.cuda.synchronize()
        assert float((out.float() - want).abs().max()) < 2e-2


# ------------------------------------------------------------------ vLLM on the GPU
def test_vllm_gpu_kv4_with_cuda_graphs(tmp_path):
    """vLLM (GPU, CUDA graphs on): requested KV4 and auto-selected KV4 vs the default cache.

    The same checks and tolerances as tests/test_kv4_vllm_e2e.py (CPU); skipped
    without vLLM.  Needs vllm_qoq._C with the kernels (pip install -e .).
    """
    pytest.importorskip("vllm")
    import subprocess
    import sys
    from pathlib import Path

    from converters.tiny import DEFAULT_TEXT, tiny_llama_dir
    from tests.kv4_job import run_job

    if os.environ.get("QOQ_KV4_LIB"):
        pytest.skip("vLLM workers load vllm_qoq._C, not QOQ_KV4_LIB: build the extension")
    import json

    page = json.loads(Path(DEFAULT_TEXT).open().readline())["page"]
    prompts = [page[:600], page[:420] + " And now something else entirely about the economy"]
    tiny = tiny_llama_dir()
    qoq = tmp_path / "tiny-qoq-kv4"
    subprocess.run([sys.executable, "-m", "converters.quantize", "--model", str(tiny), "--out", str(qoq),
                    "--group-size", "128", "--kv-bits", "4"], check=True, capture_output=True,
                   cwd=str(Path(__file__).resolve().parents[2]))
    common = {"block_size": 16, "max_num_batched_tokens": 48, "enable_prefix_caching": True,
              "enforce_eager": False}
    runs = {}
    for name, model, kw in (("A", tiny, {}),
                            ("B", tiny, {"kv_cache_dtype": "int4_per_token_head", "attention_backend": "CUSTOM"}),
                            ("C", qoq, {}),
                            ("D", qoq, {"kv_cache_dtype": "float16"})):
        spec = {"model": str(model), "llm": {**common, **kw}, "prompts": prompts, "max_tokens": 6}
        runs[name] = run_job(spec, tmp_path / name, timeout=600)
    for name in ("B", "C"):
        assert {(i, d) for _, i, d in runs[name]["layers"]} == {("QoQKV4AttentionImpl", "int4_per_token_head")}
    for kv4, base in (("B", "A"), ("C", "D")):
        d = torch.cat([(torch.tensor(x["prompt_logprobs"][1:]) - torch.tensor(y["prompt_logprobs"][1:])).abs()
                       for x, y in zip(runs[kv4]["results"], runs[base]["results"])])
        assert float(d.mean()) <= 0.4 and float(d.max()) <= 3.0, (kv4, float(d.mean()), float(d.max()))
        for x, y in zip(runs[kv4]["results"], runs[base]["results"]):
            assert x["token_ids"][:2] == y["token_ids"][:2]
