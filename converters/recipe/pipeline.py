"""The QoQ recipe, layer by layer: ``run_qoq(model, tokenizer, calib_texts, group_size, options)``.

Order (qoq.md §5): rotate → reorder → smooth (SmoothAttention, then linear
smoothing) → weight quantization (clipping search + GPTQ).  Activations and the
KV cache are quantized dynamically at runtime, so nothing is stored for them.

The model stays on the CPU; one decoder layer at a time is moved to the
compute device (in float32), transformed, calibrated, quantized and moved back
holding its fake-quantized weights, whose outputs feed the next layer (GPTQ's
sequential scheme).  So a GPU needs memory for one layer plus the calibration
activations, never the whole model.  On return the model is the float model
that the quantized checkpoint represents (rotated, smoothed, fake-quantized).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from vllm_qoq import format as fmt
from vllm_qoq.reference.kv4 import fake_quantize_kv4
from vllm_qoq.reference.quantize import fake_quantize_activation

from .. import calib
from . import transforms as T
from .hadamard import orthogonal_hadamard
from .quantizers import (
    HessianAccumulator,
    clip_search,
    gptq_quantize,
    relative_error,
    rtn_quantize,
)

DEFAULT_SMOOTH_ALPHAS = (0.05, 0.15, 0.25, 0.35, 0.5)
DEFAULT_SMOOTH_BETAS = (0.5, 0.65, 0.8, 0.95)
# SmoothAttention exponents tried per KV head (0 = no smoothing, so the search is never
# worse than none on its calibration objective; 0.5 = the QoQ paper's fixed choice).
DEFAULT_SMOOTH_ATTENTION_ALPHAS = (0.0, 0.25, 0.375, 0.5, 0.625, 0.75, 1.0)


@dataclass
class QoQOptions:
    """Every knob of the recipe (defaults: the QoQ paper's recipe)."""

    rotation: bool = True
    rotation_seed: int | None = 0  # random ±1 signs on the Hadamard rows; None: plain Hadamard
    rotate_v_heads: bool = False  # newer deepcompressor: per-head Hadamard on v_proj/o_proj
    smooth_attention: bool = True
    smooth_attention_alpha: float = 0.5  # used when smooth_attention_search is off
    smooth_attention_beta: float = 0.0
    # pick α per KV head from smooth_attention_alphas by the KV4 attention-output error
    # on calibration sequences (_search_smooth_attention); off: the fixed α above.  Off by
    # default: on SmolLM2-135M it lowered that error (0.87 -> 0.79 of no smoothing) but not
    # the KV4 perplexity (H100: 27.29 searched vs 27.04 at α = 0.5; CPU: 32.67 vs 32.65)
    smooth_attention_search: bool = False
    smooth_attention_alphas: tuple[float, ...] = DEFAULT_SMOOTH_ATTENTION_ALPHAS
    smooth_linear: bool = True  # down_proj
    smooth_o_proj: bool = True  # the paper variant also smooths o_proj's input
    # o_proj's smoothing factor also divides V (v_proj rows), which the KV4 cache quantizes:
    # score each candidate by o_proj's output error with V KV4-quantized (_smooth_o).  Off by
    # default: on SmolLM2-135M (H100, 40 windows) KV4 perplexity got worse with it — g128
    # 27.23 vs 27.04, per-channel 29.25 vs 28.86 (benchmarks/results/accuracy.md)
    kv4_aware_smoothing: bool = False
    # Calibrate each layer (its Hessians, and the outputs that feed the next layer) on what
    # the W4A8KV4 runtime computes: per-token INT8 inputs of every linear, KV4 keys (after
    # RoPE) and values in attention (_runtime_quant).  Off: float activations and KV
    # (GPTQ's sequential scheme as published).  On by default: on SmolLM2-135M (H100, 40
    # windows) g128 went 24.61 -> 24.45 (KV16) and 27.04 -> 26.89 (KV4), per-channel
    # 25.96 -> 25.88 and 28.86 -> 28.88 (benchmarks/results/accuracy.md).
    quantized_propagation: bool = True
    smooth_alphas: tuple[float, ...] = DEFAULT_SMOOTH_ALPHAS
    smooth_betas: tuple[float, ...] = DEFAULT_SMOOTH_BETAS
    smooth_tokens: int = 2048  # calibration tokens used by the smoothing search
    reorder: bool = True  # g128 only (a no-op for per-channel)
    clip: bool = True
    clip_steps: int = 80
    clip_min_ratio: float = 0.2
    gptq: bool = True
    gptq_damp: float = 0.01
    gptq_block: int = 128
    protective_range: int = fmt.DEFAULT_PROTECTIVE_RANGE
    calib_samples: int = 128
    calib_seqlen: int = 1024
    calib_seed: int = 0
    batch_size: int = 8
    device: str | None = None  # default: cuda if available, else cpu
    skip: tuple[str, ...] = ()  # linear modules left unquantized (format.module_matches)
    kv_cache_bits: int = 16  # recorded only
    progress: bool = True


@dataclass
class QuantResult:
    """What run_qoq produces; converters/recipe/cli.py writes it with converters/io.py."""

    group_size: int
    quantized: dict[str, dict[str, torch.Tensor]]  # prefix -> format tensors
    floats: dict[str, torch.Tensor]  # every other tensor (embeddings, norms, lm_head, biases)
    recipe: dict  # for config.json quantization_config["recipe"]
    report: list[dict] = field(default_factory=list)  # one row per quantized linear
    config_updates: dict = field(default_factory=dict)  # e.g. tie_word_embeddings False

    def summary(self) -> str:
        lines = [f"QoQ recipe, group_size {self.group_size}: " + ", ".join(
            f"{k}={v}" for k, v in self.recipe.items() if not isinstance(v, dict))]
        lines.append(f"{'layer':>5} {'linear':<16} {'rel.err RTN':>12} {'rel.err QoQ':>12} {'clip':>6}")
        for r in self.report:
            lines.append(
                f"{r['layer']:>5} {r['linear']:<16} {r['rel_err_rtn']:>12.3e} {r['rel_err']:>12.3e} "
                f"{r.get('clip_mean', 1.0):>6.3f}"
            )
        if self.report:
            g = lambda key: math.exp(sum(math.log(max(r[key], 1e-30)) for r in self.report) / len(self.report))  # noqa: E731
            lines.append(f"geomean relative output error: RTN {g('rel_err_rtn'):.3e} -> QoQ {g('rel_err'):.3e}")
        sa = [r["smooth"] for r in self.report if r["linear"] == "k_proj" and "kv4_err" in r.get("smooth", {})]
        if sa and all(x.get("kv4_err_none") for x in sa):
            tot = lambda key: sum(x[key] for x in sa)  # noqa: E731
            alphas = sorted({a for x in sa for a in x["alpha"]})
            half = (f", α=0.5 {tot('kv4_err_alpha_0.5') / tot('kv4_err_none'):.3f}"
                    if all(x.get("kv4_err_alpha_0.5") is not None for x in sa) else "")
            lines.append(f"SmoothAttention search: KV4 attention error vs none {tot('kv4_err') / tot('kv4_err_none'):.3f}"
                         f"{half}; α chosen from {alphas}")
        return "\n".join(lines)


# ----------------------------------------------------------------- helpers
class _Catch(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for layer 0 to capture its inputs, then stops the forward."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.captured: list[tuple[torch.Tensor, dict]] = []

    def __getattr__(self, name):  # e.g. Qwen2 reads decoder_layer.attention_type
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.layer, name)

    def forward(self, hidden_states, *args, **kwargs):
        self.captured.append((hidden_states, kwargs))
        raise _Catch


def _call_layer(layer, h, kwargs):
    out = layer(h, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _to(obj, device, dtype=None):
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device, dtype) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [B, H, T, d] with cos/sin [B, T, d] (the HF Llama/Qwen2 convention)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


def _a8_w4_error(x: torch.Tensor, w: torch.Tensor, y_ref: torch.Tensor, group_size: int, pr: int) -> float:
    """‖Q8(x)·Q4(w)ᵀ − y_ref‖² with the reference quantizers (per-token INT8, RTN W4)."""
    xq = fake_quantize_activation(x)
    wq = fmt.dequantize_weight(rtn_quantize(w, group_size, protective_range=pr), group_size, w.shape[1])
    return float(((xq @ wq.T) - y_ref).pow(2).sum())


# ------------------------------------------------------------------ main entry
def run_qoq(model, tokenizer, calib_texts, group_size: int, options: QoQOptions | None = None) -> QuantResult:
    """Apply the QoQ recipe to an HF Llama/Mistral/Qwen2 causal LM (in place) and quantize it.

    calib_texts: list of strings (tokenized and cut into windows here) or a
    ready [n, seqlen] int64 tensor of token ids.
    """
    opts = options or QoQOptions()
    if group_size not in fmt.SUPPORTED_GROUP_SIZES:
        raise ValueError(f"unsupported group_size {group_size}; use -1 or 128")
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.time()
    model.eval()
    model.config.use_cache = False
    nh, nkv, hd = T.head_dims(model)
    layers = T.decoder_layers(model)
    hidden = model.config.hidden_size
    reorder = opts.reorder and group_size == fmt.GROUP_SIZE_G128
    for li, layer in enumerate(layers):  # fail before any work if a layer cannot take the variant
        for name, lin in T.layer_linears(layer).items():
            full = f"model.layers.{li}.{name}"
            if not fmt.module_matches(full, list(opts.skip)):
                fmt.check_k(lin.in_features, group_size, full)

    if isinstance(calib_texts, torch.Tensor):
        ids = calib_texts.to(torch.int64)
    else:
        ids = calib.sample_windows(tokenizer, list(calib_texts), opts.calib_samples, opts.calib_seqlen, opts.calib_seed)

    recipe = {
        "name": "qoq",
        "rotation": bool(opts.rotation),
        "rotation_kind": "hadamard" + ("+random-signs" if opts.rotation_seed is not None else ""),
        "rotation_seed": opts.rotation_seed,
        "rotate_v_heads": bool(opts.rotation and opts.rotate_v_heads),
        "smooth_attention": bool(opts.smooth_attention),
        "smooth_attention_alpha": ("search" if opts.smooth_attention_search else opts.smooth_attention_alpha),
        "smooth_linear": bool(opts.smooth_linear),
        "smooth_o_proj": bool(opts.smooth_linear and opts.smooth_o_proj),
        "kv4_aware_smoothing": bool(opts.smooth_linear and opts.smooth_o_proj and opts.kv4_aware_smoothing),
        "reorder": bool(reorder),
        "clip": bool(opts.clip),
        "clip_steps": opts.clip_steps if opts.clip else 0,
        "gptq": bool(opts.gptq),
        "calib_samples": int(ids.shape[0]),
        "calib_seqlen": int(ids.shape[1]),
        "kv_cache_bits": opts.kv_cache_bits,
        "quantized_propagation": bool(opts.quantized_propagation),
    }
    result = QuantResult(group_size=group_size, quantized={}, floats={}, recipe=recipe)

    # --- 1. global part of the rotation: untie, fold the final norm, embeddings and lm_head
    R = None
    if opts.rotation:
        R = orthogonal_hadamard(hidden, opts.rotation_seed).to(device)
        T.untie_embeddings(model)
        result.config_updates["tie_word_embeddings"] = False
        for mod in (model.model.embed_tokens, model.lm_head, model.model.norm):
            mod.to(device)
        T.fold_final_norm(model)
        T.rotate_embeddings(model, R)
        T.rotate_lm_head(model, R)
        model.lm_head.to("cpu")
        model.model.norm.to("cpu")
    Rh = orthogonal_hadamard(hd, None).to(device) if (opts.rotation and opts.rotate_v_heads) else None

    # --- 2. capture the inputs of layer 0
    emb_dev = model.model.embed_tokens.weight.device
    model.model.embed_tokens.to(device)
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is not None:
        rotary.to(device)
    catcher = _Catcher(layers[0])
    layers[0] = catcher
    batches = []
    try:
        with torch.no_grad():
            for b in range(0, ids.shape[0], opts.batch_size):
                try:
                    model(ids[b : b + opts.batch_size].to(device), use_cache=False)
                except _Catch:
                    pass
    finally:
        layers[0] = catcher.layer
    model.model.embed_tokens.to(emb_dev)
    for h, kw in catcher.captured:
        kw = {k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        batches.append((h.to(torch.float32), _to(kw, device, torch.float32)))

    # --- 3. layer by layer
    it = range(len(layers))
    if opts.progress:
        it = tqdm(it, desc=f"QoQ g{group_size}", unit="layer")
    for li in it:
        layer = layers[li]
        orig_dtype = next(layer.parameters()).dtype
        layer.to(device=device, dtype=torch.float32)
        prefix = f"model.layers.{li}."
        if R is not None:
            T.fold_norms_layer(layer)
            T.rotate_layer(layer, R)
            if Rh is not None:
                T.rotate_v_heads(layer, Rh, nh, nkv)

        st = _collect_stats(layer, batches, nh, nkv, hd, opts.smooth_tokens)
        smooth_info = {}
        if opts.smooth_attention:
            if opts.smooth_attention_search:
                lam, smooth_info["k_proj"] = _search_smooth_attention(st, opts, nh, nkv, hd)
            else:
                lam = T.smooth_attention_scales(st["k"], st["q"], opts.smooth_attention_alpha, opts.smooth_attention_beta)
            T.apply_smooth_attention(layer, lam, nh, nkv)
        if reorder:
            perm = T.reorder_permutation(st["down_absmax"])
            T.apply_reorder_down(layer, perm)
            st["down_absmax"] = st["down_absmax"][perm]
            st["down_x"] = st["down_x"][:, perm]
        if opts.smooth_linear:
            smooth_info["down_proj"] = _smooth_down(layer, st, group_size, opts)
            if opts.smooth_o_proj:
                smooth_info["o_proj"] = _smooth_o(layer, st, group_size, opts, nh, nkv, hd)
        st.pop("attn", None)

        with _runtime_quant(layer, nkv, hd, opts.quantized_propagation):
            hess = _collect_hessians(layer, batches, device)
        for name, lin in T.layer_linears(layer).items():
            full = prefix + name
            if lin.bias is not None:
                result.floats[full + ".bias"] = lin.bias.detach().to("cpu", orig_dtype).clone()
            if fmt.module_matches(full, list(opts.skip)):
                continue
            w = lin.weight.detach().to(torch.float32)
            h = hess[name.split(".")[-1]]
            fmt.check_k(w.shape[1], group_size, full)
            rtn = rtn_quantize(w, group_size, protective_range=opts.protective_range)
            err_rtn = relative_error(w, fmt.dequantize_weight(rtn, group_size, w.shape[1]), h)
            ratio = None
            if opts.clip:
                ratio = clip_search(w, h, group_size, opts.clip_steps, opts.clip_min_ratio, opts.protective_range)
            if opts.gptq:
                q = gptq_quantize(w, h, group_size, ratio, opts.protective_range, opts.gptq_damp, opts.gptq_block)
            else:
                q = rtn_quantize(w, group_size, ratio, opts.protective_range)
            w_hat = fmt.dequantize_weight(q, group_size, w.shape[1])  # [N, K] (g128 padding dropped)
            row = {
                "layer": li,
                "linear": name.split(".")[-1],
                "rel_err_rtn": err_rtn,
                "rel_err": relative_error(w, w_hat, h),
                "clip_mean": float(ratio.mean()) if ratio is not None else 1.0,
            }
            if name.split(".")[-1] in smooth_info:
                row["smooth"] = smooth_info[name.split(".")[-1]]
            result.report.append(row)
            result.quantized[full] = {k: v.to("cpu") for k, v in q.items()}
            with torch.no_grad():
                lin.weight.data = w_hat.to(lin.weight.device, lin.weight.dtype)
        del hess

        # outputs of the quantized layer feed the next one
        with torch.no_grad(), _runtime_quant(layer, nkv, hd, opts.quantized_propagation):
            batches = [(_call_layer(layer, h, kw), kw) for h, kw in batches]
        layer.to(device="cpu", dtype=orig_dtype)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # --- 4. the float tensors (everything but the quantized linear weights)
    for name, t in model.state_dict().items():
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        if prefix in result.quantized or name in result.floats:
            continue
        result.floats[name] = t.detach().to("cpu").clone()
    if R is not None:
        model.model.embed_tokens.to(emb_dev)
    recipe["seconds"] = round(time.time() - t0, 1)
    return result


# ------------------------------------------------------------ calibration passes
@contextlib.contextmanager
def _runtime_quant(layer, nkv: int, hd: int, enabled: bool):
    """Within the block, `layer` computes as the W4A8KV4 runtime does: every linear's input
    per-token INT8 (fake-quantized with the reference quantizer), values KV4-quantized per
    token and KV head (v_proj output hook) and keys KV4-quantized after RoPE (the HF
    modules' `apply_rotary_pos_emb`, patched in the attention class's module for the
    duration).  The weights are whatever the layer holds (fake-quantized after step 3).
    """
    if not enabled:
        yield
        return

    def a8(_, args):
        return (fake_quantize_activation(args[0]),) + tuple(args[1:])

    def v_hook(_, __, out):
        return fake_quantize_kv4(out.view(*out.shape[:-1], nkv, hd)).view(out.shape)

    a = layer.self_attn
    mod = sys.modules[type(a).__module__]
    rope = getattr(mod, "apply_rotary_pos_emb", None)
    if rope is None:
        raise ValueError(f"quantized_propagation: {type(a).__name__}'s module has no apply_rotary_pos_emb to patch")

    def rope_kv4(q, k, *args, **kwargs):
        q, k = rope(q, k, *args, **kwargs)
        return q, fake_quantize_kv4(k)

    hooks = [lin.register_forward_pre_hook(a8) for lin in T.layer_linears(layer).values()]
    hooks.append(a.v_proj.register_forward_hook(v_hook))
    mod.apply_rotary_pos_emb = rope_kv4
    try:
        yield
    finally:
        mod.apply_rotary_pos_emb = rope
        for hk in hooks:
            hk.remove()


def _collect_stats(layer, batches, nh, nkv, hd, max_tokens: int) -> dict:
    """Post-RoPE q/k abs-max per channel, abs-max and token samples of o_proj/down_proj inputs."""
    a, m = layer.self_attn, layer.mlp
    st = {"k": None, "q": None, "o_absmax": None, "down_absmax": None, "o_x": [], "down_x": [], "attn": []}
    cur: dict = {}
    per_batch = max(1, max_tokens // max(1, len(batches)))

    def amax_into(key, val):
        st[key] = val if st[key] is None else torch.maximum(st[key], val)

    def hook_q(_, __, out):
        cur["q"] = out

    def hook_k(_, __, out):
        cur["k"] = out

    def hook_v(_, __, out):
        cur["v"] = out

    def sample(x):
        x = x.reshape(-1, x.shape[-1])
        step = max(1, x.shape[0] // per_batch)
        return x[::step][:per_batch].to(torch.float32)

    def pre_o(_, args):
        x = args[0]
        amax_into("o_absmax", x.abs().reshape(-1, x.shape[-1]).amax(0))
        st["o_x"].append(sample(x))

    def pre_down(_, args):
        x = args[0]
        amax_into("down_absmax", x.abs().reshape(-1, x.shape[-1]).amax(0))
        st["down_x"].append(sample(x))

    hooks = [
        a.q_proj.register_forward_hook(hook_q),
        a.k_proj.register_forward_hook(hook_k),
        a.v_proj.register_forward_hook(hook_v),
        a.o_proj.register_forward_pre_hook(pre_o),
        m.down_proj.register_forward_pre_hook(pre_down),
    ]
    try:
        with torch.no_grad():
            for h, kw in batches:
                _call_layer(layer, h, kw)
                cos, sin = kw["position_embeddings"]
                b, t, _ = cur["q"].shape
                q = _rope(cur["q"].view(b, t, nh, hd).transpose(1, 2), cos, sin)
                k = _rope(cur["k"].view(b, t, nkv, hd).transpose(1, 2), cos, sin)
                amax_into("k", k.abs().amax(dim=(0, 2)))  # [nkv, hd]
                qa = q.abs().amax(dim=(0, 2)).view(nkv, nh // nkv, hd).amax(1)
                amax_into("q", qa)
                # whole sequences for the SmoothAttention search (KV4 error needs causal attention)
                for i in range(b):
                    if sum(x[1].shape[1] for x in st["attn"]) >= max_tokens:
                        break
                    v = cur["v"][i].view(t, nkv, hd).transpose(0, 1)
                    st["attn"].append((q[i].float(), k[i].float(), v.float()))
    finally:
        for hk in hooks:
            hk.remove()
    st["o_x"] = torch.cat(st["o_x"])
    st["down_x"] = torch.cat(st["down_x"])
    return st


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Float causal attention [Hkv, G, T, D] of q [Hq, T, D], k/v [Hkv, T, D]."""
    return torch.einsum("hgts,hsd->hgtd", _causal_probs(q, k), v)


def _kv4_attention_error(q, k, v, lam, ref: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error per KV head of causal attention when the keys are smoothed by λ and
    KV4-quantized (per token and head, as the runtime does), against float attention.

    q [Hq, T, D], k/v [Hkv, T, D] post-RoPE; lam [Hkv, D]; ref: _attend(q, k, v) when the
    caller has it (it does not depend on λ).  With λ folded into the weights the runtime
    computes (q·λ)·deq(Q4(k/λ)) = q·(λ·deq(Q4(k/λ))); V is left in float so that the
    error measured is the one λ changes.
    """
    lam = lam.to(k.device, torch.float32)[:, None, :]
    k_hat = fake_quantize_kv4(k / lam) * lam
    if ref is None:
        ref = _attend(q, k, v)
    return (_attend(q, k_hat, v) - ref).pow(2).sum(dim=(1, 2, 3))


def _search_smooth_attention(st, opts, nh, nkv, hd) -> tuple[torch.Tensor, dict]:
    """λ [Hkv, D]: per KV head the α (of opts.smooth_attention_alphas) whose λ = max|K|^α
    gives the smallest KV4 attention-output error on the calibration sequences.

    The search is per KV head because heads are independent: λ of one head changes
    neither the inputs nor the quantization of another.  q_proj/k_proj rows are scaled by
    λ, which per-row weight quantization (per-channel and g128) does not see, so the KV4
    error is the only thing α trades.
    """
    alphas = tuple(opts.smooth_attention_alphas)
    lams = [T.smooth_attention_scales(st["k"], st["q"], a, opts.smooth_attention_beta if a else 0.0)
            for a in alphas]
    err = torch.zeros(len(alphas), nkv, dtype=torch.float64)
    for q, k, v in st["attn"]:
        ref = _attend(q, k, v)
        for i, lam in enumerate(lams):
            err[i] += _kv4_attention_error(q, k, v, lam, ref).double().cpu()
    best = err.argmin(0)  # [Hkv]
    lam = torch.stack([lams[int(b)][h] for h, b in enumerate(best)])
    ref = alphas.index(0.5) if 0.5 in alphas else None
    info = {
        "alpha": [alphas[int(b)] for b in best],
        "kv4_err": float(err[best, torch.arange(nkv)].sum()),
        "kv4_err_none": float(err[alphas.index(0.0)].sum()) if 0.0 in alphas else None,
        "kv4_err_alpha_0.5": float(err[ref].sum()) if ref is not None else None,
    }
    return lam, info


def _collect_hessians(layer, batches, device) -> dict[str, torch.Tensor]:
    """Input Hessians: one for q/k/v (shared input), o, gate/up (shared), down."""
    a, m = layer.self_attn, layer.mlp
    taps = {"q_proj": a.q_proj, "o_proj": a.o_proj, "gate_proj": m.gate_proj, "down_proj": m.down_proj}
    accs = {n: HessianAccumulator(lin.in_features, device) for n, lin in taps.items()}
    hooks = [
        lin.register_forward_pre_hook(lambda _, args, n=n: accs[n].add(args[0]))
        for n, lin in taps.items()
    ]
    try:
        with torch.no_grad():
            for h, kw in batches:
                _call_layer(layer, h, kw)
    finally:
        for hk in hooks:
            hk.remove()
    out = {n: acc.h for n, acc in accs.items()}
    out["k_proj"] = out["v_proj"] = out["q_proj"]
    out["up_proj"] = out["gate_proj"]
    return out


# ------------------------------------------------------------ smoothing searches
def _grid(opts):
    yield 0.0, 0.0  # identity (s = 1): smoothing never makes the calibration error worse
    for al in opts.smooth_alphas:
        for be in opts.smooth_betas:
            yield al, be


def _smooth_down(layer, st, group_size, opts) -> dict:
    m = layer.mlp
    w = m.down_proj.weight.detach().to(torch.float32)
    x = st["down_x"]
    y_ref = x @ w.T
    w_absmax = w.abs().amax(0)
    best = (float("inf"), 0.0, 0.0, None)
    for al, be in _grid(opts):
        s = T.smooth_scales(st["down_absmax"], w_absmax, al, be).to(torch.float32) if al or be else torch.ones_like(w_absmax)
        err = _a8_w4_error(x / s, w * s, y_ref, group_size, opts.protective_range)
        if err < best[0]:
            best = (err, al, be, s)
    _, al, be, s = best
    if al or be:
        T.apply_smooth_down(layer, s)
    return {"alpha": al, "beta": be}


def _causal_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Float causal softmax(q·kᵀ/√d) [Hkv, G, T, T] of q [Hq, T, D], k [Hkv, T, D]."""
    hkv, t, d = k.shape
    s = torch.einsum("hgtd,hsd->hgts", q.view(hkv, -1, t, d), k) / math.sqrt(d)
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    return s.masked_fill(mask, float("-inf")).softmax(-1)


def _o_proj_input(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """o_proj's input [T, Hq·D] = P·V per query head (head h reads KV head h // G)."""
    hkv, g, t, _ = p.shape
    return torch.einsum("hgts,hsd->thgd", p, v).reshape(t, -1)


def _smooth_o(layer, st, group_size, opts, nh, nkv, hd) -> dict:
    """Smoothing of o_proj's input, searched on the grid by o_proj's W4A8 output error.

    With kv4_aware_smoothing and calibration sequences, o_proj's input is recomputed per
    candidate as the runtime forms it: P·deq(Q4(V/s)) with V KV4-quantized per token and
    head after the division (s also divides v_proj's rows), so a factor that helps the
    weights but spreads V's range badly loses.  P is float attention of the calibration
    sequence (SmoothAttention does not change it).
    """
    a = layer.self_attn
    grp = nh // nkv
    w = a.o_proj.weight.detach().to(torch.float32)
    seqs = None
    if opts.kv4_aware_smoothing and st.get("attn"):
        seqs = [(_causal_probs(q, k), v) for q, k, v in st["attn"]]
        x = torch.cat([_o_proj_input(p, v) for p, v in seqs])
    else:
        x = st["o_x"]
    y_ref = x @ w.T
    x_absmax = st["o_absmax"].view(nkv, grp, hd).amax(1)
    w_absmax = w.abs().amax(0).view(nkv, grp, hd).amax(1)
    best = (float("inf"), 0.0, 0.0, None)
    for al, be in _grid(opts):
        if al or be:
            s_kv = T.smooth_scales(x_absmax.reshape(-1), w_absmax.reshape(-1), al, be).view(nkv, hd).to(torch.float32)
        else:
            s_kv = torch.ones(nkv, hd, device=w.device)
        s = s_kv.repeat_interleave(grp, dim=0).reshape(-1)
        if seqs is not None:
            xs = torch.cat([_o_proj_input(p, fake_quantize_kv4(v / s_kv[:, None, :])) for p, v in seqs])
        else:
            xs = x / s
        err = _a8_w4_error(xs, w * s, y_ref, group_size, opts.protective_range)
        if err < best[0]:
            best = (err, al, be, s_kv)
    _, al, be, s_kv = best
    if al or be:
        T.apply_smooth_o(layer, s_kv, nh, nkv)
    return {"alpha": al, "beta": be}


def options_from_dict(d: dict) -> QoQOptions:
    names = {f.name for f in dataclasses.fields(QoQOptions)}
    return QoQOptions(**{k: v for k, v in d.items() if k in names})
