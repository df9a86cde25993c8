"""Checkpoint I/O for the converters: read HF checkpoints, write ours atomically.

Rules every converter follows (README "Converters"):
  * the input is never modified; the output may not be the input or lie inside it;
  * output is written into a temporary sibling directory and renamed into place
    only when complete, so an interrupted run leaves no half-written model;
  * an existing output directory is refused unless overwrite=True, and even then
    it is replaced only after the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from vllm_qoq import format as fmt

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Files copied from the source model next to the weights.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)
SHARD_BYTES = 2 * 1024**3


class ConversionError(ValueError):
    """Bad input for a converter; the message names the file and the fix."""


def run_cli(convert, errors: tuple[type[Exception], ...] = ()) -> int:
    """Run a converter's `convert()`: print where it wrote, or the error; exit status 0/2."""
    try:
        out = convert()
    except (ConversionError, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def read_config(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(
            f"{path}: not found; --model must be a Hugging Face model directory "
            "(config.json + *.safetensors)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: invalid JSON ({e})") from e


def config_float_dtype(config: dict) -> torch.dtype:
    """fp16 or bf16 as config.json names it (vLLM serves those; fp32 and unset mean fp16)."""
    name = str(config.get("torch_dtype") or config.get("dtype") or "float16")
    return torch.bfloat16 if "bfloat16" in name else torch.float16


def check_architecture(config: dict, model_dir) -> str:
    archs = config.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(
            f"{Path(model_dir) / 'config.json'}: architecture {arch!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if config.get("quantization_config"):
        qm = config["quantization_config"].get("quant_method")
        raise ConversionError(
            f"{Path(model_dir) / 'config.json'}: the model is already quantized "
            f"(quant_method={qm!r}); start from the unquantized (fp16/bf16) model"
        )
    return arch


def weight_files(model_dir: str | os.PathLike) -> list[Path]:
    d = Path(model_dir)
    files = sorted(d.glob("*.safetensors"))
    if files:
        return files
    files = sorted(d.glob("pytorch_model*.bin"))
    if files:
        return files
    raise ConversionError(f"{d}: no *.safetensors or pytorch_model*.bin weight files found")


def count_tensors(model_dir) -> int:
    from safetensors import safe_open

    n = 0
    for f in weight_files(model_dir):
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as sf:
                n += len(list(sf.keys()))
        else:
            n += len(torch.load(f, map_location="cpu", weights_only=True))
    return n


def iter_tensors(model_dir) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time (safetensors are memory-mapped, not all loaded)."""
    from safetensors import safe_open

    for f in weight_files(model_dir):
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    yield name, sf.get_tensor(name)
        else:
            for name, t in torch.load(f, map_location="cpu", weights_only=True).items():
                yield name, t


def linear_prefix(name: str) -> str | None:
    """'model.layers.3.self_attn.q_proj.weight' -> 'model.layers.3.self_attn.q_proj' (else None)."""
    if not name.endswith(".weight") or ".layers." not in name:
        return None
    prefix = name[: -len(".weight")]
    return prefix if prefix.split(".")[-1] in LINEAR_NAMES else None


def quantization_config(
    group_size: int,
    kv_cache_bits: int,
    modules_to_not_convert: list[str],
    recipe: dict,
    protective_range: int = fmt.DEFAULT_PROTECTIVE_RANGE,
) -> dict:
    cfg = {
        "quant_method": fmt.QUANT_METHOD,
        "format_version": fmt.FORMAT_VERSION,
        "weight_bits": 4,
        "group_size": group_size,
        "act_bits": 8,
        "kv_cache_bits": kv_cache_bits,
        "zero_point": "post_scale",
        "modules_to_not_convert": list(modules_to_not_convert),
        "recipe": recipe,
    }
    if group_size == fmt.GROUP_SIZE_G128:
        cfg["protective_range"] = protective_range
        cfg["k_padding"] = fmt.K_PADDING  # K stored zero-padded to a multiple of 128
    return cfg


def check_output(out_dir, src_dir, overwrite: bool) -> Path:
    out = Path(out_dir).resolve()
    src = Path(src_dir).resolve()
    if out == src or src in out.parents:
        raise ConversionError(
            f"{out}: the output may not be the input model directory or lie inside it; "
            "choose another --out"
        )
    if out.exists() and not overwrite:
        raise ConversionError(f"{out}: already exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


class CheckpointWriter:
    """Collects tensors into safetensors shards inside a temporary sibling directory.

    Use as a context manager; `commit()` renames the directory into place.  An
    exception (or not calling commit) removes the temporary directory.
    """

    def __init__(self, out_dir, src_dir, overwrite: bool = False) -> None:
        self.out = check_output(out_dir, src_dir, overwrite)
        self.src = Path(src_dir)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        self._shard: dict[str, torch.Tensor] = {}
        self._shard_bytes = 0
        self._files: list[tuple[str, list[str]]] = []
        self._done = False

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        self._shard[name] = t
        self._shard_bytes += t.numel() * t.element_size()
        if self._shard_bytes >= SHARD_BYTES:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._shard:
            return
        fname = f"model-{len(self._files) + 1:05d}.safetensors"
        save_file(self._shard, str(self.tmp / fname), metadata={"format": "pt"})
        self._files.append((fname, list(self._shard)))
        self._shard, self._shard_bytes = {}, 0

    def commit(self, config: dict, extra_files: dict[str, str] | None = None) -> Path:
        self._flush()
        # Single shard: the conventional name; several: an index.
        if len(self._files) == 1:
            os.rename(self.tmp / self._files[0][0], self.tmp / "model.safetensors")
        else:
            weight_map = {n: f for f, names in self._files for n in names}
            (self.tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2)
            )
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in SIDE_FILES:
            if (self.src / name).is_file():
                shutil.copy2(self.src / name, self.tmp / name)
        for name, text in (extra_files or {}).items():
            (self.tmp / name).write_text(text)
        old = None
        if self.out.exists():  # overwrite=True: keep the old one until the new is in place
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._done = True
        return self.out
