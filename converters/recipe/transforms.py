"""Function-preserving transforms of a Llama-style HF model (in place).

Each transform leaves the float model's outputs unchanged (up to rounding);
tests/test_recipe_transforms.py checks that on tiny random models.  They work on
LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM (q/k/v biases) —
anything whose decoder layers have self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj,
input_layernorm and post_attention_layernorm (RMSNorm), with rotate-half RoPE.

Math (qoq.md §4-5; QuaRot, arXiv 2404.00456, for rotation; SmoothQuant, arXiv
2211.10438, for smoothing).  A linear is y = x Wᵀ + b with W [N, K].
  * fold norm g into the following linears: W ← W·diag(g), g ← 1;
  * rotate the residual stream by orthogonal R: x ← xR, so embed E ← E R,
    readers W ← W R, writers W ← Rᵀ W and b ← b R, lm_head ← W R.
    RMSNorm with unit weight commutes with R (it preserves ‖x‖);
  * smooth a linear's input channel j by s_j: W[:, j] ← W[:, j]·s_j and the
    producer of that channel divides its output row j by s_j;
  * reorder a linear's input channels by π: W ← W[:, π], producer rows ← rows[π].
All arithmetic is done in float64 and cast back to the weight's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------- model access
def decoder_layers(model) -> nn.ModuleList:
    return model.model.layers


def head_dims(model) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim)."""
    c = model.config
    nh = c.num_attention_heads
    nkv = getattr(c, "num_key_value_heads", None) or nh
    hd = getattr(c, "head_dim", None) or c.hidden_size // nh
    return nh, nkv, hd


def layer_linears(layer) -> dict[str, nn.Linear]:
    a, m = layer.self_attn, layer.mlp
    return {
        "self_attn.q_proj": a.q_proj,
        "self_attn.k_proj": a.k_proj,
        "self_attn.v_proj": a.v_proj,
        "self_attn.o_proj": a.o_proj,
        "mlp.gate_proj": m.gate_proj,
        "mlp.up_proj": m.up_proj,
        "mlp.down_proj": m.down_proj,
    }


def _set(param: nn.Parameter, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.data = value.to(device=param.device, dtype=param.dtype).contiguous()


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


# ------------------------------------------------------------- untie + folding
def untie_embeddings(model) -> bool:
    """Give lm_head its own weight (rotation + norm folding make it differ); True if it was tied."""
    lm, emb = model.lm_head, model.model.embed_tokens
    tied = lm.weight is emb.weight or lm.weight.data_ptr() == emb.weight.data_ptr()
    if tied:
        lm.weight = nn.Parameter(emb.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = None
    if getattr(model.config, "text_config", None) is not None:
        model.config.text_config.tie_word_embeddings = False
    return tied


def _fold_norm(norm: nn.Module, linears: list[nn.Linear]) -> None:
    g = _f64(norm.weight)
    for lin in linears:
        _set(lin.weight, _f64(lin.weight) * g[None, :])
    _set(norm.weight, torch.ones_like(g))


def fold_norms_layer(layer) -> None:
    a, m = layer.self_attn, layer.mlp
    _fold_norm(layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj])
    _fold_norm(layer.post_attention_layernorm, [m.gate_proj, m.up_proj])


def fold_final_norm(model) -> None:
    _fold_norm(model.model.norm, [model.lm_head])


# ------------------------------------------------------------------- rotation
def rotate_embeddings(model, R: torch.Tensor) -> None:
    emb = model.model.embed_tokens
    Rd = R.to(emb.weight.device)
    _set(emb.weight, _f64(emb.weight) @ Rd)


def rotate_lm_head(model, R: torch.Tensor) -> None:
    lm = model.lm_head
    _set(lm.weight, _f64(lm.weight) @ R.to(lm.weight.device))


def rotate_layer(layer, R: torch.Tensor) -> None:
    """Residual-stream rotation of one decoder layer (its norms must be folded first)."""
    R = R.to(layer.self_attn.q_proj.weight.device)
    a, m = layer.self_attn, layer.mlp
    for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):  # readers
        _set(lin.weight, _f64(lin.weight) @ R)
    for lin in (a.o_proj, m.down_proj):  # writers
        _set(lin.weight, R.T @ _f64(lin.weight))
        if lin.bias is not None:
            _set(lin.bias, _f64(lin.bias) @ R)


def rotate_v_heads(layer, Rh: torch.Tensor, num_heads: int, num_kv_heads: int) -> None:
    """Per-head rotation of V (v_proj output rows) undone in o_proj's input columns.

    v ← v·Rh per KV head (W_v ← Rh_blockᵀ W_v), o_proj W_o ← W_o·Rh_block per
    query head; attention mixes tokens, not channels, so it commutes.
    """
    a = layer.self_attn
    hd = Rh.shape[0]
    Rh = Rh.to(a.v_proj.weight.device)
    wv = _f64(a.v_proj.weight).reshape(num_kv_heads, hd, -1)
    _set(a.v_proj.weight, torch.einsum("dj,hdk->hjk", Rh, wv).reshape(num_kv_heads * hd, -1))
    if a.v_proj.bias is not None:
        bv = _f64(a.v_proj.bias).reshape(num_kv_heads, hd)
        _set(a.v_proj.bias, (bv @ Rh).reshape(-1))
    wo = _f64(a.o_proj.weight).reshape(-1, num_heads, hd)
    _set(a.o_proj.weight, torch.einsum("nhd,dj->nhj", wo, Rh).reshape(wo.shape[0], -1))


