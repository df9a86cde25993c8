"""QoQ recipe quantizers (clipping search, GPTQ) and the whole run_qoq on tiny models."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from converters import calib
from converters.recipe import QoQOptions, run_qoq
from converters.recipe import transforms as T
from converters.recipe.quantizers import (
    HessianAccumulator,
    clip_search,
    fake_quantize,
    gptq_quantize,
    output_error,
    relative_error,
    rtn_quantize,
)
from vllm_qoq import format as fmt
from vllm_qoq.reference.quantize import quantize_weight

GS = [-1, 128]


def _problem(n=64, k=256, t=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[:, :3] *= 6  # a few outlier input channels
    mix = torch.randn(k, k, generator=g) * 0.2 + torch.eye(k)
    x = torch.randn(t, k, generator=g) @ mix  # correlated inputs: GPTQ has something to exploit
    acc = HessianAccumulator(k, "cpu")
    for chunk in x.split(300):
        acc.add(chunk)
    return w, x, acc.h


def test_hessian_accumulator_is_the_mean_outer_product():
    _, x, h = _problem()
    torch.testing.assert_close(h, x.T @ x / x.shape[0], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("gs,k", [(-1, 256), (128, 256), (128, 200)])
def test_gptq_with_diagonal_hessian_is_reference_rtn(gs, k):
    w, _, _ = _problem(k=k)
    h = torch.diag(torch.rand(w.shape[1], generator=torch.Generator().manual_seed(1)) + 0.5)
    q, r = gptq_quantize(w, h, gs), quantize_weight(w, gs)
    assert q.keys() == r.keys()
    for name in r:
        assert torch.equal(q[name], r[name]), name


@pytest.mark.parametrize("gs,k", [(-1, 256), (128, 256), (128, 576)])
def test_fake_quantize_is_bit_identical_to_reference(gs, k):
    w, _, _ = _problem(k=k, seed=5)
    for ratio in (None, torch.linspace(0.5, 1.0, w.shape[0])):
        ref = fmt.dequantize_weight(rtn_quantize(w, gs, ratio), gs, k)
        assert torch.equal(fake_quantize(w, gs, ratio), ref)


@pytest.mark.parametrize("gs,k", [(-1, 256), (128, 256), (128, 200)])
def test_gptq_reduces_layer_error_vs_rtn(gs, k):
    w, x, h = _problem(k=k)
    q = gptq_quantize(w, h, gs)
    fmt.validate_layer(q, gs, "gptq", k=k)  # g128 K=200: padded to 256 with zero codes
    e_gptq = relative_error(w, fmt.dequantize_weight(q, gs, k), h)
    e_rtn = relative_error(w, fmt.dequantize_weight(quantize_weight(w, gs), gs, k), h)
    assert e_gptq < 0.8 * e_rtn
    # the H-based error is the true output error on the calibration inputs
    d = x @ (w - fmt.dequantize_weight(q, gs, k)).T
    assert abs(float(d.pow(2).sum() / (x @ w.T).pow(2).sum()) - e_gptq) < 1e-3 * e_gptq + 1e-9


@pytest.mark.parametrize("gs,k", [(-1, 256), (128, 256), (128, 200)])
def test_clipping_never_increases_error(gs, k):
    w, _, h = _problem(k=k, seed=2)
    ratio = clip_search(w, h, gs, steps=20)
    assert ratio.shape == (w.shape[0],) and float(ratio.max()) <= 1.0 and float(ratio.min()) >= 0.2
    e_rtn = output_error(w, fmt.dequantize_weight(rtn_quantize(w, gs), gs, k), h)
    e_clip = output_error(w, fmt.dequantize_weight(rtn_quantize(w, gs, ratio), gs, k), h)
    assert bool((e_clip <= e_rtn * (1 + 1e-5)).all())  # per output channel (search runs in fp32)
    assert float(e_clip.sum()) < float(e_rtn.sum())  # and it helps somewhere
    # GPTQ on top of the clipped parameters stays a valid layer (padding included)
    fmt.validate_layer(gptq_quantize(w, h, gs, ratio), gs, "gptq+clip", k=k)


def test_g128_gptq_keeps_int8_invariant():
    w, _, h = _problem(n=32, k=384, seed=3)
    q = gptq_quantize(w * 50, h, 128, protective_range=119)
    q8 = fmt.int8_weight_g128(q["qweight"], q["s2_scales"], q["s2_zeros"]).to(torch.int32)
    u = fmt.unpack_int4(q["qweight"]).to(torch.int32).view(32, 3, 128)
    s2 = q["s2_scales"].to(torch.int32).view(32, 3, 1)
    z = q["s2_zeros"].to(torch.int32).view(32, 3, 1)
    assert torch.equal(q8.view(32, 3, 128), s2 * (u - z))  # no int8 wrap-around
    assert int(q8.min()) >= -128 and int(q8.max()) <= 127


# ---------------------------------------------------------------- calibration
def test_calib_sources(tmp_path):
    j = tmp_path / "c.jsonl"
    j.write_text(json.dumps({"page": "alpha beta"}) + "\n" + json.dumps({"text": "gamma"}) + "\n")
    assert calib.load_texts(j) == ["alpha beta", "gamma"]
    t = tmp_path / "c.txt"
    t.write_text("one doc\n\ntwo doc\n\n\n")
    assert calib.load_texts(t) == ["one doc", "two doc"]
    with pytest.raises(FileNotFoundError):
        calib.load_texts(tmp_path / "missing.jsonl")
    assert len(calib.load_texts(max_chars=1)) == 1  # the default file exists


class _CharTok:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 97 + 1 for c in text]}


def test_sample_windows_deterministic_and_shaped():
    texts = calib.load_texts(max_chars=20000)
    a = calib.sample_windows(_CharTok(), texts, 5, 64, seed=1)
    b = calib.sample_windows(_CharTok(), texts, 5, 64, seed=1)
    assert a.shape == (5, 64) and a.dtype == torch.int64 and torch.equal(a, b)
    with pytest.raises(ValueError):
        calib.sample_windows(_CharTok(), ["ab"], 1, 64)


# ------------------------------------------------------------ the whole recipe
def _model(kind):
    torch.manual_seed(0)
    kw = dict(vocab_size=256, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
              num_attention_heads=8, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)
    if kind == "llama-k192":  # no K a multiple of 128: g128 pads every linear
        kind = "llama"
        kw.update(hidden_size=192, intermediate_size=320, num_attention_heads=6)
    m = (LlamaForCausalLM(LlamaConfig(**kw)) if kind == "llama" else Qwen2ForCausalLM(Qwen2Config(**kw)))
    return m.float().eval()


@pytest.mark.parametrize("kind,gs", [("llama", -1), ("llama", 128), ("qwen2", 128), ("llama-k192", 128)])
def test_run_qoq_end_to_end(kind, gs):
    m = _model(kind)
    ids = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = m(ids).logits
    opts = QoQOptions(clip_steps=10, batch_size=4, progress=False, smooth_tokens=256, device="cpu",
                      skip=("model.layers.1.mlp.down_proj",))
    res = run_qoq(m, None, ids, gs, opts)
    assert len(res.quantized) == 13  # 2 layers x 7 linears, minus the skipped one
    for prefix, q in res.quantized.items():
        lin = dict(m.named_modules())[prefix]
        fmt.validate_layer(q, gs, prefix, k=lin.in_features)
        # the model now holds exactly the dequantized weights (fake quant), [N, K]
        assert torch.equal(lin.weight, fmt.dequantize_weight(q, gs, lin.in_features))
        assert prefix + ".weight" not in res.floats
    assert "model.layers.1.mlp.down_proj.weight" in res.floats
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(res.floats)
    if kind == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in res.floats
    for row in res.report:  # GPTQ + clipping never lose to RTN on the calibration data
        assert row["rel_err"] <= row["rel_err_rtn"] * 1.0001, row
    assert sum(r["rel_err"] for r in res.report) < 0.7 * sum(r["rel_err_rtn"] for r in res.report)
    assert res.recipe["reorder"] == (gs == 128) and res.recipe["gptq"] and res.recipe["clip"]
    with torch.no_grad():
        out = m(ids).logits
    assert float((out - ref).norm() / ref.norm()) < 0.15  # a working 4-bit model
    assert "geomean" in res.summary()


def test_run_qoq_options_disable_steps():
    m = _model("llama")
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(4))
    opts = QoQOptions(rotation=False, smooth_attention=False, smooth_linear=False, clip=False,
                      gptq=False, progress=False, device="cpu")
    w0 = m.model.layers[0].self_attn.q_proj.weight.detach().clone()
    res = run_qoq(m, None, ids, 128, opts)
    assert not res.recipe["rotation"] and "tie_word_embeddings" not in res.config_updates
    # nothing but RTN (reordering is still on for g128, and q_proj is not reordered)
    assert all(torch.equal(res.quantized["model.layers.0.self_attn.q_proj"][k], v)
               for k, v in quantize_weight(w0, 128).items())
    assert T.head_dims(m) == (8, 2, 32)


def test_run_qoq_refuses_per_channel_odd_k_before_any_work():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=192, intermediate_size=255, num_hidden_layers=1,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=32)
    m = LlamaForCausalLM(cfg).float().eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj: input size K=255 is odd"):
        run_qoq(m, None, torch.randint(0, 64, (2, 16)), -1, QoQOptions(progress=False, device="cpu"))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


# ------------------------------------------------------- SmoothAttention α search
def _attn_problem(t=96, d=32, hq=4, hkv=2, seed=0):
    """Post-RoPE q/k/v where KV head 0 has an outlier RoPE pair in K and head 1 has none."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(hq, t, d, generator=g)
    k = torch.randn(hkv, t, d, generator=g)
    v = torch.randn(hkv, t, d, generator=g)
    k[0, :, 3] *= 40
    k[0, :, 3 + d // 2] *= 40
    return q, k, v


def test_kv4_attention_error_is_the_reference_kv4_attention_error():
    from converters.recipe.pipeline import _kv4_attention_error
    from vllm_qoq.reference import kv4 as R

    q, k, v = _attn_problem()
    lam = torch.rand(2, 32, generator=torch.Generator().manual_seed(1)) + 0.5
    err = _kv4_attention_error(q, k, v, lam)
    # the same thing through the reference: λ folded into q, k/λ quantized per token-head
    k_hat = R.dequantize_kv4(*R.quantize_kv4((k / lam[:, None]).transpose(0, 1)))  # [T, Hkv, D]
    qs = (q.view(2, 2, 96, 32) * lam[:, None, None]).reshape(4, 96, 32).transpose(0, 1)
    scale = 32 ** -0.5
    got = R.attention(qs, k_hat, v.transpose(0, 1), scale, 0)
    want = R.attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale, 0)
    per_head = (got - want).pow(2).view(96, 2, 2, 32).sum(dim=(0, 2, 3))
    torch.testing.assert_close(err, per_head, rtol=2e-3, atol=1e-6)


