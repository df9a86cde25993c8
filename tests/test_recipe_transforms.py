"""QoQ recipe transforms: Hadamard construction and function preservation in float.

Each transform (rotation, per-head V rotation, SmoothAttention, linear smoothing,
channel reordering) must leave a float model's logits unchanged; checked on tiny
random Llama (GQA, tied embeddings, llama3 RoPE scaling), Mistral and Qwen2 (q/k/v biases) models in float64 (HF RMSNorm computes in float32,
so "unchanged" means within 1e-5).
"""

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from converters.recipe import QoQOptions, run_qoq
from converters.recipe import hadamard as had
from converters.recipe import transforms as T


# ------------------------------------------------------------------ Hadamard
@pytest.mark.parametrize("m", [12, 20, 28, 36, 44, 52, 60, 68, 76, 84, 108, 140, 148])
def test_base_hadamard_orders(m):
    H = had.base_hadamard(m)
    assert H is not None and H.shape == (m, m)
    assert bool((H.abs() == 1).all())
    assert torch.equal(H.double() @ H.double().T, m * torch.eye(m, dtype=torch.float64))


@pytest.mark.parametrize("n", [40, 64, 576, 896, 1536, 2304])
def test_hadamard_matrix_kron_sizes(n):
    H = had.hadamard_matrix(n)
    assert had.is_hadamard(H)
    R = had.orthogonal_hadamard(n, seed=3)
    assert torch.allclose(R @ R.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_is_hadamard_rejects_non_hadamard():
    H = had.hadamard_matrix(12).clone()
    H[0, 0] = -H[0, 0]
    assert not had.is_hadamard(H)
    assert not had.is_hadamard(torch.ones(4, 4, dtype=torch.int64))


def test_paley_fields_of_prime_power_order():
    # GF(27) and GF(25) need polynomial arithmetic: the character must be balanced.
    for q in (25, 27):
        Q = had._jacobsthal(q)
        assert int(Q.sum(dim=1).abs().max()) == 0  # (q-1)/2 squares, (q-1)/2 non-squares per row
        assert torch.equal(Q @ Q.T, q * torch.eye(q, dtype=torch.int64) - torch.ones(q, q, dtype=torch.int64))


@pytest.mark.parametrize("n", [156, 172, 6, 0])
def test_hadamard_unsupported_orders_raise(n):
    with pytest.raises(ValueError):
        had.hadamard_matrix(n)


# ---------------------------------------------------------------- tiny models
def _tiny(kind: str, hidden=192, inter=320, heads=6, kv=2, hd=32, tie=True):
    torch.manual_seed(0)
    kw = dict(vocab_size=300, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
              num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
              tie_word_embeddings=tie, max_position_embeddings=256)
    if kind == "llama":
        m = LlamaForCausalLM(LlamaConfig(**kw, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}))
    elif kind == "mistral":
        m = MistralForCausalLM(MistralConfig(**kw))
    else:
        m = Qwen2ForCausalLM(Qwen2Config(**kw))
    m = m.to(torch.float64).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
    return m


def _ids():
    return torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))


def _logits(m):
    with torch.no_grad():
        return m(_ids()).logits


KINDS = ["llama", "mistral", "qwen2"]


@pytest.mark.parametrize("kind", KINDS)
def test_fold_and_rotate_preserve_outputs(kind):
    m = _tiny(kind)  # hidden 192 = 16 * 12: a non-power-of-two Hadamard
    ref = _logits(m)
    nh, nkv, hd = T.head_dims(m)
    R = had.orthogonal_hadamard(192, seed=0)
    assert T.untie_embeddings(m) is True
    T.fold_final_norm(m)
    T.rotate_embeddings(m, R)
    T.rotate_lm_head(m, R)
    Rh = had.orthogonal_hadamard(hd, seed=None)
    for layer in T.decoder_layers(m):
        T.fold_norms_layer(layer)
        T.rotate_layer(layer, R)
        T.rotate_v_heads(layer, Rh, nh, nkv)
        assert torch.equal(layer.input_layernorm.weight, torch.ones(192, dtype=torch.float64))
    assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(_logits(m), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_smooth_attention_preserves_outputs(kind):
    m = _tiny(kind)
    ref = _logits(m)
    nh, nkv, hd = T.head_dims(m)
    g = torch.Generator().manual_seed(2)
    for layer in T.decoder_layers(m):
        kmax = torch.rand(nkv, hd, generator=g, dtype=torch.float64) * 10
        qmax = torch.rand(nkv, hd, generator=g, dtype=torch.float64) * 10
        lam = T.smooth_attention_scales(kmax, qmax, 0.5, 0.3)
        assert torch.equal(lam[:, : hd // 2], lam[:, hd // 2 :])  # RoPE pairs share λ
        assert float(lam.max() / lam.min()) > 1.5  # a real change
        T.apply_smooth_attention(layer, lam, nh, nkv)
    torch.testing.assert_close(_logits(m), ref, rtol=1e-5, atol=1e-5)


def test_smooth_attention_without_pair_sharing_breaks_rope():
    # The pair constraint is necessary: an unshared λ changes the outputs.
    m = _tiny("llama")
    ref = _logits(m)
    nh, nkv, hd = T.head_dims(m)
    lam = torch.ones(nkv, hd, dtype=torch.float64)
    lam[:, 0] = 4.0
    T.apply_smooth_attention(T.decoder_layers(m)[0], lam, nh, nkv)
    assert (_logits(m) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_linear_smoothing_and_reorder_preserve_outputs(kind):
    m = _tiny(kind)
    ref = _logits(m)
    nh, nkv, hd = T.head_dims(m)
    g = torch.Generator().manual_seed(3)
    for layer in T.decoder_layers(m):
        inter = layer.mlp.down_proj.in_features
        perm = T.reorder_permutation(torch.rand(inter, generator=g))
        T.apply_reorder_down(layer, perm)
        s = T.smooth_scales(torch.rand(inter, generator=g) * 5, layer.mlp.down_proj.weight.abs().amax(0), 0.3, 0.7)
        T.apply_smooth_down(layer, s)
        s_kv = 0.2 + torch.rand(nkv, hd, generator=g, dtype=torch.float64) * 3
        T.apply_smooth_o(layer, s_kv, nh, nkv)
    torch.testing.assert_close(_logits(m), ref, rtol=1e-5, atol=1e-5)


def test_reorder_sorts_by_decreasing_absmax():
    x = torch.tensor([0.1, 3.0, 2.0, 5.0])
    assert T.reorder_permutation(x).tolist() == [3, 1, 2, 0]


ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("kind", KINDS)
def test_whole_recipe_without_quantization_is_exact(kind):
    # Every calibrated transform of run_qoq (rotation, SmoothAttention from real
    # statistics, reordering, the smoothing searches), with all linears skipped,
    # must give the same float model.
    m = _tiny(kind, hidden=256, inter=384, heads=8, kv=2, hd=32)
    ref = _logits(m)
    calib = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(5))
    opts = QoQOptions(skip=ALL_LINEARS, rotate_v_heads=True, progress=False, batch_size=2,
                      smooth_tokens=64, device="cpu")
    res = run_qoq(m, None, calib, 128, opts)
    assert res.quantized == {} and res.recipe["reorder"] and res.recipe["rotation"]
    assert res.config_updates["tie_word_embeddings"] is False
    # the transforms happened: norms folded, embeddings rotated
    assert torch.equal(m.model.norm.weight, torch.ones(256, dtype=torch.float64))
    torch.testing.assert_close(_logits(m), ref, rtol=1e-5, atol=1e-5)
