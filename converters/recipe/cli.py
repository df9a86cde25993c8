"""`--recipe qoq` of converters/quantize.py: HF model -> QoQ recipe -> our checkpoint.

    python -m converters.quantize --model IN --out OUT --recipe qoq --group-size -1|128
        [--kv-bits 4|8|16] [--calib FILE|hf:NAME[:CONFIG[:SPLIT]]] [--calib-samples 128]
        [--calib-seqlen 1024] [--device cuda|cpu] [--no-rotation] [--no-smooth-attention]
        [--no-gptq] [--skip NAME ...] [--fake-quant] [--overwrite]
    python -m converters.recipe.cli ...   # the same, plus every recipe knob (--help)

The model is loaded on the CPU (float32 when computing on the CPU, its own
dtype otherwise) and processed one decoder layer at a time on --device.  The
output is written atomically by converters/io.py; next to the weights,
qoq_report.json records what was applied and the per-layer errors, which are
also printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .. import calib, io
from .pipeline import QoQOptions, run_qoq

# Extra knobs (the ones converters/quantize.py's parser does not define).
_EXTRA = [
    (("--no-smooth-linear",), dict(action="store_true", help="no SmoothQuant-style smoothing of down_proj/o_proj inputs")),
    (("--no-smooth-o-proj",), dict(action="store_true", help="smooth down_proj only (not o_proj)")),
    (("--no-reorder",), dict(action="store_true", help="no activation-aware channel reordering (g128)")),
    (("--no-clip",), dict(action="store_true", help="no clipping search")),
    (("--clip-steps",), dict(type=int, default=80, help="clipping grid steps from 1.0 down to 0.2 (default 80)")),
    (("--rotate-v-heads",), dict(action="store_true", help="also a per-head Hadamard on v_proj/o_proj")),
    (("--rotation-seed",), dict(type=int, default=0, help="seed of the random Hadamard signs (-1: none)")),
    (("--smooth-attention-alpha",), dict(type=float, default=0.5,
                                         help="SmoothAttention exponent: λ = max|K|^α (default 0.5, the paper's)")),
    (("--smooth-attention-search",), dict(action="store_true",
                                          help="pick α per KV head by the KV4 attention error on calibration text")),
    (("--float-propagation",), dict(action="store_true",
                                    help="calibrate each layer on float activations and KV (GPTQ's sequential scheme) "
                                         "instead of INT8 activations and a KV4 cache as the runtime computes them")),
    (("--kv4-aware-smoothing",), dict(action="store_true",
                                      help="score o_proj smoothing with V KV4-quantized (o_proj's factor divides V)")),
    (("--smooth-tokens",), dict(type=int, default=2048, help="tokens used by the smoothing search")),
    (("--batch-size",), dict(type=int, default=8, help="calibration samples per forward")),
]


def add_recipe_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the recipe knobs that `p` does not define yet."""
    have = {s for a in p._actions for s in a.option_strings}
    for flags, kw in _EXTRA:
        if not set(flags) & have:
            p.add_argument(*flags, **kw)
    return p


def options_from_args(args) -> QoQOptions:
    g = lambda name, default: getattr(args, name, default)  # noqa: E731
    device = g("device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    seed = g("rotation_seed", 0)
    return QoQOptions(
        rotation=not g("no_rotation", False),
        rotation_seed=None if seed is not None and seed < 0 else seed,
        rotate_v_heads=g("rotate_v_heads", False),
        smooth_attention=not g("no_smooth_attention", False),
        smooth_attention_alpha=g("smooth_attention_alpha", 0.5),
        smooth_attention_search=g("smooth_attention_search", False),
        kv4_aware_smoothing=g("kv4_aware_smoothing", False),
        quantized_propagation=not g("float_propagation", False),
        smooth_linear=not g("no_smooth_linear", False),
        smooth_o_proj=not g("no_smooth_o_proj", False),
        smooth_tokens=g("smooth_tokens", 2048),
        reorder=not g("no_reorder", False),
        clip=not g("no_clip", False),
        clip_steps=g("clip_steps", 80),
        gptq=not g("no_gptq", False),
        protective_range=g("protective_range", 119),
        calib_samples=g("calib_samples", 128),
        calib_seqlen=g("calib_seqlen", 1024),
        batch_size=g("batch_size", 8),
        device=device,
        skip=tuple(g("skip", []) or []),
        kv_cache_bits=g("kv_bits", 16),
    )


def convert_qoq(args) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(args.model)
    config = io.read_config(src)
    io.check_architecture(config, src)
    io.check_output(args.out, src, getattr(args, "overwrite", False))  # fail before the long part
    opts = options_from_args(args)
    gs = args.group_size
    out_dtype = io.config_float_dtype(config)
    load_dtype = torch.float32 if opts.device == "cpu" else out_dtype
    try:
        texts = calib.load_texts(getattr(args, "calib", None))
    except (FileNotFoundError, ValueError) as e:
        raise io.ConversionError(str(e)) from None
    print(f"loading {src} ({load_dtype}) ...", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=load_dtype)
    try:
        res = run_qoq(model, tok, texts, gs, opts)
    except ValueError as e:  # e.g. a K that g128 cannot take, an unsupported Hadamard size
        raise io.ConversionError(f"{src}: {e}") from None

    out_config = dict(config)
    out_config.update(res.config_updates)
    if "torch_dtype" in out_config or "dtype" not in out_config:
        out_config["torch_dtype"] = str(out_dtype).replace("torch.", "")
    if "dtype" in out_config:
        out_config["dtype"] = str(out_dtype).replace("torch.", "")
    report = {"recipe": res.recipe, "group_size": gs, "layers": res.report}
    with io.CheckpointWriter(args.out, src, getattr(args, "overwrite", False)) as w:
        if getattr(args, "fake_quant", False):
            # the model holds the rotated/smoothed, fake-quantized float weights
            for name, t in model.state_dict().items():
                w.add(name, t.to(out_dtype) if t.is_floating_point() else t)
            out_config["vllm_qoq_fake_quant"] = {"group_size": gs, "recipe": res.recipe}
        else:
            for prefix, q in res.quantized.items():
                for suffix, t in q.items():
                    w.add(f"{prefix}.{suffix}", t)
            for name, t in res.floats.items():
                w.add(name, t.to(out_dtype) if t.is_floating_point() else t)
            out_config["quantization_config"] = io.quantization_config(
                gs, opts.kv_cache_bits, list(opts.skip), res.recipe, opts.protective_range
            )
        out = w.commit(out_config, {"qoq_report.json": json.dumps(report, indent=1) + "\n"})
    print(res.summary())
    return out


def main(argv: list[str] | None = None) -> int:
    from .. import quantize

    p = add_recipe_arguments(quantize.build_parser())
    p.prog = "python -m converters.recipe.cli"
    args = p.parse_args(argv)
    args.recipe = "qoq"
    return io.run_cli(lambda: convert_qoq(args))


if __name__ == "__main__":
    sys.exit(main())
