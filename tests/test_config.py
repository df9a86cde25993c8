"""Parsing config.json quantization_config, layer dispatch, and clear errors."""

import pytest
import torch

pytest.importorskip("vllm")

from vllm_qoq import format as fmt  # noqa: E402
from vllm_qoq import qserve_layout  # noqa: E402
from vllm_qoq.compat import UnquantizedLinearMethod  # noqa: E402
from vllm_qoq.config import QoQConfig  # noqa: E402
from vllm_qoq.linear import QoQLinearMethod  # noqa: E402
from vllm_qoq.reference.quantize import quantize_activation, quantize_weight  # noqa: E402

OURS = {
    "quant_method": "qoq", "format_version": 1, "weight_bits": 4, "group_size": 128,
    "act_bits": 8, "kv_cache_bits": 4, "zero_point": "post_scale", "protective_range": 119,
    "modules_to_not_convert": ["lm_head"], "recipe": {"name": "rtn"},
}


def test_our_schema():
    c = QoQConfig.from_config(OURS)
    assert (c.group_size, c.kv_cache_bits, c.layout) == (128, 4, "qoq")
    assert c.k_padding is None  # a checkpoint that does not say it pads K
    assert QoQConfig.from_config({**OURS, "k_padding": "zeros"}).k_padding == "zeros"
    assert c.modules_to_not_convert == ["lm_head"]
    assert QoQConfig.get_supported_act_dtypes() == [torch.float16, torch.bfloat16]
    assert QoQConfig.get_min_capability() == 80


@pytest.mark.parametrize("gs", [-1, 128])
def test_sglang_schema(gs):
    c = QoQConfig.from_config({"quant_method": "qoq", "wbits": 4, "group_size": gs})
    assert (c.group_size, c.layout, c.kv_cache_bits) == (gs, "qserve", 4)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"group_size": 64}, "group_size 64 is not supported"),
        ({"weight_bits": 3}, "weight_bits=3 is not supported"),
        ({"act_bits": 4}, "act_bits=4"),
        ({"kv_cache_bits": 2}, "kv_cache_bits 2"),
        ({"format_version": 9}, "format_version 9 is not supported"),
        ({"zero_point": "pre_scale"}, "zero_point"),
        ({"protective_range": 300}, "protective_range"),
        ({"k_padding": "replicate"}, "k_padding 'replicate' is not understood"),
        ({"bogus": 1}, r"unknown field\(s\) \['bogus'\]"),
        ({"modules_to_not_convert": "lm_head"}, "must be a list"),
        ({"quant_method": "awq"}, "expected 'qoq'"),
    ],
)
def test_bad_configs_are_named(change, message):
    with pytest.raises(ValueError, match=message) as e:
        QoQConfig.from_config({**OURS, **change})
    assert "config.json quantization_config" in str(e.value)


def test_missing_version_and_wbits():
    with pytest.raises(ValueError, match="neither 'format_version'"):
        QoQConfig.from_config({"quant_method": "qoq", "group_size": 128})
    with pytest.raises(ValueError, match="wbits=8"):
        QoQConfig.from_config({"quant_method": "qoq", "wbits": 8, "group_size": 128})


def test_override_claims_only_qoq():
    assert QoQConfig.override_quantization_method({"quant_method": "qoq"}, None) == "qoq"
    assert QoQConfig.override_quantization_method({"quant_method": "QoQ"}, "qoq") == "qoq"
    assert QoQConfig.override_quantization_method({"quant_method": "gptq"}, None) is None
    assert QoQConfig.override_quantization_method({"quant_method": "qoq"}, "fp8") is None


def test_skipped_modules_and_fused_layers():
    c = QoQConfig.from_config({**OURS, "modules_to_not_convert": ["down_proj", "layers.1.self_attn.q_proj"]})
    c.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    assert c.is_skipped("model.layers.0.mlp.down_proj")
    assert not c.is_skipped("model.layers.0.mlp.up_proj")
    with pytest.raises(ValueError, match="some but not all of its shards"):
        c.is_skipped("model.layers.1.self_attn.qkv_proj")
    from vllm.model_executor.layers.linear import LinearBase

    class FakeLinear(LinearBase):  # only the type matters for dispatch
        def __init__(self):
            torch.nn.Module.__init__(self)

    assert isinstance(c.get_quant_method(FakeLinear(), "model.layers.0.mlp.down_proj"), UnquantizedLinearMethod)
    assert isinstance(c.get_quant_method(FakeLinear(), "model.layers.0.mlp.up_proj"), QoQLinearMethod)
    assert c.get_quant_method(torch.nn.Embedding(4, 4), "model.embed_tokens") is None


