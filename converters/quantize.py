"""Quantize a Hugging Face model (Llama, Mistral, Qwen2 families) to vllm_qoq's format.

    python -m converters.quantize --model IN_DIR --out OUT_DIR [--group-size -1|128]
        [--recipe rtn|qoq] [--kv-bits 4|8|16] [--skip NAME ...] [--fake-quant]

g128 takes any input size K: it is stored zero-padded to a multiple of 128
(docs/format.md).  --recipe rtn (default) streams the checkpoint tensor by tensor with
round-to-nearest (no calibration, little memory).  --recipe qoq runs the full
QoQ recipe (converters/recipe, docs/recipe.md).  --fake-quant writes the
dequantized weights as an ordinary unquantized checkpoint instead: the float
model that the quantized one approximates (used for accuracy references).
The input is never modified and the output appears atomically (converters/io.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from vllm_qoq import format as fmt
from vllm_qoq.reference.quantize import quantize_weight

from . import io


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m converters.quantize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="input HF model directory (fp16/bf16/fp32)")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--group-size", type=int, default=128, choices=fmt.SUPPORTED_GROUP_SIZES,
                   help="-1: per-channel; 128: progressive g128 (default)")
    p.add_argument("--recipe", choices=("rtn", "qoq"), default="rtn")
    p.add_argument("--kv-bits", type=int, default=16, choices=fmt.SUPPORTED_KV_BITS,
                   help="KV cache bits recorded in the config (4 selects the KV4 backend)")
    p.add_argument("--skip", nargs="*", default=[], metavar="NAME",
                   help="linear modules to leave unquantized (full path or last components, "
                        "e.g. 'down_proj' or 'model.layers.0.mlp.down_proj')")
    p.add_argument("--protective-range", type=int, default=fmt.DEFAULT_PROTECTIVE_RANGE)
    p.add_argument("--fake-quant", action="store_true",
                   help="write dequantized float weights (an unquantized checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--calib", default=None, help="(qoq recipe) calibration text file/jsonl")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=1024)
    p.add_argument("--device", default=None, help="(qoq recipe) cuda or cpu; default: cuda if present")
    p.add_argument("--no-smooth-attention", action="store_true")
    p.add_argument("--no-rotation", action="store_true")
    p.add_argument("--no-gptq", action="store_true")
    from .recipe.cli import add_recipe_arguments

    return add_recipe_arguments(p)


def _float_dtype(config: dict, src: torch.dtype) -> torch.dtype:
    """Dtype for tensors kept in float: fp32 sources become fp16 (vLLM serves fp16/bf16)."""
    if src in (torch.float16, torch.bfloat16):
        return src
    return io.config_float_dtype(config)


def convert_rtn(args) -> Path:
    src = Path(args.model)
    config = io.read_config(src)
    io.check_architecture(config, src)
    gs = args.group_size
    total = io.count_tensors(src)
    recipe = {"name": "rtn", "rotation": False, "smooth_attention": False,
              "smooth_linear": False, "reorder": False, "clip": False, "gptq": False}
    with io.CheckpointWriter(args.out, src, args.overwrite) as w:
        for name, t in tqdm(io.iter_tensors(src), total=total, desc="quantize (rtn)", unit="tensor"):
            prefix = io.linear_prefix(name)
            if t.is_floating_point():
                out_dtype = _float_dtype(config, t.dtype)
            if prefix is None or fmt.module_matches(prefix, args.skip):
                w.add(name, t.to(out_dtype) if t.is_floating_point() else t)
                continue
            if t.dim() != 2:
                raise io.ConversionError(f"{src}: {name} has shape {tuple(t.shape)}, expected 2-D")
            try:
                fmt.check_k(t.shape[1], gs, prefix)
            except ValueError as e:
                raise io.ConversionError(f"{src}: {e}") from None
            q = quantize_weight(t, gs)
            if args.fake_quant:
                # the float weight the checkpoint represents: [N, K] (g128 drops its K padding)
                w.add(name, fmt.dequantize_weight(q, gs, t.shape[1]).to(out_dtype))
            else:
                for suffix, qt in q.items():
                    w.add(f"{prefix}.{suffix}", qt)
        out_config = dict(config)
        if args.fake_quant:
            out_config["vllm_qoq_fake_quant"] = {"group_size": gs, "recipe": recipe}
        else:
            out_config["quantization_config"] = io.quantization_config(
                gs, args.kv_bits, args.skip, recipe, args.protective_range
            )
        if config.get("torch_dtype") == "float32" or config.get("dtype") == "float32":
            out_config["torch_dtype"] = "float16"
        return w.commit(out_config)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.recipe == "rtn":
        return io.run_cli(lambda: convert_rtn(args))
    from .recipe.cli import convert_qoq

    return io.run_cli(lambda: convert_qoq(args))


if __name__ == "__main__":
    sys.exit(main())
