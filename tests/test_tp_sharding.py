"""Tensor-parallel loading of the packed format through vLLM's own parameter classes.

Simulates TP ranks 2 and 4 by building each rank's parameters with
QoQLinearMethod.create_weights and loading the full checkpoint tensors with
vLLM's weight-loader-v2 methods (load_qkv_weight, load_merged_column_weight,
load_row_parallel_weight).  Each rank's loaded tensors must dequantize to exactly
its slice of the full dequantized weight, and apply() must equal the reference.
g128 with K % 128 != 0 (SmolLM2's hidden 576): column-parallel layers keep the
whole, zero-padded K and load at any TP; row-parallel layers load at TP 1 and
are refused when split along K.
"""

import pytest
import torch

pytest.importorskip("vllm")

import vllm.model_executor.parameter as vparam  # noqa: E402

from vllm_qoq import format as fmt  # noqa: E402
from vllm_qoq.config import QoQConfig  # noqa: E402
from vllm_qoq.linear import QoQLinearMethod  # noqa: E402
from vllm_qoq.reference.quantize import quantize_activation, quantize_weight  # noqa: E402

HIDDEN, HEAD_DIM, N_HEADS, N_KV, FFN = 512, 64, 8, 4, 1024


def _layer(gs, out_sizes, k, input_size=None, prefix="test"):
    layer = torch.nn.Module()
    method = QoQLinearMethod(QoQConfig(group_size=gs), prefix=prefix)
    method.create_weights(layer, k, out_sizes, input_size or k, sum(out_sizes), torch.bfloat16,
                          weight_loader=None)
    return layer, method


def _params(layer, gs):
    return {n: getattr(layer, n) for n in fmt.tensor_names(gs)}


def _check_and_apply(layer, method, gs, w_hat_slice):
    k = w_hat_slice.shape[1]
    got = fmt.dequantize_weight({n: p.data for n, p in _params(layer, gs).items()}, gs, k)
    assert torch.equal(got, w_hat_slice)
    method.process_weights_after_loading(layer)
    x = torch.randn(3, w_hat_slice.shape[1], dtype=torch.bfloat16)
    y = method.apply(layer, x)
    qx, sx, _ = quantize_activation(x)
    expect = (qx.double() * sx.double()[:, None]) @ w_hat_slice.double().t()
    torch.testing.assert_close(y.double(), expect.to(torch.bfloat16).double(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("gs", [-1, 128])
@pytest.mark.parametrize("tp_size", [2, 4])
@pytest.mark.parametrize("hidden", [HIDDEN, 576])
def test_merged_qkv_column_parallel(tp, gs, tp_size, hidden):
    torch.manual_seed(0)
    sizes = {"q": N_HEADS * HEAD_DIM, "k": N_KV * HEAD_DIM, "v": N_KV * HEAD_DIM}
    full = {s: quantize_weight(torch.randn(n, hidden), gs) for s, n in sizes.items()}
    deq = {s: fmt.dequantize_weight(t, gs, hidden) for s, t in full.items()}
    tp["size"] = tp_size
    for rank in range(tp_size):
        tp["rank"] = rank
        per = {s: n // tp_size for s, n in sizes.items()}
        layer, method = _layer(gs, [per["q"], per["k"], per["v"]], hidden)
        offset = 0
        for shard in ("q", "k", "v"):
            for name, p in _params(layer, gs).items():
                p.load_qkv_weight(full[shard][name], shard_id=shard, shard_offset=offset,
                                  shard_size=per[shard], num_heads=1)
            offset += per[shard]
        expect = torch.cat([deq[s][rank * per[s]:(rank + 1) * per[s]] for s in ("q", "k", "v")])
        _check_and_apply(layer, method, gs, expect)


@pytest.mark.parametrize("gs", [-1, 128])
@pytest.mark.parametrize("tp_size", [2, 4])
@pytest.mark.parametrize("hidden", [HIDDEN, 576])
def test_merged_gate_up_column_parallel(tp, gs, tp_size, hidden):
    torch.manual_seed(1)
    full = [quantize_weight(torch.randn(FFN, hidden), gs) for _ in range(2)]
    deq = [fmt.dequantize_weight(t, gs, hidden) for t in full]
    tp["size"] = tp_size
    per = FFN // tp_size
    for rank in range(tp_size):
        tp["rank"] = rank
        layer, method = _layer(gs, [per, per], hidden)
        for i in range(2):
            for name, p in _params(layer, gs).items():
                p.load_merged_column_weight(full[i][name], shard_offset=i * per, shard_size=per)
        expect = torch.cat([d[rank * per:(rank + 1) * per] for d in deq])
        _check_and_apply(layer, method, gs, expect)


@pytest.mark.parametrize("gs", [-1, 128])
@pytest.mark.parametrize("tp_size", [2, 4])
def test_down_proj_row_parallel(tp, gs, tp_size):
    torch.manual_seed(2)
    full = quantize_weight(torch.randn(HIDDEN, FFN), gs)
    deq = fmt.dequantize_weight(full, gs)
    tp["size"] = tp_size
    per = FFN // tp_size
    for rank in range(tp_size):
        tp["rank"] = rank
        layer, method = _layer(gs, [HIDDEN], per)
        for name, p in _params(layer, gs).items():
            # what RowParallelLinear.weight_loader_v2 calls; per-output-channel
            # scales (not RowvLLMParameter) load whole, i.e. replicated
            p.load_row_parallel_weight(full[name])
        _check_and_apply(layer, method, gs, deq[:, rank * per:(rank + 1) * per])


@pytest.mark.parametrize("k", [576, 200])
def test_g128_row_parallel_padded_k_at_tp1(tp, k):
    """o_proj of SmolLM2 (K=576): one rank holds the whole, zero-padded K."""
    torch.manual_seed(3)
    full = quantize_weight(torch.randn(HIDDEN, k), 128)
    layer, method = _layer(128, [HIDDEN], k, k)
    assert layer.qweight.shape == (HIDDEN, fmt.padded_k(k, 128) // 2)
    for name, p in _params(layer, 128).items():
        p.load_row_parallel_weight(full[name])
    _check_and_apply(layer, method, 128, fmt.dequantize_weight(full, 128, k))


def test_g128_rejects_rank_slice_not_multiple_of_128(tp):
    tp["size"] = 2
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.o_proj: row-parallel layer with "
                       r"K=576 split .* into K=288 per rank.*--tensor-parallel-size 1.*--group-size -1"):
        _layer(128, [HIDDEN], 288, 576, prefix="model.layers.0.self_attn.o_proj")
    tp["size"] = 4
    with pytest.raises(ValueError, match="K=192 per rank"):
        _layer(128, [HIDDEN], 192, 768)  # K % 128 == 0, but not per rank
    _layer(128, [HIDDEN], 256, 1024)  # multiples of 128 per rank: fine