def test_smooth_attention_search_picks_per_head_and_beats_fixed_alpha():
    from converters.recipe.pipeline import _kv4_attention_error, _search_smooth_attention

    q, k, v = _attn_problem()
    st = {"k": k.abs().amax(1), "q": q.abs().amax(1).view(2, 2, 32).amax(1), "attn": [(q, k, v)]}
    opts = QoQOptions(smooth_attention_search=True)
    lam, info = _search_smooth_attention(st, opts, 4, 2, 32)
    assert len(info["alpha"]) == 2 and info["alpha"][0] > 0  # the outlier head gets smoothed
    errs = {a: _kv4_attention_error(q, k, v, T.smooth_attention_scales(st["k"], st["q"], a))
            for a in opts.smooth_attention_alphas}
    chosen = _kv4_attention_error(q, k, v, lam)
    for a, e in errs.items():  # per head no worse than any single α of the grid
        assert torch.all(chosen <= e * (1 + 1e-5)), a
    assert float(chosen[0]) < 0.5 * float(errs[0.0][0])  # smoothing the outlier head pays off
    assert info["kv4_err"] == pytest.approx(float(chosen.sum()), rel=1e-5)
    # RoPE pairs share λ (so RoPE commutes with it) whatever α each head got
    torch.testing.assert_close(lam[:, :16], lam[:, 16:])


