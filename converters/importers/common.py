"""Shared pieces of the importers: reading foreign state dicts, writing ours."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vllm_qoq import format as fmt

from .. import io

LINEARS = io.LINEAR_NAMES


class ImportError_(io.ConversionError):
    """Input that cannot be imported faithfully; the message says why and what to do."""


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A .bin/.pt (torch.save'd dict) or .safetensors file, or a directory of them."""
    path = Path(path)
    if path.is_dir():
        sd: dict[str, torch.Tensor] = {}
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
        if not files:
            raise ImportError_(f"{path}: no *.safetensors or pytorch_model*.bin files")
        for f in files:
            sd.update(load_state_dict(f))
        return sd
    if not path.is_file():
        raise ImportError_(f"{path}: not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ImportError_(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    return obj


def linear_prefixes(names) -> list[str]:
    """Distinct '<...>.layers.<i>.<...>.<q_proj|...>' prefixes among tensor names."""
    out = set()
    for n in names:
        parts = n.split(".")
        for i, p in enumerate(parts):
            if p in LINEARS and ".layers." in n:
                out.add(".".join(parts[: i + 1]))
                break
    return sorted(out)


def norms_are_ones(sd: dict[str, torch.Tensor]) -> bool:
    norms = [t for n, t in sd.items() if "norm" in n and n.endswith(".weight")]
    return bool(norms) and all(bool((t.float() == 1).all()) for t in norms)


def float_dtype(config: dict) -> torch.dtype:
    name = str(config.get("torch_dtype") or config.get("dtype") or "float16")
    return torch.bfloat16 if "bfloat16" in name else torch.float16


def write_ours(
    out_dir,
    src_dir,
    config: dict,
    quantized: dict[str, dict[str, torch.Tensor]],
    floats: dict[str, torch.Tensor],
    group_size: int,
    kv_bits: int,
    recipe: dict,
    overwrite: bool = False,
    protective_range: int = fmt.DEFAULT_PROTECTIVE_RANGE,
    report: dict | None = None,
) -> Path:
    """Validate every layer and write the checkpoint atomically (converters/io.py)."""
    for prefix, q in quantized.items():
        fmt.validate_layer(q, group_size, prefix)
    cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    dt = float_dtype(cfg)
    if "lm_head.weight" in floats and "model.embed_tokens.weight" in floats:
        if not torch.equal(floats["lm_head.weight"], floats["model.embed_tokens.weight"]):
            cfg["tie_word_embeddings"] = False
    cfg["quantization_config"] = io.quantization_config(
        group_size, kv_bits, [], recipe, protective_range
    )
    extra = {"qoq_import_report.json": json.dumps(report or {}, indent=1) + "\n"}
    with io.CheckpointWriter(out_dir, src_dir, overwrite) as w:
        for prefix, q in quantized.items():
            for suffix, t in q.items():
                w.add(f"{prefix}.{suffix}", t)
        for name, t in floats.items():
            w.add(name, t.to(dt) if t.is_floating_point() else t)
        return w.commit(cfg, extra)
