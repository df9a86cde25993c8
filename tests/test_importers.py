"""Importers: synthetic QServe and DeepCompressor checkpoints round-trip; mismatches are refused."""

import json

import pytest
import torch
from safetensors.torch import load_file

from converters.importers import deepcompressor as dc
from converters.importers import qserve
from vllm_qoq import format as fmt
from vllm_qoq import qserve_layout
from vllm_qoq.reference.quantize import level1_g128, level2_params, quantize_level2, quantize_weight

HID, INTER, HEADS, KV, HD = 256, 384, 4, 2, 64
SHAPES = {  # linear -> (N, K)
    "self_attn.q_proj": (HEADS * HD, HID),
    "self_attn.k_proj": (KV * HD, HID),
    "self_attn.v_proj": (KV * HD, HID),
    "self_attn.o_proj": (HID, HEADS * HD),
    "mlp.gate_proj": (INTER, HID),
    "mlp.up_proj": (INTER, HID),
    "mlp.down_proj": (HID, INTER),
}
VOCAB = 128


def _config_dir(d):
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HID,
           "intermediate_size": INTER, "num_attention_heads": HEADS, "num_key_value_heads": KV,
           "head_dim": HD, "num_hidden_layers": 1, "vocab_size": VOCAB, "torch_dtype": "float16",
           "tie_word_embeddings": False}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "tokenizer_config.json").write_text("{}")
    return d


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, generator=g) * 0.05
        w[:, torch.randperm(k, generator=g)[:4]] *= 4  # outlier channels, like real weights
        out[f"model.layers.0.{name}"] = w
    return out


def _floats():
    g = torch.Generator().manual_seed(9)
    return {
        "model.embed_tokens.weight": torch.randn(VOCAB, HID, generator=g).half(),
        "lm_head.weight": torch.randn(VOCAB, HID, generator=g).half(),
        "model.norm.weight": torch.ones(HID).half(),
        "model.layers.0.input_layernorm.weight": torch.ones(HID).half(),
        "model.layers.0.post_attention_layernorm.weight": torch.ones(HID).half(),
    }


# --------------------------------------------------------------------- QServe
def _to_qserve(ours, gs):
    u = fmt.unpack_int4(ours["qweight"])
    t = {"qweight": qserve_layout.qweight_from_natural(u)}
    if gs == -1:
        t["s1_scales"], t["s1_szeros"] = ours["scales"], ours["szeros"]
    else:
        t["s1_scales"] = ours["s1_scales"]
        t["s2_scales"], t["s2_zeros"] = qserve_layout.s2_from_natural(ours["s2_scales"], ours["s2_zeros"])
    return t


def _qserve_ckpt(d, gs, bad_order=False):
    _config_dir(d)
    sd, ours_all = dict(_floats()), {}
    for prefix, w in _weights().items():
        ours = quantize_weight(w, gs)
        ours_all[prefix] = ours
        for k, v in _to_qserve(ours, gs).items():
            sd[f"{prefix}.{k}"] = v
        if bad_order:  # s2 columns in another order than QServe's kernel uses
            g = torch.Generator().manual_seed(1)
            perm = torch.randperm(w.shape[0], generator=g)
            sd[f"{prefix}.s2_scales"] = sd[f"{prefix}.s2_scales"][:, perm].contiguous()
            sd[f"{prefix}.s2_zeros"] = sd[f"{prefix}.s2_zeros"][:, perm].contiguous()
    torch.save(sd, d / "pytorch_model.bin")
    return ours_all


@pytest.mark.parametrize("gs", [-1, 128])
def test_qserve_round_trip_with_inferred_group_size(tmp_path, gs):
    ours = _qserve_ckpt(tmp_path / "qs", gs)
    out = tmp_path / "out"
    assert qserve.main(["--model", str(tmp_path / "qs"), "--out", str(out)]) == 0
    sd = load_file(str(out / "model.safetensors"))
    for prefix, ref in ours.items():
        for k, v in ref.items():
            assert torch.equal(sd[f"{prefix}.{k}"], v), (prefix, k)
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["group_size"] == gs and qc["kv_cache_bits"] == 4 and qc["recipe"]["rotation"] is True
    assert torch.equal(sd["lm_head.weight"], _floats()["lm_head.weight"])
    assert (out / "tokenizer_config.json").is_file()