def test_run_qoq_records_the_smooth_attention_search():
    m = _model("llama")
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(4))
    opts = QoQOptions(clip_steps=5, batch_size=2, progress=False, smooth_tokens=128, device="cpu", gptq=False,
                      smooth_attention_search=True)
    res = run_qoq(m, None, ids, -1, opts)
    assert res.recipe["smooth_attention_alpha"] == "search"
    rows = [r for r in res.report if r["linear"] == "k_proj"]
    assert len(rows) == 2 and all(len(r["smooth"]["alpha"]) == 2 for r in rows)
    assert all(r["smooth"]["kv4_err"] <= r["smooth"]["kv4_err_none"] * (1 + 1e-6) for r in rows)
    assert "SmoothAttention search" in res.summary()
    fixed = run_qoq(_model("llama"), None, ids, -1, QoQOptions(
        clip_steps=5, batch_size=2, progress=False, smooth_tokens=128, device="cpu", gptq=False))
    assert fixed.recipe["smooth_attention_alpha"] == 0.5
    assert all("smooth" not in r for r in fixed.report if r["linear"] == "k_proj")


# ------------------------------------------- KV4-aware o_proj smoothing (V is divided by s)
def test_o_proj_input_is_reference_attention():
    from converters.recipe.pipeline import _causal_probs, _o_proj_input
    from vllm_qoq.reference import kv4 as R

    q, k, v = _attn_problem()
    got = _o_proj_input(_causal_probs(q, k), v)  # [T, Hq*D]
    want = R.attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), 32 ** -0.5, 0)
    torch.testing.assert_close(got, want.reshape(96, -1), rtol=1e-4, atol=1e-5)