def test_float32_activations_refused_with_fix():
    method = QoQLinearMethod(QoQConfig(group_size=-1), prefix="model.layers.0.mlp.up_proj")
    with pytest.raises(ValueError, match=r"up_proj.*--dtype bfloat16"):
        method.create_weights(torch.nn.Module(), 256, [256], 256, 256, torch.float32)


def test_g128_k_not_multiple_of_128_needs_the_padding_declared(tp):
    # a checkpoint that says "k_padding": "zeros" (every g128 checkpoint we write) gets padded shapes
    padded = QoQConfig.from_config({**OURS, "k_padding": "zeros"})
    layer = torch.nn.Module()
    QoQLinearMethod(padded, prefix="model.layers.0.mlp.up_proj").create_weights(
        layer, 576, [256], 576, 256, torch.float16)
    assert layer.qweight.shape == (256, 320) and layer.s2_scales.shape == (256, 5)
    assert layer.qoq_in_features == 576 and layer.qoq_k_pad == 64
    # one that does not say it cannot be read as the padded layout
    method = QoQLinearMethod(QoQConfig.from_config(OURS), prefix="model.layers.0.mlp.up_proj")
    with pytest.raises(ValueError, match=r"up_proj: K=576 is not a multiple of 128.*k_padding.*re-convert"):
        method.create_weights(torch.nn.Module(), 576, [256], 576, 256, torch.float16)
    # ... which matters only where K % 128 != 0
    layer = torch.nn.Module()
    method.create_weights(layer, 512, [256], 512, 256, torch.float16)
    assert layer.qweight.shape == (256, 256) and layer.qoq_k_pad == 0
    # QServe's layout cannot hold such a K at all
    qs = QoQConfig.from_config({"quant_method": "qoq", "wbits": 4, "group_size": 128})
    with pytest.raises(ValueError, match=r"down_proj: K=576 .*QServe-layout"):
        QoQLinearMethod(qs, prefix="model.layers.0.mlp.down_proj").create_weights(
            torch.nn.Module(), 576, [256], 576, 256, torch.float16)


def test_per_channel_odd_k_names_layer():
    method = QoQLinearMethod(QoQConfig(group_size=-1), prefix="model.layers.0.mlp.down_proj")
    with pytest.raises(ValueError, match=r"down_proj.*K=577 is odd"):
        method.create_weights(torch.nn.Module(), 577, [256], 577, 256, torch.float16)