def test_qserve_group_size_contradiction_and_garbage(tmp_path, capsys):
    _qserve_ckpt(tmp_path / "qs", 128)
    assert qserve.main(["--model", str(tmp_path / "qs"), "--out", str(tmp_path / "o"),
                        "--group-size", "-1"]) == 2
    assert "contradicts" in capsys.readouterr().err
    d = _config_dir(tmp_path / "plain")
    torch.save(_floats(), d / "pytorch_model.bin")
    assert qserve.main(["--model", str(d), "--out", str(tmp_path / "o2")]) == 2
    assert "not a QServe checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


def test_qserve_refuses_wrong_s2_column_order(tmp_path, capsys):
    _qserve_ckpt(tmp_path / "qs", 128, bad_order=True)
    assert qserve.main(["--model", str(tmp_path / "qs"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "refusing" in err or "column order" in err
    assert not (tmp_path / "o").exists()


# -------------------------------------------------------------- DeepCompressor
def _dc_layer(w, gs, zero_kind):
    """(fake-quant fp16 weight, scale.pt entries) as deepcompressor writes them."""
    n, k = w.shape
    if gs == -1:
        wmax, wmin = w.amax(1), w.amin(1)
        s = ((wmax - wmin) / 15).half().double()
        if zero_kind == "zero":
            z = torch.round(-wmin.double() / s)
            u = torch.clamp(torch.round(w.double() / s[:, None] + z[:, None]), 0, 15)
            w_hat = s[:, None] * (u - z[:, None])
            return w_hat.half(), {"scale.0": s.half().view(n, 1), "zero": z.half().view(n, 1)}
        zs = (-wmin).half().double()
        u = torch.clamp(torch.round((w.double() + zs[:, None]) / s[:, None]), 0, 15)
        return (s[:, None] * u - zs[:, None]).half(), {"scale.0": s.half().view(n, 1), "scaled_zero": zs.half().view(n, 1)}
    s1, x1 = level1_g128(w)
    s2, z = level2_params(x1)
    u = quantize_level2(x1, s2, z).to(torch.float64).view(n, k // 128, 128)
    q8 = s2.double()[..., None] * (u - z.double()[..., None])
    w_hat = (s1.double()[:, None] * q8.view(n, k)).half()
    e = {"scale.0": s1.view(n, 1, 1, 1), "scale.1": s2.half().view(n, 1, k // 128, 1)}
    if zero_kind == "zero":
        e["zero"] = z.half().view(n, 1, k // 128, 1)
    else:
        e["scaled_zero"] = (z * s2).half().view(n, 1, k // 128, 1)
    return w_hat, e


def _dc_ckpt(d, gs, zero_kind, tamper=None):
    _config_dir(d)
    model, scales = dict(_floats()), {}
    for prefix, w in _weights(seed=3).items():
        w_hat, e = _dc_layer(w, gs, zero_kind)
        model[prefix + ".weight"] = w_hat
        for k, v in e.items():
            scales[f"{prefix}.weight.{k}"] = v
    if tamper:
        tamper(scales)
    torch.save(model, d / "model.pt")
    torch.save(scales, d / "scale.pt")
    return model


def _dc_args(d, out):
    return ["--model-pt", str(d / "model.pt"), "--scale-pt", str(d / "scale.pt"),
            "--config-dir", str(d), "--out", str(out)]


@pytest.mark.parametrize("gs", [-1, 128])
@pytest.mark.parametrize("zero_kind", ["zero", "scaled_zero"])
def test_deepcompressor_round_trip(tmp_path, gs, zero_kind):
    d = tmp_path / "dc"
    model = _dc_ckpt(d, gs, zero_kind)
    out = tmp_path / "out"
    assert dc.main(_dc_args(d, out)) == 0
    sd = load_file(str(out / "model.safetensors"))
    for prefix in _weights():
        layer = {n: sd[f"{prefix}.{n}"] for n in fmt.tensor_names(gs)}
        fmt.validate_layer(layer, gs, prefix)
        w_hat = model[prefix + ".weight"].float()
        rebuilt = fmt.dequantize_weight(layer, gs)
        if gs == 128:
            assert torch.equal(rebuilt.half(), w_hat)  # exact: same integers, same s1
        else:
            tol = 2e-3 * w_hat.abs().amax(1, keepdim=True)
            assert bool(((rebuilt - w_hat).abs() <= tol).all())
        assert prefix + ".weight" not in sd
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["group_size"] == gs and qc["recipe"]["name"] == "deepcompressor-import"


def test_deepcompressor_refuses_wrong_scale_order(tmp_path, capsys):
    def swap_groups(scales):  # level-2 scales in another order than the weights'
        for k in [k for k in scales if k.endswith(".scale.1")]:
            scales[k] = scales[k].flip(2)
    _dc_ckpt(tmp_path / "dc", 128, "zero", swap_groups)
    assert dc.main(_dc_args(tmp_path / "dc", tmp_path / "o")) == 2
    assert "refusing" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_deepcompressor_refuses_unrepresentable_post_scale_zero(tmp_path, capsys):
    def odd_zero(scales):
        k = next(k for k in scales if k.endswith(".scaled_zero"))
        scales[k] = scales[k] + 1  # no longer a multiple of s2 where s2 > 1
    _dc_ckpt(tmp_path / "dc", 128, "scaled_zero", odd_zero)
    assert dc.main(_dc_args(tmp_path / "dc", tmp_path / "o")) == 2
    assert "multiples" in capsys.readouterr().err


def test_deepcompressor_refuses_wrong_channel_scales(tmp_path, capsys):
    def shuffle(scales):
        k = next(k for k in scales if k.endswith(".scale.0"))
        scales[k] = scales[k].roll(1, 0)
    _dc_ckpt(tmp_path / "dc", -1, "zero", shuffle)
    assert dc.main(_dc_args(tmp_path / "dc", tmp_path / "o")) == 2
    assert "refusing" in capsys.readouterr().err


def test_qserve_peak_check_catches_misplaced_scales():
    # codes and scales that stay inside INT8 but never reach the protective range:
    # what pairing the codes with another channel's level-2 scales looks like
    n, k = 64, 256
    u = torch.randint(6, 10, (n, k), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    layer = {"qweight": fmt.pack_int4(u), "s1_scales": torch.ones(n, dtype=torch.float16),
             "s2_scales": torch.full((n, 2), 8, dtype=torch.uint8), "s2_zeros": torch.full((n, 2), 8, dtype=torch.uint8)}
    with pytest.raises(qserve.ImportError_, match="protective range"):
        qserve.check_g128_layer(layer, "x")
    u[:, 0] = 15  # now every row reaches 8 * (15 - 8) = 56 < 96: still refused
    with pytest.raises(qserve.ImportError_):
        qserve.check_g128_layer({**layer, "qweight": fmt.pack_int4(u)}, "x")
    u[:, 0], u[:, 1] = 0, 15  # 8 * (0 - 8) = -64 ... with s2 = 15: -120 reaches the range
    ok = {**layer, "qweight": fmt.pack_int4(u), "s2_scales": torch.full((n, 2), 15, dtype=torch.uint8)}
    assert qserve.check_g128_layer(ok, "x")["rows_at_range"] == 1.0


# ------------------------------------------------------- g128, K % 128 != 0
def test_deepcompressor_g128_partial_last_group_is_padded():
    """K=200: deepcompressor's ceil(K/128) groups become our zero-padded layout, exactly."""
    n, k = 64, 200
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(4)) * 0.05
    ref = quantize_weight(w, 128)  # our padded RTN: [n, 128] codes, 2 groups
    w_hat = fmt.dequantize_weight(ref, 128, k).half()
    s1 = ref["s1_scales"].view(n, 1, 1, 1)
    s2 = ref["s2_scales"].half().view(n, 1, 2, 1)
    z = ref["s2_zeros"].half().view(n, 1, 2, 1)
    ours, info = dc.import_g128(w_hat.float(), s1, s2, z, None, "model.layers.0.mlp.down_proj")
    for name in fmt.G128_TENSORS:
        assert torch.equal(ours[name], ref[name]), name
    fmt.validate_layer(ours, 128, "down_proj", k=k)
    with pytest.raises(dc.ImportError_, match=r"scale.1: expected 128 values"):
        dc.import_g128(w_hat.float(), s1, s2[:, :, :1], z, None, "model.layers.0.mlp.down_proj")


def test_qserve_g128_refuses_k_not_multiple_of_128(tmp_path, capsys):
    d = _config_dir(tmp_path / "qs")
    sd = dict(_floats())
    p = "model.layers.0.mlp.down_proj"
    sd.update({f"{p}.qweight": torch.zeros(64, 48, dtype=torch.int8),  # K = 96
               f"{p}.s1_scales": torch.ones(64, dtype=torch.float16),
               f"{p}.s2_scales": torch.ones(1, 64, dtype=torch.int8),
               f"{p}.s2_zeros": torch.zeros(1, 64, dtype=torch.int8)})
    torch.save(sd, d / "pytorch_model.bin")
    assert qserve.main(["--model", str(d), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{p}: K=96 is not a multiple of 128" in err
    assert not (tmp_path / "o").exists()
