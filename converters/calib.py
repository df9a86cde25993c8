"""Calibration text for the QoQ recipe.

Sources (``load_texts``):
  * None: ../shared/data/sotu/sotu_calib_1934_2000.jsonl (State of the Union
    addresses 1934-2000, public domain; no overlap with the evaluation text);
  * a ``.jsonl`` file: one JSON object per line, text in "page" or "text";
  * any other file: plain text (documents separated by blank lines);
  * ``hf:NAME[:CONFIG[:SPLIT]]``: a Hugging Face dataset (needs `datasets` and
    network or a local HF cache), text column "text" (or the first string column).
``sample_windows`` turns texts into [n, seqlen] token windows the GPTQ way:
concatenate, tokenize, and cut n windows at deterministic random offsets.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CALIB = REPO_ROOT.parent / "shared" / "data" / "sotu" / "sotu_calib_1934_2000.jsonl"


def load_texts(source: str | Path | None = None, max_chars: int | None = None) -> list[str]:
    """Texts from a file, an HF dataset (hf:...) or the default calibration file."""
    src = DEFAULT_CALIB if source is None else source
    texts: list[str] = []
    if isinstance(src, str) and src.startswith("hf:"):
        texts = _hf_texts(src[3:])
    else:
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(
                f"calibration source {path} not found (give a .jsonl/.txt file or hf:NAME[:CONFIG[:SPLIT]])"
            )
        if path.suffix == ".jsonl":
            with open(path) as f:
                for i, line in enumerate(f):
                    if not line.strip():
                        continue
                    obj = json.loads(line)
                    text = obj.get("page", obj.get("text")) if isinstance(obj, dict) else None
                    if not isinstance(text, str):
                        raise ValueError(f"{path}:{i + 1}: expected a JSON object with a 'page' or 'text' string")
                    texts.append(text)
        else:
            texts = [t for t in path.read_text().split("\n\n") if t.strip()]
    if max_chars is not None:
        out, n = [], 0
        for t in texts:
            if n >= max_chars:
                break
            out.append(t)
            n += len(t)
        texts = out
    if not texts:
        raise ValueError(f"calibration source {src} holds no text")
    return texts


def _hf_texts(spec: str) -> list[str]:
    parts = spec.split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 else "train"
    import datasets  # optional dependency

    ds = datasets.load_dataset(name, config, split=split)
    col = "text" if "text" in ds.column_names else next(
        c for c in ds.column_names if isinstance(ds[0][c], str)
    )
    return [t for t in ds[col] if t and t.strip()]


def sample_windows(
    tokenizer, texts: list[str], n_samples: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """[n_samples, seqlen] int64 token windows at deterministic random offsets."""
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"]
        ids.append(tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)
        if len(ids) >= 4 * n_samples * seqlen:  # enough to draw from
            break
    if len(ids) < seqlen:
        raise ValueError(
            f"calibration text has {len(ids)} tokens, fewer than one window of {seqlen}; "
            "give more text or a smaller --calib-seqlen"
        )
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(ids) - seqlen + 1) for _ in range(n_samples)]
    return torch.tensor([ids[s : s + seqlen] for s in starts], dtype=torch.int64)