def test_kv4_aware_o_smoothing_minimises_the_runtime_error():
    """_smooth_o picks, over its grid, the factor with the smallest error of o_proj computed as
    the runtime does: Q8(P·deq(Q4(V/s)))·Q4(W·s)ᵀ — checked here through the reference ops."""
    from converters.recipe import pipeline as P
    from vllm_qoq.reference import kv4 as R

    q, k, v = _attn_problem(t=64)
    v[1, :, 5] *= 30  # an outlier V channel: smoothing it away from V helps KV4
    lin = torch.nn.Linear(4 * 32, 96, bias=False)
    torch.nn.init.normal_(lin.weight, std=0.05)
    layer = torch.nn.Module()
    layer.self_attn = torch.nn.Module()
    layer.self_attn.o_proj = lin
    layer.self_attn.v_proj = torch.nn.Linear(96, 2 * 32, bias=False)
    x_ref = R.attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), 32 ** -0.5, 0).reshape(64, -1)
    st = {"attn": [(q, k, v)], "o_x": x_ref, "o_absmax": x_ref.abs().amax(0)}
    opts = QoQOptions(smooth_alphas=(0.25, 0.5), smooth_betas=(0.5,), kv4_aware_smoothing=True)
    w0 = lin.weight.detach().clone()
    grp, y_ref = 2, x_ref @ w0.T

    def runtime_error(s_kv):
        v_hat = R.dequantize_kv4(*R.quantize_kv4((v / s_kv[:, None, :]).transpose(0, 1)))  # [T, Hkv, D]
        x_hat = R.attention(q.transpose(0, 1), k.transpose(0, 1), v_hat, 32 ** -0.5, 0).reshape(64, -1)
        s = s_kv.repeat_interleave(grp, dim=0).reshape(-1)
        return P._a8_w4_error(x_hat, w0 * s, y_ref, -1, opts.protective_range)

    x_absmax = st["o_absmax"].view(2, grp, 32).amax(1).reshape(-1)
    w_absmax = w0.abs().amax(0).view(2, grp, 32).amax(1).reshape(-1)
    cands = {(0.0, 0.0): torch.ones(2, 32)}
    for al, be in P._grid(opts):
        if al or be:
            cands[(al, be)] = T.smooth_scales(x_absmax, w_absmax, al, be).view(2, 32).float()
    errs = {key: runtime_error(s_kv) for key, s_kv in cands.items()}
    info = P._smooth_o(layer, st, -1, opts, 4, 2, 32)
    chosen = (info["alpha"], info["beta"])
    assert errs[chosen] <= min(errs.values()) * (1 + 1e-4), (chosen, errs)
    # and the factor was folded: o_proj columns × s, v_proj rows ÷ s
    if chosen != (0.0, 0.0):
        s = cands[chosen].repeat_interleave(grp, dim=0).reshape(-1)
        torch.testing.assert_close(lin.weight.detach(), w0 * s, rtol=1e-5, atol=1e-7)


