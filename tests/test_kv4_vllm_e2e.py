"""vLLM (CPU) end to end with the KV4 backend: auto-selected and requested.

Four LLM() runs of a tiny random Llama (head_dim 64, GQA 4:2), each in its own
process (tests/kv4_job.py), with block_size 16, chunked prefill in 48-token
chunks and prefix caching on, two prompts sharing a 5-block prefix:

  A  unquantized, default KV cache          B  unquantized, requested KV4
  D  qoq W4A8 (kv_cache_bits 4), fp16 KV    C  the same qoq model, no flags (auto KV4)

Checks: which backend and cache dtype every Attention layer ran with; B and C
stay close to A and D (the KV4 error of a random model: mean |d logprob| of the
teacher-forced prompt tokens <= 0.4 nats, the first 2 greedy tokens equal); and B
matches Hugging Face's model with K/V fake-quantized by the reference quantizer
(mean <= 0.06, max <= 0.5 nats, and at most a third of B's distance to A): the
remaining gap is fp16 noise flipping a few 4-bit codes.  Since the KV4 path reads
every key from the cache, chunking and prefix hits must not move B away from
the one-shot HF result.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from converters.tiny import DEFAULT_TEXT, tiny_llama_dir  # noqa: E402
from tests.kv4_job import run_job  # noqa: E402

KV4 = "int4_per_token_head"
COMMON = {"block_size": 16, "max_num_batched_tokens": 48, "enable_prefix_caching": True}


def _cpu_attn_block_size() -> int:
    """Block size of the fp16 baselines A and D: vLLM's CPU_ATTN takes multiples of 16
    up to 0.28 and of 32 from 0.32 (the KV4 runs keep 16)."""
    from vllm_qoq import compat

    sizes = compat.AttentionBackendEnum.CPU_ATTN.get_class().get_supported_kernel_block_sizes()
    return max([16] + [getattr(s, "base", s) for s in sizes])


def _prompts():
    page = json.loads(Path(DEFAULT_TEXT).open().readline())["page"]
    return [page[:600], page[:420] + " And now something else entirely about the economy"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("kv4e2e")
    tiny = tiny_llama_dir()
    qoq = root / "tiny-qoq-kv4"
    subprocess.run(
        [sys.executable, "-m", "converters.quantize", "--model", str(tiny), "--out", str(qoq),
         "--group-size", "128", "--kv-bits", "4"],
        check=True, capture_output=True, cwd=str(Path(__file__).resolve().parent.parent),
    )
    base_block = {"block_size": _cpu_attn_block_size()}
    jobs = {
        "A": (tiny, base_block),
        "B": (tiny, {"kv_cache_dtype": KV4, "attention_backend": "CUSTOM"}),
        "C": (qoq, {}),
        "D": (qoq, {"kv_cache_dtype": "float16", **base_block}),
    }
    out = {}
    for name, (model, kw) in jobs.items():
        spec = {"model": str(model), "llm": {**COMMON, **kw}, "prompts": _prompts(), "max_tokens": 6}
        out[name] = run_job(spec, root / name)
    out["tiny"] = tiny
    return out


def _prompt_lp(run):
    return [torch.tensor(r["prompt_logprobs"][1:]) for r in run["results"]]


def _diff(a, b):
    d = torch.cat([(x - y).abs() for x, y in zip(_prompt_lp(a), _prompt_lp(b))])
    return float(d.mean()), float(d.max())


def _backends(run):
    return {(impl, dtype) for _, impl, dtype in run["layers"]}


def test_requested_kv4_runs_our_backend(runs):
    assert _backends(runs["B"]) == {("QoQKV4AttentionImpl", KV4)}
    assert _backends(runs["A"]) != _backends(runs["B"])


def test_qoq_kv4_checkpoint_selects_it_without_flags(runs):
    assert _backends(runs["C"]) == {("QoQKV4AttentionImpl", KV4)}
    assert all(impl != "QoQKV4AttentionImpl" and dtype == "float16" for impl, dtype in _backends(runs["D"]))


@pytest.mark.parametrize("kv4,base", [("B", "A"), ("C", "D")])
def test_kv4_stays_close_to_the_default_cache(runs, kv4, base):
    mean, mx = _diff(runs[kv4], runs[base])
    assert mean <= 0.4 and mx <= 3.0, (mean, mx)
    for r4, rb in zip(runs[kv4]["results"], runs[base]["results"]):
        assert r4["prompt_token_ids"] == rb["prompt_token_ids"]
        assert r4["token_ids"][:2] == rb["token_ids"][:2]
        assert len(r4["token_ids"]) == 6


def test_kv4_matches_hf_with_reference_fake_quant_kv(runs):
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from vllm_qoq.reference.kv4 import dequantize_kv4, quantize_kv4

    def kv4_sdpa(module, query, key, value, attention_mask, **kw):
        k = dequantize_kv4(*quantize_kv4(key)).to(key.dtype)  # per token, per head, post-RoPE
        v = dequantize_kv4(*quantize_kv4(value)).to(value.dtype)
        return sdpa_attention_forward(module, query, k, v, attention_mask, **kw)

    AttentionInterface.register("qoq_kv4_reference", kv4_sdpa)
    model = AutoModelForCausalLM.from_pretrained(
        str(runs["tiny"]), dtype=torch.float16, attn_implementation="qoq_kv4_reference"
    )
    diffs = []
    for r in runs["B"]["results"]:
        ids = torch.tensor([r["prompt_token_ids"]])
        with torch.no_grad():
            lp = model(ids).logits.float().log_softmax(-1)[0, :-1]
        want = lp.gather(1, ids[0, 1:, None])[:, 0]
        diffs.append((want - torch.tensor(r["prompt_logprobs"][1:])).abs())
    d = torch.cat(diffs)
    mean_ab, _ = _diff(runs["B"], runs["A"])
    assert float(d.mean()) <= 0.06 and float(d.max()) <= 0.5, (float(d.mean()), float(d.max()))
    assert float(d.mean()) <= mean_ab / 3, (float(d.mean()), mean_ab)
