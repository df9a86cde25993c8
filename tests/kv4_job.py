"""Run one vLLM LLM() in a fresh process and write what the KV4 tests compare.

    python tests/kv4_job.py SPEC.json OUT.json

SPEC: {"model": dir, "llm": {extra LLM(...) kwargs}, "prompts": [str],
       "max_tokens": int}.  OUT: per prompt the greedy token ids with their
logprobs and the prompt logprobs (teacher forced, so they stay comparable when
greedy paths diverge), plus what every Attention layer ran with
(impl class, kv_cache_dtype).  vLLM runs in-process (no engine-core
subprocess), so LLM.apply_model can look at the layers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _layers(model):
    out = []
    for name, mod in model.named_modules():
        impl = getattr(mod, "impl", None)
        if impl is not None and hasattr(mod, "kv_cache_dtype"):
            out.append([name, type(impl).__name__, str(mod.kv_cache_dtype)])
    return out


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams

    spec = json.loads(Path(spec_path).read_text())
    kwargs = dict(
        model=spec["model"],
        enforce_eager=True,
        gpu_memory_utilization=0.3,
        max_model_len=512,
        seed=0,
        dtype="float16",
    )
    kwargs.update(spec.get("llm", {}))
    llm = LLM(**kwargs)
    sp = SamplingParams(
        temperature=0.0, max_tokens=spec.get("max_tokens", 8), logprobs=1, prompt_logprobs=1,
        ignore_eos=True,
    )
    results = []
    for prompt in spec["prompts"]:  # one at a time: later prompts may hit the prefix cache
        (r,) = llm.generate([prompt], sp, use_tqdm=False)
        comp = r.outputs[0]
        results.append(
            {
                "prompt_token_ids": list(r.prompt_token_ids),
                "prompt_logprobs": [
                    None if lp is None else lp[tid].logprob
                    for tid, lp in zip(r.prompt_token_ids, r.prompt_logprobs)
                ],
                "token_ids": list(comp.token_ids),
                "logprobs": [lp[tid].logprob for tid, lp in zip(comp.token_ids, comp.logprobs)],
            }
        )
    layers = llm.apply_model(_layers)
    Path(out_path).write_text(json.dumps({"results": results, "layers": layers[0]}))


def run_job(spec: dict, workdir: Path, timeout: float = 240) -> dict:
    """Run one job in a subprocess; return its OUT (raises with the log tail on failure)."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path = workdir / "spec.json"
    out_path = workdir / "out.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env.update(
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_ALLOW_INSECURE_SERIALIZATION="1",
        VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        [sys.executable, __file__, str(spec_path), str(out_path)],
        env=env, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT),
    )
    (workdir / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not out_path.is_file():
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"vLLM job failed (rc {proc.returncode}):\n{tail}")
    return json.loads(out_path.read_text())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
