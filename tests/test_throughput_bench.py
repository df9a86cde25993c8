"""benchmarks/throughput.py: the protocol's model directories, log parsing, and one tiny
dummy-weight qoq run through real vLLM (CPU backend) — which is also the test that a qoq
model serves under --load-format dummy (the throughput protocol's loader)."""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import throughput as tp  # noqa: E402


def test_configs_cover_the_protocol():
    for name in ("bf16", "fp8", "fp8_kv4_triton", "qoq_chn_kv4", "qoq_g128_kv4"):
        assert name in tp.CONFIGS
    q, args = tp.CONFIGS["qoq_g128_kv4"]
    assert q["quant_method"] == "qoq" and q["group_size"] == 128 and q["kv_cache_bits"] == 4
    assert args == []  # KV4 is selected by the checkpoint, no flags
    assert tp.CONFIGS["qoq_chn_kv8"][0]["group_size"] == -1
    # the protocol of ../shared/device/baseline.sh
    p = tp.PROTOCOL
    assert p[p.index("--random-input-len") + 1] == "1024"
    assert p[p.index("--random-output-len") + 1] == "512"
    assert p[p.index("--num-prompts") + 1] == "1000"


def test_write_model_and_quant_config(tmp_path):
    d = tp.write_model(str(tmp_path / "m"), tp.TINY, tp.CONFIGS["qoq_chn_kv4"][0])
    cfg = json.load(open(os.path.join(d, "config.json")))
    assert cfg["quantization_config"]["group_size"] == -1
    assert cfg["hidden_size"] == tp.TINY["hidden_size"]
    from vllm_qoq.config import QoQConfig

    qc = QoQConfig.from_config(cfg["quantization_config"])
    assert qc.group_size == -1
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    assert len(tok) == tp.TINY["vocab_size"]


def test_parse_log():
    text = ("INFO ... GPU KV cache size: 1,234,567 tokens\n"
            "Throughput: 17.76 requests/s, 27282.50 total tokens/s, 9094.17 output tokens/s\n")
    got = tp.parse_log(text)
    assert got == {"requests_s": 17.76, "total_tok_s": 27282.5, "output_tok_s": 9094.17,
                   "kv_cache_tokens": 1234567}
    assert tp.parse_log("nothing here") == {}


def test_merge_replaces_same_config(tmp_path):
    out = str(tmp_path / "t.json")
    tp.merge(out, [{"config": "fp8", "device": "X", "shape": "s", "output_tok_s": 1.0, "rc": 0,
                    "command": "c"}])
    tp.merge(out, [{"config": "fp8", "device": "X", "shape": "s", "output_tok_s": 2.0, "rc": 0,
                    "command": "c"},
                   {"config": "bf16", "device": "X", "shape": "s", "output_tok_s": 4.0, "rc": 0,
                    "command": "c"}])
    doc = json.load(open(out))
    assert sorted((r["config"], r["output_tok_s"]) for r in doc["rows"]) == [("bf16", 4.0),
                                                                            ("fp8", 2.0)]
    md = tp.markdown(doc)
    assert "| fp8 | 2.0 | 1.00 | 0.50 |" in md


@pytest.mark.slow
def test_tiny_qoq_kv4_dummy_run(tmp_path):
    out = str(tmp_path / "t.json")
    rc = tp.main(["qoq_chn_kv4", "--shape", "tiny", "--out", out, "--workdir", str(tmp_path),
                  "--num-prompts", "4", "--timeout", "400", "--",
                  "--random-input-len", "24", "--random-output-len", "6",
                  "--gpu-memory-utilization", "0.3", "--max-model-len", "128",
                  "--max-num-seqs", "4"])
    row = json.load(open(out))["rows"][0]
    log = open(os.path.join(tmp_path, "throughput-qoq_chn_kv4.log"), errors="replace").read()
    assert rc == 0, log[-3000:]
    assert row["output_tok_s"] > 0 and row["kv_cache_tokens"] > 0
    # the checkpoint alone selected the qoq method and the KV4 cache
    assert "quantization=qoq" in log and "kv_cache_dtype=int4_per_token_head" in log
