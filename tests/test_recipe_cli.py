"""The QoQ recipe CLI (converters.recipe.cli; `converters.quantize --recipe qoq` dispatches to it) on the tiny Llama: our format, report, atomicity."""

import json

import pytest
import torch
from safetensors.torch import load_file

from converters import quantize
from converters.recipe import cli
from converters.tiny import tiny_llama_dir
from vllm_qoq import format as fmt

FAST = ["--calib-samples", "4", "--calib-seqlen", "64", "--device", "cpu"]
QUICK = ["--clip-steps", "8", "--smooth-tokens", "128"]  # recipe knobs (converters.recipe.cli only)


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama_dir()


@pytest.mark.parametrize("gs", [-1, 128])
def test_qoq_recipe_writes_our_format(tiny, tmp_path, gs):
    out = tmp_path / "q"
    rc = cli.main(["--model", str(tiny), "--out", str(out), "--group-size", str(gs),
                   "--kv-bits", "4", "--skip", "layers.1.mlp.down_proj", *FAST, *QUICK])
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["group_size"] == gs and qc["kv_cache_bits"] == 4 and qc["recipe"]["name"] == "qoq"
    assert qc["recipe"]["rotation"] and qc["recipe"]["gptq"] and qc["recipe"]["smooth_attention"]
    assert cfg["tie_word_embeddings"] is False
    sd = load_file(str(out / "model.safetensors"))
    p = "model.layers.0.mlp.down_proj"
    fmt.validate_layer({n: sd[f"{p}.{n}"] for n in fmt.tensor_names(gs)}, gs, p)
    assert "model.layers.1.mlp.down_proj.weight" in sd and "lm_head.weight" in sd
    assert sd["model.embed_tokens.weight"].dtype == torch.float16
    assert torch.equal(sd["model.norm.weight"], torch.ones_like(sd["model.norm.weight"]))  # folded
    rep = json.loads((out / "qoq_report.json").read_text())
    assert len(rep["layers"]) == 13 and all(r["rel_err"] <= r["rel_err_rtn"] * 1.0001 for r in rep["layers"])


def test_qoq_refuses_bad_calibration_and_leaves_nothing(tiny, tmp_path, capsys):
    out = tmp_path / "q"
    rc = quantize.main(["--model", str(tiny), "--out", str(out), "--recipe", "qoq",
                        "--calib", str(tmp_path / "nope.jsonl"), *FAST])
    assert rc == 2 and "nope.jsonl" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".q.tmp-*"))


def test_recipe_cli_extra_knobs(tiny, tmp_path):
    out = tmp_path / "fq"
    rc = cli.main(["--model", str(tiny), "--out", str(out), "--group-size", "128", "--no-clip",
                   "--no-smooth-linear", "--clip-steps", "5", "--fake-quant", "--rotation-seed", "-1", *FAST, *QUICK])
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    rec = cfg["vllm_qoq_fake_quant"]["recipe"]
    assert rec["clip"] is False and rec["smooth_linear"] is False and rec["rotation_seed"] is None
    sd = load_file(str(out / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight" in sd