@pytest.mark.parametrize("gs", [-1, 128])
def test_qserve_layout_round_trip(gs):
    torch.manual_seed(0)
    n, k = 96, 256
    q = quantize_weight(torch.randn(n, k), gs)
    u = fmt.unpack_int4(q["qweight"])
    qs = {"qweight": qserve_layout.qweight_from_natural(u)}
    assert qs["qweight"].dtype == torch.int8 and qs["qweight"].shape == (n, k // 2)
    assert torch.equal(qserve_layout.qweight_to_natural(qs["qweight"]), u)
    if gs == -1:
        qs.update(s1_scales=q["scales"], s1_szeros=q["szeros"])
    else:
        s2, zn = qserve_layout.s2_from_natural(q["s2_scales"], q["s2_zeros"])
        assert s2.shape == (k // 128, n)
        qs.update(s1_scales=q["s1_scales"], s2_scales=s2, s2_zeros=zn)
    back = qserve_layout.to_ours(qs, gs, "layer")
    for name in fmt.tensor_names(gs):
        assert torch.equal(back[name], q[name]), name


def test_qserve_byte_formula_spot_check():
    # n = 32*nt + 16*a + 8*b + c, k = 32*kt + 16*d + 4*e + f (qoq.md §6)
    n, k = 64, 64
    u = torch.zeros(n, k, dtype=torch.uint8)
    nn_, kk = 32 * 1 + 16 * 1 + 8 * 0 + 5, 32 * 1 + 16 * 1 + 4 * 2 + 3  # a=1 -> high nibble
    u[nn_, kk] = 9
    flat = qserve_layout.qweight_from_natural(u).view(torch.uint8).reshape(-1)
    byte = ((1 * (k // 32) + 1) * 32 + 4 * 5 + 2) * 16 + 8 * 1 + 4 * 0 + 3
    assert int(flat[byte]) == 9 << 4 and int(flat.sum()) == 9 << 4


def test_qserve_bad_zeros_refused():
    s2 = torch.full((2, 32), 3, dtype=torch.int8)
    zn = torch.full((2, 32), -4, dtype=torch.int8)  # 4 is not a multiple of 3
    with pytest.raises(ValueError, match="not a multiple of s2_scales"):
        qserve_layout.s2_to_natural(s2, zn, "model.layers.0.mlp.up_proj")


@pytest.mark.parametrize("gs", [-1, 128])
def test_linear_loads_qserve_layout(tp, gs):
    torch.manual_seed(3)
    n, k = 64, 256
    q = quantize_weight(torch.randn(n, k), gs)
    cfg = QoQConfig.from_config({"quant_method": "qoq", "wbits": 4, "group_size": gs})
    layer = torch.nn.Module()
    method = QoQLinearMethod(cfg, prefix="p")
    method.create_weights(layer, k, [n], k, n, torch.float16)
    u = fmt.unpack_int4(q["qweight"])
    layer.qweight.data.copy_(qserve_layout.qweight_from_natural(u))
    if gs == -1:
        layer.s1_scales.data.copy_(q["scales"])
        layer.s1_szeros.data.copy_(q["szeros"])
    else:
        layer.s1_scales.data.copy_(q["s1_scales"])
        s2, zn = qserve_layout.s2_from_natural(q["s2_scales"], q["s2_zeros"])
        layer.s2_scales.data.copy_(s2)
        layer.s2_zeros.data.copy_(zn)
    method.process_weights_after_loading(layer)
    x = torch.randn(2, k, dtype=torch.float16)
    qx, sx, _ = quantize_activation(x)
    expect = (qx.double() * sx.double()[:, None]) @ fmt.dequantize_weight(q, gs).double().t()
    torch.testing.assert_close(method.apply(layer, x).double(), expect.half().double(), rtol=5e-3, atol=5e-3)


def _loader(param, loaded_weight, shard_id=None):
    """Stands in for vLLM's weight_loader_v2: shard_id i fills output rows of part i."""
    if shard_id is None:
        param.data.copy_(loaded_weight)
    else:
        n = loaded_weight.shape[0]
        param.data[shard_id * n:(shard_id + 1) * n].copy_(loaded_weight)


@pytest.mark.parametrize("gs", [-1, 128])
def test_missing_tensor_is_refused_by_name(tp, gs):
    n, k = 64, 256
    q = quantize_weight(torch.randn(n, k), gs)
    layer = torch.nn.Module()
    method = QoQLinearMethod(QoQConfig(group_size=gs), prefix="model.layers.3.mlp.down_proj")
    method.create_weights(layer, k, [n], k, n, torch.bfloat16, weight_loader=_loader)
    names = fmt.tensor_names(gs)
    for name in names[:-1]:  # the last tensor is "missing from the checkpoint"
        getattr(layer, name).weight_loader(getattr(layer, name), q[name])
    with pytest.raises(ValueError, match=rf"model.layers.3.mlp.down_proj.{names[-1]} were not found"):
        method.process_weights_after_loading(layer)
    getattr(layer, names[-1]).weight_loader(getattr(layer, names[-1]), q[names[-1]])
    method.process_weights_after_loading(layer)  # complete now


def test_missing_part_of_merged_layer_is_refused(tp):
    q = [quantize_weight(torch.randn(64, 256), -1) for _ in range(2)]
    layer = torch.nn.Module()
    method = QoQLinearMethod(QoQConfig(group_size=-1), prefix="model.layers.0.mlp.gate_up_proj")
    method.create_weights(layer, 256, [64, 64], 256, 128, torch.bfloat16, weight_loader=_loader)
    for name in fmt.CHANNEL_TENSORS:
        p = getattr(layer, name)
        for part in (0, 1):
            if name == "szeros" and part == 1:
                continue  # up_proj.szeros is missing from the checkpoint
            p.weight_loader(p, q[part][name], part)
    with pytest.raises(ValueError, match=r"gate_up_proj.szeros were not found.*gate/up"):
        method.process_weights_after_loading(layer)
