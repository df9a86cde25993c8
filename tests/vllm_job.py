"""Run vLLM jobs in a fresh process and write the results as JSON.

    python tests/vllm_job.py JOBS.json OUT.json

JOBS.json is a list of jobs, run one after another in this process:
    {"name": str, "model": path, "llm": {LLM kwargs},
     "prompts": [str, ...]                     (optional)
     "max_tokens": int, "logprobs": int,       (greedy generation)
     "ppl_token_windows": [[int, ...], ...]}   (optional: perplexity windows)
OUT.json maps name -> {"outputs": [{"text", "token_ids", "logprobs": [{tok: lp}]}],
                       "nll": float, "ntok": int, "seconds": float}
Tests use it (vLLM's CPU engine wants a __main__ guard and a process of its own);
it is also handy on the GPU machine.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

# One engine step on a slow 2-core CPU (a 3k-token perplexity batch through the
# reference ops) may take minutes; vLLM's default RPC limit (300 s) would kill it.
# The calling test bounds the whole job instead.
os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "1200")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root


def run_job(job: dict) -> dict:
    from vllm import LLM, SamplingParams

    from converters.ppl import prompt_nll
    from vllm.inputs import TokensPrompt

    t0 = time.time()
    kwargs = {"gpu_memory_utilization": 0.3, "max_model_len": 1024, "seed": 0}
    kwargs.update(job.get("llm", {}))
    llm = LLM(model=job["model"], **kwargs)
    res: dict = {"startup_seconds": time.time() - t0}
    if job.get("prompts"):
        sp = SamplingParams(
            temperature=0.0, max_tokens=job.get("max_tokens", 8), logprobs=job.get("logprobs", 5)
        )
        outs = llm.generate(job["prompts"], sp, use_tqdm=False)
        res["outputs"] = [
            {
                "text": o.outputs[0].text,
                "token_ids": list(o.outputs[0].token_ids),
                "logprobs": [
                    {str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs
                ],
            }
            for o in outs
        ]
    windows = job.get("ppl_token_windows")
    if windows:
        sp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], sp, use_tqdm=False)
        res["nll"], res["ntok"] = prompt_nll(windows, outs)
    res["seconds"] = time.time() - t0
    del llm
    gc.collect()
    return res


def main() -> int:
    jobs = json.load(open(sys.argv[1]))
    results = {}
    for job in jobs:
        results[job["name"]] = run_job(job)
        json.dump(results, open(sys.argv[2], "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
