"""A tiny random Llama (+ a small BPE tokenizer) for tests and the CPU demo.

Built offline from the calibration text in ../shared/data (no hub access): the
tokenizer is a byte-level BPE trained on it, the weights are random but
deterministic.  Shapes exercise both variants: hidden 256 and intermediate 768
are multiples of 128 (g128), head_dim 64, GQA 4:2.  `tiny_llama_k576_dir` has
SmolLM2-135M's layer shapes instead (hidden 576, intermediate 1536, 9 heads /
3 KV heads of 64): g128 must pad K = 576 of q/k/v/o/gate/up to 640.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "sotu" / "sotu_calib_1934_2000.jsonl"


def _texts(path: Path, limit_chars: int = 400_000) -> list[str]:
    out, n = [], 0
    with open(path) as f:
        for line in f:
            page = json.loads(line).get("page", "")
            out.append(page)
            n += len(page)
            if n >= limit_chars:
                break
    return out


def build_tokenizer(out_dir: Path, text_path: Path = DEFAULT_TEXT, vocab_size: int = 2048):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_texts(text_path), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(str(out_dir))
    return fast


SMOLLM2_SHAPES = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
                  "num_key_value_heads": 3, "head_dim": 64}


def build_tiny_llama(
    out_dir: str | os.PathLike, seed: int = 0, init_std: float = 0.08, shapes: dict | None = None
) -> Path:
    """Write a tiny random LlamaForCausalLM (fp16) with tokenizer to out_dir (atomic).

    shapes overrides the layer sizes (LlamaConfig fields), e.g. SMOLLM2_SHAPES.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tokenizer = build_tokenizer(tmp)
        sizes = dict(hidden_size=256, intermediate_size=768, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=64)
        sizes.update(shapes or {})
        cfg = LlamaConfig(
            vocab_size=len(tokenizer),
            num_hidden_layers=2,
            **sizes,
            max_position_embeddings=2048,
            rms_norm_eps=1e-5,
            initializer_range=init_std,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
            torch_dtype="float16",
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).to(torch.float16)
        model.save_pretrained(str(tmp), safe_serialization=True)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def tiny_llama_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Get-or-build the cached tiny Llama (default cache: <repo>/.cache/tiny-llama)."""
    cache = Path(cache_dir) if cache_dir else ROOT / ".cache"
    cache.mkdir(parents=True, exist_ok=True)
    d = cache / "tiny-llama"
    if not (d / "config.json").is_file():
        build_tiny_llama(d)
    return d


def tiny_llama_k576_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Get-or-build the cached tiny Llama with SmolLM2's layer shapes (<cache>/tiny-llama-k576)."""
    cache = Path(cache_dir) if cache_dir else ROOT / ".cache"
    cache.mkdir(parents=True, exist_ok=True)
    d = cache / "tiny-llama-k576"
    if not (d / "config.json").is_file():
        build_tiny_llama(d, shapes=SMOLLM2_SHAPES)
    return d
