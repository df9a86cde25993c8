"""The RTN converter: output content, atomicity, and refusals of bad input."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from converters import io, quantize
from converters.tiny import tiny_llama_dir
from vllm_qoq import format as fmt


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama_dir()


def _snapshot(d: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in d.iterdir()}


@pytest.mark.parametrize("gs", [-1, 128])
def test_rtn_output_is_our_format(tiny, tmp_path, gs):
    before = _snapshot(tiny)
    out = tmp_path / "q"
    assert quantize.main(["--model", str(tiny), "--out", str(out), "--group-size", str(gs),
                          "--skip", "layers.1.mlp.down_proj"]) == 0
    assert _snapshot(tiny) == before  # the input is untouched
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "qoq" and cfg["group_size"] == gs and cfg["format_version"] == 1
    assert cfg["modules_to_not_convert"] == ["layers.1.mlp.down_proj"]
    assert cfg.get("k_padding") == ("zeros" if gs == 128 else None)
    assert (out / "tokenizer.json").is_file()
    sd = load_file(str(out / "model.safetensors"))
    src = load_file(str(tiny / "model.safetensors"))
    for prefix in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"):
        layer = {n: sd[f"{prefix}.{n}"] for n in fmt.tensor_names(gs)}
        fmt.validate_layer(layer, gs, prefix)
        assert f"{prefix}.weight" not in sd
        w = src[f"{prefix}.weight"].float()
        assert (fmt.dequantize_weight(layer, gs) - w).norm() / w.norm() < 0.2
    assert torch.equal(sd["model.layers.1.mlp.down_proj.weight"], src["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(sd["model.embed_tokens.weight"], src["model.embed_tokens.weight"])


def test_fake_quant_matches_dequantized(tiny, tmp_path):
    q, fq = tmp_path / "q", tmp_path / "fq"
    quantize.main(["--model", str(tiny), "--out", str(q), "--group-size", "128"])
    quantize.main(["--model", str(tiny), "--out", str(fq), "--group-size", "128", "--fake-quant"])
    assert "quantization_config" not in json.loads((fq / "config.json").read_text())
    sq, sf = load_file(str(q / "model.safetensors")), load_file(str(fq / "model.safetensors"))
    p = "model.layers.0.mlp.gate_proj"
    deq = fmt.dequantize_weight({n: sq[f"{p}.{n}"] for n in fmt.G128_TENSORS}, 128)
    assert torch.equal(sf[f"{p}.weight"], deq.to(sf[f"{p}.weight"].dtype))


def test_refuses_existing_output_and_output_inside_input(tiny, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert quantize.main(["--model", str(tiny), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert quantize.main(["--model", str(tiny), "--out", str(tiny / "sub")]) == 2
    assert "may not be the input" in capsys.readouterr().err
    assert quantize.main(["--model", str(tiny), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def _copy_with_config(tiny: Path, dst: Path, **changes) -> Path:
    shutil.copytree(tiny, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_refuses_unsupported_architecture(tiny, tmp_path, capsys):
    src = _copy_with_config(tiny, tmp_path / "gpt2", architectures=["GPT2LMHeadModel"])
    assert quantize.main(["--model", str(src), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "GPT2LMHeadModel" in err and "LlamaForCausalLM" in err
    assert not (tmp_path / "o").exists()


def test_refuses_already_quantized(tiny, tmp_path, capsys):
    src = _copy_with_config(tiny, tmp_path / "gptq", quantization_config={"quant_method": "gptq"})
    assert quantize.main(["--model", str(src), "--out", str(tmp_path / "o")]) == 2
    assert "already quantized" in capsys.readouterr().err


def _k576_model(d: Path, intermediate: int = 256) -> Path:
    """SmolLM2's attention shapes (hidden 576, 9 heads / 3 KV heads of 64), one layer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=576, intermediate_size=intermediate, num_hidden_layers=1,
                      num_attention_heads=9, num_key_value_heads=3)
    LlamaForCausalLM(cfg).save_pretrained(str(d))
    return d


def test_g128_pads_k_576(tmp_path):
    src = _k576_model(tmp_path / "k576", intermediate=200)
    q, fq = tmp_path / "q", tmp_path / "fq"
    assert quantize.main(["--model", str(src), "--out", str(q), "--group-size", "128"]) == 0
    assert quantize.main(["--model", str(src), "--out", str(fq), "--group-size", "128", "--fake-quant"]) == 0
    assert json.loads((q / "config.json").read_text())["quantization_config"]["k_padding"] == "zeros"
    sd, sf = load_file(str(q / "model.safetensors")), load_file(str(fq / "model.safetensors"))
    ref = load_file(str(src / "model.safetensors"))
    for name, k in (("self_attn.q_proj", 576), ("self_attn.o_proj", 576), ("mlp.up_proj", 576),
                    ("mlp.down_proj", 200)):
        p = f"model.layers.0.{name}"
        w = ref[f"{p}.weight"].float()
        layer = {n: sd[f"{p}.{n}"] for n in fmt.G128_TENSORS}
        kp = fmt.padded_k(k, 128)
        assert layer["qweight"].shape == (w.shape[0], kp // 2) and layer["s2_zeros"].shape[1] == kp // 128
        fmt.validate_layer(layer, 128, p, k=k)  # incl. the zero codes of the padding
        deq = fmt.dequantize_weight(layer, 128, k)
        assert (deq - w).norm() / w.norm() < 0.2
        # the fake-quant export is the [N, K] float weight the checkpoint represents
        assert sf[f"{p}.weight"].shape == w.shape
        assert torch.equal(sf[f"{p}.weight"], deq.to(sf[f"{p}.weight"].dtype))


def test_per_channel_odd_k_names_layer_and_leaves_nothing(tmp_path, capsys):
    src = _k576_model(tmp_path / "k577", intermediate=255)  # down_proj K=255: odd
    out = tmp_path / "o"
    assert quantize.main(["--model", str(src), "--out", str(out), "--group-size", "-1"]) == 2
    err = capsys.readouterr().err
    assert "K=255" in err and "model.layers.0.mlp.down_proj" in err and "--group-size 128" in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.tmp")]  # no leftovers


def test_missing_config_is_named(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert quantize.main(["--model", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "config.json: not found" in capsys.readouterr().err


def test_writer_is_atomic_on_error(tiny, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(RuntimeError):
        with io.CheckpointWriter(out, tiny) as w:
            w.add("x", torch.zeros(2))
            raise RuntimeError("interrupted")
    assert not out.exists() and list(tmp_path.iterdir()) == []