# ------------------------------------------------ quantized propagation (runtime-like inputs)
def test_runtime_quant_context_quantizes_kv_and_inputs_then_restores():
    import sys

    from converters.recipe.pipeline import _runtime_quant
    from vllm_qoq.reference import kv4 as R
    from vllm_qoq.reference.quantize import dequantize_activation, quantize_activation

    m = _model("llama")
    layer = T.decoder_layers(m)[0]
    mod = sys.modules[type(layer.self_attn).__module__]
    rope = mod.apply_rotary_pos_emb
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 16, 256, generator=g)
    pos = torch.arange(16).expand(2, 16)
    kw = {"position_embeddings": m.model.rotary_emb(h, pos)}
    with torch.no_grad():
        ref = layer(h, **kw)
        ref = ref[0] if isinstance(ref, tuple) else ref
        seen = {}
        with _runtime_quant(layer, 2, 32, True):
            # registered after the context's own hooks, so it sees what o_proj computes with
            hk = layer.self_attn.o_proj.register_forward_pre_hook(lambda _, a: seen.__setitem__("o_in", a[0]))
            q, k = torch.randn(2, 8, 16, 32, generator=g), torch.randn(2, 2, 16, 32, generator=g)
            cos, sin = kw["position_embeddings"]
            _, k_q = mod.apply_rotary_pos_emb(q, k, cos, sin)
            _, k_f = rope(q, k, cos, sin)
            torch.testing.assert_close(k_q, R.dequantize_kv4(*R.quantize_kv4(k_f)), rtol=0, atol=0)
            v = layer.self_attn.v_proj(h).view(2, 16, 2, 32)
            torch.testing.assert_close(v, R.dequantize_kv4(*R.quantize_kv4(v)), rtol=0, atol=1e-6)
            out = layer(h, **kw)
            out = out[0] if isinstance(out, tuple) else out
        hk.remove()
        # o_proj saw its input after the per-token INT8 round trip (pre-hooks run in order)
        x = seen["o_in"].reshape(-1, 256)
        qx, sx, _ = quantize_activation(x)
        torch.testing.assert_close(x, dequantize_activation(qx, sx), rtol=0, atol=1e-6)
        assert 0 < float((out - ref).norm() / ref.norm()) < 0.1  # quantized, still the same layer
        assert mod.apply_rotary_pos_emb is rope  # restored
        again = layer(h, **kw)
        again = again[0] if isinstance(again, tuple) else again
        torch.testing.assert_close(again, ref, rtol=0, atol=0)


def test_run_qoq_quantized_propagation_runs_and_is_recorded():
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(4))
    outs, recs = [], []
    for qp in (True, False):
        m = _model("qwen2")
        with torch.no_grad():
            ref = m(ids).logits
        res = run_qoq(m, None, ids, 128, QoQOptions(clip_steps=5, batch_size=2, progress=False, smooth_tokens=128,
                                                    device="cpu", quantized_propagation=qp))
        with torch.no_grad():
            out = m(ids).logits
        assert float((out - ref).norm() / ref.norm()) < 0.15  # a working 4-bit model either way
        outs.append(res)
        recs.append(res.recipe["quantized_propagation"])
    assert recs == [True, False]
    # the calibration saw different inputs: GPTQ chose different codes somewhere
    k1 = "model.layers.1.mlp.down_proj"
    assert any(not torch.equal(outs[0].quantized[k1][t], outs[1].quantized[k1][t]) for t in outs[0].quantized[k1])
