"""Import DeepCompressor fake-quant output (model.pt + scale.pt) into our format.

    python -m converters.importers.deepcompressor --model-pt model.pt --scale-pt scale.pt
        --config-dir BASE_HF_DIR --out OUT [--kv-bits 4|8|16] [--overwrite]

model.pt is a state dict of the dequantized (fake-quant) float weights with the
rotation and smoothing folded in; scale.pt holds, per quantized weight
``<name>`` (e.g. ``model.layers.0.mlp.down_proj.weight``; qoq.md §6):
  ``<name>.scale.0``      level-1 scale: per-channel s [N] (the 4-bit scale for
                          g-1; the INT8 level-1 scale s1 for g128)
  ``<name>.scale.1``      g128 only: level-2 integer scale s2 [N, K/128]
  ``<name>.zero``         pre-scale zero z (older): W = s*(u - z)
  ``<name>.scaled_zero``  post-scale zero (newer): W = s*u - zs  (g128: q8 = s2*u - zs)
Any broadcastable shape with the right number of elements is accepted.  g128
with K % 128 != 0 has ceil(K/128) groups, the last partial; it is stored
zero-padded (docs/format.md).
--config-dir gives config.json and the tokenizer (the base model's).

Every layer is verified numerically: the codes are recovered from model.pt's
weights (g128: q8 = round(W/s1) recovers the level-1 integers exactly) and the
layer rebuilt from our tensors must equal model.pt's weight within fp16
rounding.  Anything else (a different scale order or zero convention, e.g. the
2025 deepcompressor layout, or a post-scale g128 zero that is not a multiple of
its scale, which our integer-zero format cannot hold) is refused with a message.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from vllm_qoq import format as fmt

from .. import io
from .common import ImportError_, load_state_dict, norms_are_ones, write_ours

G = fmt.GROUP_SIZE_G128
REL_TOL = 2e-3  # of the row's max |W|: fp16 rounding of model.pt and of our fp16 szeros


def _vec(t: torch.Tensor, n: int, what: str) -> torch.Tensor:
    if t.numel() != n:
        raise ImportError_(f"{what}: expected {n} values, got shape {tuple(t.shape)}")
    return t.reshape(n).to(torch.float64)


def _mismatch(where: str, err: float, detail: str) -> ImportError_:
    if err == err:  # not NaN
        detail += f"; max relative error {err:.3g}"
    return ImportError_(
        f"{where}: scale.pt does not reconstruct model.pt's weight ({detail}): its scale order or zero convention differs from the documented one (e.g. "
        "the 2025 deepcompressor layout); refusing to import. Quantize the float model with "
        "`python -m converters.quantize --recipe qoq` instead"
    )


def _check_close(w: torch.Tensor, w_hat: torch.Tensor, where: str, detail: str) -> float:
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    err = float(((w_hat - w).abs() / scale).max())
    if err > REL_TOL:
        raise _mismatch(where, err, detail)
    return err


def import_channel(w: torch.Tensor, s0, zero, szero, where: str) -> tuple[dict, dict]:
    n, k = w.shape
    fmt.check_k(k, -1, where)
    s = _vec(s0, n, f"{where}.scale.0")
    w = w.to(torch.float64)
    if zero is not None:
        z = _vec(zero, n, f"{where}.zero")
        candidates = [("pre-scale zero", s * z)]
    else:
        zs = _vec(szero, n, f"{where}.scaled_zero")
        candidates = [("post-scale zero", zs), ("post-scale zero (negated)", -zs)]
    last = None
    for name, sz in candidates:
        u = torch.round((w + sz[:, None]) / s[:, None])
        if int(u.min()) < 0 or int(u.max()) > 15:
            last = _mismatch(where, float("nan"), f"{name}: codes outside 0..15")
            continue
        ours = {
            "qweight": fmt.pack_int4(u.to(torch.uint8)),
            "scales": s.to(torch.float16),
            "szeros": sz.to(torch.float16),
        }
        try:
            err = _check_close(w, fmt.dequantize_weight(ours, -1).double(), where, name)
        except ImportError_ as e:
            last = e
            continue
        return ours, {"zero": name, "max_rel_err": err}
    raise last


def import_g128(w: torch.Tensor, s0, s1, zero, szero, where: str) -> tuple[dict, dict]:
    n, k = w.shape
    fmt.check_k(k, G, where)
    # K % 128 != 0: ceil(K/128) groups, the last one partial; our layout stores it
    # zero-padded (weight 0 = code u = z), which the numeric checks below cover
    kp = fmt.padded_k(k, G)
    ng = kp // G
    s1_ = _vec(s0, n, f"{where}.scale.0").to(torch.float16)
    s2f = _vec(s1, n * ng, f"{where}.scale.1").reshape(n, ng)
    s2 = torch.round(s2f)
    if float((s2f - s2).abs().max()) > 1e-3 or int(s2.min()) < 1 or int(s2.max()) > 16:
        raise _mismatch(where, float("nan"), "level-2 scales are not integers in 1..16")
    w = fmt.pad_k(w.to(torch.float64), G)
    q8 = torch.round(w / s1_.double()[:, None])
    _check_close(w, s1_.double()[:, None] * q8, where, "level-1 values are not integers")
    if int(q8.min()) < -128 or int(q8.max()) > 127:
        raise _mismatch(where, float("nan"), "level-1 values outside INT8")
    q8g = q8.reshape(n, ng, G)
    if zero is not None:
        zc = [("pre-scale zero", _vec(zero, n * ng, f"{where}.zero").reshape(n, ng))]
    else:
        zs = _vec(szero, n * ng, f"{where}.scaled_zero").reshape(n, ng)
        if bool((torch.remainder(zs, s2) != 0).any()):
            raise ImportError_(
                f"{where}: post-scale level-2 zeros that are not multiples of the level-2 scale "
                "cannot be stored in vllm_qoq's format (integer zero z with q8 = s2*(u - z)); "
                "refusing to import — quantize the float model with `python -m converters.quantize "
                "--recipe qoq` instead"
            )
        zc = [("post-scale zero", zs / s2), ("post-scale zero (negated)", -zs / s2)]
    last = None
    for name, z in zc:
        if float((z - torch.round(z)).abs().max()) > 1e-6 or int(z.min()) < 0 or int(z.max()) > 15:
            last = _mismatch(where, float("nan"), f"{name}: zeros not integers in 0..15")
            continue
        u = q8g / s2[..., None] + z[..., None]
        if float((u - torch.round(u)).abs().max()) > 1e-6 or int(u.min()) < 0 or int(u.max()) > 15:
            last = _mismatch(where, float("nan"), f"{name}: level-1 values are not s2*(u - z) with u in 0..15")
            continue
        ours = {
            "qweight": fmt.pack_int4(torch.round(u).reshape(n, kp).to(torch.uint8)),
            "s1_scales": s1_,
            "s2_scales": s2.to(torch.uint8),
            "s2_zeros": torch.round(z).to(torch.uint8),
        }
        err = _check_close(w, fmt.dequantize_weight(ours, G).double(), where, name)
        return ours, {"zero": name, "max_rel_err": err}
    raise last


def import_deepcompressor(
    model_pt,
    scale_pt,
    config_dir,
    out_dir,
    kv_bits: int = 4,
    overwrite: bool = False,
) -> Path:
    cfg_dir = Path(config_dir)
    config = io.read_config(cfg_dir)
    io.check_architecture(config, cfg_dir)
    io.check_output(out_dir, cfg_dir, overwrite)
    sd = load_state_dict(Path(model_pt))
    scales = load_state_dict(Path(scale_pt))
    params = sorted({n[: -len(".scale.0")] for n in scales if n.endswith(".scale.0")})
    if not params:
        raise ImportError_(f"{scale_pt}: no '<name>.scale.0' entries: not a deepcompressor scale.pt")
    gs_seen, quantized, report = set(), {}, {}
    for p in params:
        key = p if p in sd else p + ".weight"
        if key not in sd:
            raise ImportError_(f"{scale_pt}: {p} has scales but model.pt has no tensor {p!r}")
        prefix = key[: -len(".weight")] if key.endswith(".weight") else key
        w = sd[key].to(torch.float32)
        if w.dim() != 2:
            raise ImportError_(f"{key}: expected a 2-D weight, got {tuple(w.shape)}")
        zero, szero = scales.get(f"{p}.zero"), scales.get(f"{p}.scaled_zero")
        if (zero is None) == (szero is None):
            raise ImportError_(f"{p}: scale.pt must hold exactly one of '.zero' and '.scaled_zero'")
        if f"{p}.scale.1" in scales:
            ours, info = import_g128(w, scales[f"{p}.scale.0"], scales[f"{p}.scale.1"], zero, szero, prefix)
            gs_seen.add(G)
        else:
            ours, info = import_channel(w, scales[f"{p}.scale.0"], zero, szero, prefix)
            gs_seen.add(-1)
        quantized[prefix] = ours
        report[prefix] = info
        del sd[key]
    if len(gs_seen) != 1:
        raise ImportError_(f"{scale_pt}: mixes per-channel and g128 layers; one checkpoint holds one variant")
    gs = gs_seen.pop()
    recipe = {"name": "deepcompressor-import", "rotation": norms_are_ones(sd),
              "zero_point_source": sorted({r["zero"] for r in report.values()})}
    return write_ours(out_dir, cfg_dir, config, quantized, sd, gs, kv_bits, recipe, overwrite,
                      protective_range=120 if szero is not None else fmt.DEFAULT_PROTECTIVE_RANGE,
                      report={"group_size": gs, "layers": report})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m converters.importers.deepcompressor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-pt", required=True)
    p.add_argument("--scale-pt", required=True)
    p.add_argument("--config-dir", required=True, help="base HF model dir (config.json, tokenizer)")
    p.add_argument("--out", required=True)
    p.add_argument("--kv-bits", type=int, choices=fmt.SUPPORTED_KV_BITS, default=4)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    return io.run_cli(
        lambda: import_deepcompressor(
            a.model_pt, a.scale_pt, a.config_dir, a.out, a.kv_bits, a.overwrite
        ),
        (ValueError,),
    )


if __name__ == "__main__":
    sys.exit(main())