# -------------------------------------------------------------- SmoothAttention
def smooth_attention_scales(
    k_absmax: torch.Tensor,
    q_absmax: torch.Tensor | None,
    alpha: float,
    beta: float = 0.0,
) -> torch.Tensor:
    """λ [num_kv_heads, head_dim] from post-RoPE abs-max statistics (qoq.md §4).

    k_absmax: [num_kv_heads, head_dim]; q_absmax: [num_kv_heads, head_dim]
    (already reduced over the query heads of each group) or None.
    λ = max|K|^α / max|Q|^β, then channels i and i + d/2 (a rotate-half RoPE
    pair) take the larger of their two values so RoPE commutes with λ.
    """
    k = k_absmax.to(torch.float64).clamp_min(1e-5)
    lam = k.pow(alpha)
    if q_absmax is not None and beta:
        lam = lam / q_absmax.to(torch.float64).clamp_min(1e-5).pow(beta)
    half = lam.shape[-1] // 2
    pair = torch.maximum(lam[..., :half], lam[..., half:])
    lam = torch.cat([pair, pair], dim=-1)
    return lam.clamp_min(1e-5)


def apply_smooth_attention(layer, lam: torch.Tensor, num_heads: int, num_kv_heads: int) -> None:
    """q rows × λ (each query head uses its KV head's λ), k rows ÷ λ; biases likewise."""
    a = layer.self_attn
    nkv, hd = lam.shape
    group = num_heads // num_kv_heads
    lam = lam.to(a.q_proj.weight.device, torch.float64)
    lam_q = lam.repeat_interleave(group, dim=0).reshape(-1)  # [num_heads*hd]
    lam_k = lam.reshape(-1)
    _set(a.q_proj.weight, _f64(a.q_proj.weight) * lam_q[:, None])
    _set(a.k_proj.weight, _f64(a.k_proj.weight) / lam_k[:, None])
    if a.q_proj.bias is not None:
        _set(a.q_proj.bias, _f64(a.q_proj.bias) * lam_q)
    if a.k_proj.bias is not None:
        _set(a.k_proj.bias, _f64(a.k_proj.bias) / lam_k)


# ----------------------------------------------------------- linear smoothing
def smooth_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """SmoothQuant-style s_j = max|X_j|^α / max|W_:,j|^β (qoq.md §5), normalised to geomean 1.

    x_absmax: per input channel max|X_j| on calibration data; w_absmax: max_n |W[n, j]|.
    """
    xa = x_absmax.to(torch.float64).clamp_min(1e-5)
    wa = w_absmax.to(torch.float64).clamp_min(1e-5)
    s = xa.pow(alpha) / wa.pow(beta)
    s = s / s.log().mean().exp()
    return s.clamp(1e-4, 1e4)


def apply_smooth_down(layer, s: torch.Tensor) -> None:
    """down_proj input j × s_j; up_proj output row j ÷ s_j (act = silu(gate)·up is linear in up)."""
    m = layer.mlp
    s = s.to(m.down_proj.weight.device, torch.float64)
    _set(m.down_proj.weight, _f64(m.down_proj.weight) * s[None, :])
    _set(m.up_proj.weight, _f64(m.up_proj.weight) / s[:, None])
    if m.up_proj.bias is not None:
        _set(m.up_proj.bias, _f64(m.up_proj.bias) / s)


def apply_smooth_o(layer, s_kv: torch.Tensor, num_heads: int, num_kv_heads: int) -> None:
    """o_proj input (head h, dim d) × s[h // group, d]; v_proj row (kv head, d) ÷ s.

    s_kv: [num_kv_heads, head_dim] — one factor per V channel, shared by every
    query head of the group (GQA).
    """
    a = layer.self_attn
    group = num_heads // num_kv_heads
    s_kv = s_kv.to(a.o_proj.weight.device, torch.float64)
    s_o = s_kv.repeat_interleave(group, dim=0).reshape(-1)
    s_v = s_kv.reshape(-1)
    _set(a.o_proj.weight, _f64(a.o_proj.weight) * s_o[None, :])
    _set(a.v_proj.weight, _f64(a.v_proj.weight) / s_v[:, None])
    if a.v_proj.bias is not None:
        _set(a.v_proj.bias, _f64(a.v_proj.bias) / s_v)


# ------------------------------------------------------------------ reordering
def reorder_permutation(x_absmax: torch.Tensor) -> torch.Tensor:
    """Channel order by decreasing input abs-max (groups of 128 then hold similar magnitudes)."""
    return torch.argsort(x_absmax.to(torch.float64), descending=True, stable=True)


def apply_reorder_down(layer, perm: torch.Tensor) -> None:
    """Permute the intermediate channels: down_proj input columns, gate/up output rows."""
    m = layer.mlp
    perm = perm.to(m.down_proj.weight.device)
    _set(m.down_proj.weight, m.down_proj.weight.detach()[:, perm])
    for lin in (m.gate_proj, m.up_proj):
        _set(lin.weight, lin.weight.detach()[perm, :])
        if lin.bias is not None:
            _set(lin.bias, lin.bias.detach()[perm])
