"""GPTQ-style perplexity: non-overlapping windows of --seqlen tokens over a test text.

    python -m converters.ppl --model DIR [--dataset wikitext2|sotu|PATH] [--seqlen 2048]
        [--max-windows N] [--runtime vllm|reference] [--dtype float16] [--out RESULT.json]

The text is tokenized once without special tokens, cut into consecutive
windows of seqlen tokens (the last partial window is dropped, as in GPTQ's
evaluation), and perplexity = exp(mean NLL of tokens 2..seqlen of every
window), i.e. the first token of each window is context only.

--runtime vllm (default): vLLM with the vllm_qoq plugin (which vLLM loads
through its `vllm.general_plugins` entry point) computes the log-probabilities
with `prompt_logprobs`; a qoq checkpoint runs on the plugin's W4A8 runtime (its
CUDA kernels on a GPU, the reference ops on the CPU).
--runtime reference: plain PyTorch/transformers on the CPU (or --device):
a qoq checkpoint is dequantized with vllm_qoq/format.py and every quantized
linear's input goes through the reference per-token INT8 quantizer, i.e. the
W4A8 math of vllm_qoq/reference, without vLLM ("cpu-reference").

Datasets: wikitext2 = ../shared/data/wikitext-2-raw/wiki.test.raw (a
reconstructed copy without blank lines: numbers are comparable among
themselves, not to published WikiText-2 numbers to the digit); sotu =
../shared/data/sotu/sotu_eval_2001_2021.jsonl (pages joined by blank lines);
any other value is a path (.jsonl with "page"/"text", or plain text).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT.parent / "shared" / "data"
DATASETS = {
    "wikitext2": DATA / "wikitext-2-raw" / "wiki.test.raw",
    "sotu": DATA / "sotu" / "sotu_eval_2001_2021.jsonl",
}


def load_text(dataset: str) -> str:
    path = DATASETS.get(dataset, Path(dataset))
    if not path.is_file():
        raise FileNotFoundError(f"{dataset}: no such dataset or file (known: {', '.join(DATASETS)})")
    if path.suffix == ".jsonl":
        pages = []
        for line in open(path):
            if line.strip():
                obj = json.loads(line)
                pages.append(obj.get("page", obj.get("text", "")))
        return "\n\n".join(pages)
    return path.read_text()


def token_windows(tokenizer, text: str, seqlen: int = 2048, max_windows: int | None = None) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, less than one window of {seqlen}")
    return [ids[i * seqlen : (i + 1) * seqlen] for i in range(n)]


# ----------------------------------------------------------------- vLLM runtime
def vllm_nll(model_dir: str, windows: list[list[int]], **llm_kwargs) -> tuple[float, int]:
    """Sum of NLL and token count of tokens 2.. of every window, through vLLM."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    seqlen = max(len(w) for w in windows)
    kw = {"max_model_len": seqlen + 1, "seed": 0, "gpu_memory_utilization": 0.5,
          "enable_prefix_caching": False}
    kw.update(llm_kwargs)
    llm = LLM(model=str(model_dir), **kw)
    sp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], sp, use_tqdm=True)
    del llm
    return prompt_nll(windows, outs)


def prompt_nll(windows: list[list[int]], outs) -> tuple[float, int]:
    """Sum of NLL and count of tokens 2.. of each window, from vLLM outputs with prompt_logprobs."""
    nll, ntok = 0.0, 0
    for w, o in zip(windows, outs):
        for tok, lp in zip(w[1:], o.prompt_logprobs[1:]):
            nll -= lp[tok].logprob
            ntok += 1
    return nll, ntok


# ------------------------------------------------------------ reference runtime
def load_reference_model(model_dir: str, dtype=torch.float32, device="cpu", act_quant: bool = True):
    """HF model of `model_dir`; a qoq checkpoint is dequantized (+ INT8 activation fake-quant)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from vllm_qoq import format as fmt
    from vllm_qoq.reference.quantize import fake_quantize_activation

    d = Path(model_dir)
    raw = json.loads((d / "config.json").read_text())
    qc = raw.get("quantization_config")
    if not qc or qc.get("quant_method") != "qoq":
        return AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
    gs = qc["group_size"]
    cfg_dict = {k: v for k, v in raw.items() if k != "quantization_config"}
    config = AutoConfig.for_model(**cfg_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    sd = {}
    for f in sorted(d.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    names = fmt.tensor_names(gs)
    quantized = sorted({k.rsplit(".", 1)[0] for k in sd if k.endswith(".qweight")})
    mods = dict(model.named_modules())
    for p in quantized:  # [N, K]: g128's zero padding of K is dropped
        k = mods[p].in_features if p in mods else None
        sd[p + ".weight"] = fmt.dequantize_weight({n: sd.pop(f"{p}.{n}") for n in names}, gs, k)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    if config.tie_word_embeddings and "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{d}: checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model = model.to(device).eval()
    if act_quant:
        def fq(_, args):  # per-token symmetric INT8 (vllm_qoq/reference): what the runtime does
            return (fake_quantize_activation(args[0]),) + tuple(args[1:])

        for p in quantized:
            mods[p].register_forward_pre_hook(fq)
    return model


def reference_nll(model, windows: list[list[int]], device="cpu") -> tuple[float, int]:
    from tqdm import tqdm

    nll, ntok = 0.0, 0
    with torch.no_grad():
        for w in tqdm(windows, desc="ppl (reference)", unit="window"):
            ids = torch.tensor([w], device=device)
            logits = model(ids).logits[0, :-1].float()
            lp = torch.log_softmax(logits, dim=-1)
            nll -= float(lp.gather(1, ids[0, 1:, None]).sum())
            ntok += len(w) - 1
    return nll, ntok


def perplexity(model_dir, dataset="wikitext2", seqlen=2048, max_windows=None, runtime="vllm",
               dtype="float16", device="cpu", llm_kwargs=None) -> dict:
    from transformers import AutoTokenizer

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    windows = token_windows(tok, load_text(dataset), seqlen, max_windows)
    if runtime == "vllm":
        kw = {"dtype": dtype}
        kw.update(llm_kwargs or {})
        nll, ntok = vllm_nll(str(model_dir), windows, **kw)
    elif runtime == "reference":
        model = load_reference_model(str(model_dir), torch.float32, device)
        nll, ntok = reference_nll(model, windows, device)
    else:
        raise ValueError(f"unknown runtime {runtime!r}")
    return {"model": str(model_dir), "dataset": dataset, "seqlen": seqlen, "windows": len(windows),
            "tokens": ntok, "nll": nll, "ppl": math.exp(nll / ntok), "runtime": runtime,
            "seconds": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m converters.ppl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, nargs="+",
                   help="model dir(s); several are measured one after another in this process")
    p.add_argument("--dataset", default="wikitext2")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--runtime", choices=("vllm", "reference"), default="vllm")
    p.add_argument("--dtype", default="float16", help="vLLM activation dtype")
    p.add_argument("--device", default="cpu", help="reference runtime device")
    p.add_argument("--enforce-eager", action="store_true", help="vLLM: no torch.compile/graphs")
    p.add_argument("--out", default=None,
                   help="write the result as JSON here (a list when several models; rewritten after each)")
    a = p.parse_args(argv)
    kw = {"enforce_eager": True} if a.enforce_eager else {}
    results = []
    for m in a.model:
        res = perplexity(m, a.dataset, a.seqlen, a.max_windows, a.runtime, a.dtype, a.device, kw)
        print(json.dumps(res, indent=1), flush=True)
        results.append(res)
        if a.out:
            out = results if len(a.model) > 1 else res
            Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
