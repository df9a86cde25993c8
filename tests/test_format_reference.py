"""Packing, RTN quantizers and the reference GEMMs (the spec) on CPU."""

import pytest
import torch

from vllm_qoq import format as fmt
from vllm_qoq.reference import gemm as ref
from vllm_qoq.reference.quantize import (
    dequantize_activation,
    quantize_activation,
    quantize_weight,
    quantize_weight_g128,
)


def test_pack_unpack_round_trip_and_nibble_order():
    g = torch.Generator().manual_seed(0)
    u = torch.randint(0, 16, (7, 38), generator=g, dtype=torch.uint8)
    p = fmt.pack_int4(u)
    assert p.shape == (7, 19) and p.dtype == torch.uint8
    assert torch.equal(fmt.unpack_int4(p), u)
    # even k in the low nibble, odd k in the high nibble
    assert int(p[0, 0]) == int(u[0, 0]) | (int(u[0, 1]) << 4)


@pytest.mark.parametrize("bad", [torch.tensor([[16, 0]]), torch.tensor([[-1, 0]]), torch.zeros(1, 3)])
def test_pack_rejects_bad_codes(bad):
    with pytest.raises(ValueError):
        fmt.pack_int4(bad)


@pytest.mark.parametrize("gs", [-1, 128])
def test_rtn_error_is_bounded(gs):
    torch.manual_seed(0)
    w = torch.randn(96, 384)
    q = quantize_weight(w, gs)
    fmt.validate_layer(q, gs, "layer")
    wh = fmt.dequantize_weight(q, gs)
    # RTN of a Gaussian row with 16 levels: relative error well under 20%,
    # per-channel worst element at most ~half a step (+fp16 rounding)
    rel = (wh - w).norm() / w.norm()
    assert rel < 0.2
    if gs == -1:
        step = q["scales"].float()[:, None]
        assert ((wh - w).abs() <= 0.5 * step + 1e-3).all()


def test_g128_invariants_hold_with_outliers():
    torch.manual_seed(1)
    w = torch.randn(64, 512)
    w[3, 7] = 40.0  # an outlier channel value: level 1 must absorb it
    w[5, 128:256] = 0.0  # an all-zero group: integer scale stays >= 1
    q = quantize_weight_g128(w)
    s2, z = q["s2_scales"].int(), q["s2_zeros"].int()
    assert s2.min() >= 1 and s2.max() <= 16 and z.min() >= 0 and z.max() <= 15
    u = fmt.unpack_int4(q["qweight"]).int().reshape(64, 4, 128)
    q8 = s2[..., None] * (u - z[..., None])
    assert q8.min() >= -128 and q8.max() <= 127
    assert (u * s2[..., None]).max() <= 240  # no carry between packed 8-bit lanes
    wh = fmt.dequantize_weight(q, 128)
    assert torch.equal(wh[5, 128:256], torch.zeros(128))


@pytest.mark.parametrize("k", [576, 200, 77, 1536])
def test_g128_pads_k_with_zero_codes(k):
    torch.manual_seed(k)
    n = 48
    kp = -(-k // 128) * 128
    w = torch.randn(n, k)
    q = quantize_weight(w, 128)
    assert q["qweight"].shape == (n, kp // 2)
    assert q["s2_scales"].shape == q["s2_zeros"].shape == (n, kp // 128)
    fmt.validate_layer(q, 128, "layer", k=k)
    # the padding columns hold the zero code of their group: q8 = 0 exactly
    u = fmt.unpack_int4(q["qweight"])
    assert torch.equal(u[:, k:], q["s2_zeros"][:, -1:].expand(n, kp - k))
    q8 = fmt.int8_weight_g128(q["qweight"], q["s2_scales"], q["s2_zeros"])
    assert not q8[:, k:].any()
    # it is exactly the quantization of the zero-padded weight (a group's range holds 0)
    qp = quantize_weight(torch.nn.functional.pad(w, (0, kp - k)), 128)
    assert all(torch.equal(q[name], qp[name]) for name in q)
    full = fmt.dequantize_weight(q, 128)
    assert full.shape == (n, kp) and not full[:, k:].any()
    wh = fmt.dequantize_weight(q, 128, k)
    assert wh.shape == (n, k) and torch.equal(wh, full[:, :k])
    assert (wh - w).norm() / w.norm() < 0.2
    with pytest.raises(ValueError, match="stores"):
        fmt.dequantize_weight(q, 128, kp + 1)


def test_g128_padding_is_validated():
    k = 200
    q = quantize_weight(torch.randn(32, k), 128)
    with pytest.raises(ValueError, match=r"up_proj.qweight: expected uint8 \[32, 192\] for input size K=300"):
        fmt.validate_layer(q, 128, "up_proj", k=300)  # the tensors of another K
    u = fmt.unpack_int4(q["qweight"])
    u[5, 230] = (int(u[5, 230]) + 1) % 16  # a padding column that is not weight 0
    bad = dict(q, qweight=fmt.pack_int4(u))
    fmt.validate_layer(bad, 128, "up_proj")  # structurally fine without K ...
    with pytest.raises(ValueError, match="up_proj.qweight: the padding columns 200..255 must hold the zero code"):
        fmt.validate_layer(bad, 128, "up_proj", k=k)  # ... but not a K=200 layer
    fmt.validate_layer(bad, 128, "up_proj", k=k, check_padding=False)  # dummy weights: shapes only
    unpadded = {**q, "qweight": q["qweight"][:, :100], "s2_scales": q["s2_scales"][:, :1],
                "s2_zeros": q["s2_zeros"][:, :1]}
    with pytest.raises(ValueError, match="K=200 codes per row, not a multiple of 128"):
        fmt.validate_layer(unpadded, 128, "up_proj")


def test_per_channel_k_is_not_padded():
    q = quantize_weight(torch.randn(32, 576), -1)
    assert q["qweight"].shape == (32, 288)
    assert fmt.padded_k(576, -1) == 576 and fmt.padded_k(576, 128) == 640 and fmt.padded_k(640, 128) == 640
    with pytest.raises(ValueError, match="odd"):
        quantize_weight(torch.randn(32, 77), -1)


def test_activation_quant_properties():
    x = torch.randn(9, 200, dtype=torch.bfloat16) * 3
    x[4] = 0  # all-zero row: guarded
    qx, sx, qsum = quantize_activation(x)
    assert qx.dtype == torch.int8 and sx.dtype == torch.float32 and qsum.dtype == torch.int32
    assert qx.abs().max() == 127 and sx[4] == 1.0 and (qx[4] == 0).all()
    assert torch.equal(qsum, qx.int().sum(1))
    err = (dequantize_activation(qx, sx) - x.float()).abs()
    assert (err <= 0.5 * sx[:, None] + 1e-6).all()


@pytest.mark.parametrize("k", [576, 200, 77, 1536])
def test_g128_gemm_on_padded_k_equals_unpadded_math(k):
    """quantize -> pack -> reference GEMM on zero-padded activations = fake-quant math on [N, K]."""
    torch.manual_seed(k)
    n, m = 40, 7
    w = torch.randn(n, k) * 0.05
    x = torch.randn(m, k, dtype=torch.bfloat16)
    q = quantize_weight(w, 128)
    qx, sx, _ = quantize_activation(x)
    qxp, sxp, _ = quantize_activation(fmt.pad_k(x, 128))
    assert torch.equal(qxp[:, :k], qx) and not qxp[:, k:].any() and torch.equal(sxp, sx)
    y = ref.w4a8_g128_gemm(qxp, sxp, q["qweight"], q["s1_scales"], q["s2_scales"], q["s2_zeros"],
                           None, torch.float32)
    expect = dequantize_activation(qx, sx).double() @ fmt.dequantize_weight(q, 128, k).double().t()
    torch.testing.assert_close(y.double(), expect, rtol=1e-5, atol=1e-5 * expect.abs().max().item())
    if k % 128:
        with pytest.raises(ValueError, match="pad the activations"):
            ref.w4a8_g128_gemm(qx, sx, q["qweight"], q["s1_scales"], q["s2_scales"], q["s2_zeros"],
                               None, torch.float32)


@pytest.mark.parametrize("gs", [-1, 128])
@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_reference_gemm_equals_dequantized_matmul(gs, m, dtype, with_bias):
    torch.manual_seed(m)
    n, k = 96, 640
    w = torch.randn(n, k) * 0.05
    x = torch.randn(m, k, dtype=dtype)
    q = quantize_weight(w, gs)
    qx, sx, qsum = quantize_activation(x)
    bias = torch.randn(n, dtype=dtype) if with_bias else None
    if gs == -1:
        y = ref.w4a8_chn_gemm(qx, sx, qsum, q["qweight"], q["scales"], q["szeros"], bias, dtype)
    else:
        y = ref.w4a8_g128_gemm(
            qx, sx, q["qweight"], q["s1_scales"], q["s2_scales"], q["s2_zeros"], bias, dtype
        )
    assert y.dtype == dtype and y.shape == (m, n)
    expect = dequantize_activation(qx, sx).double() @ fmt.dequantize_weight(q, gs).double().t()
    if bias is not None:
        expect = expect + bias.double()
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(y.double(), expect.to(dtype).double(), atol=tol * expect.abs().max().item(), rtol=tol)
    # and it approximates the float product it stands for
    flt = x.double() @ w.double().t() + (bias.double() if bias is not None else 0)
    assert (y.double() - flt).norm() / flt.norm() < 0.2


def test_int_matmul_exact_at_extremes():
    k = 4096
    a = torch.full((2, k), -127, dtype=torch.int8)
    b = torch.full((3, k), -128, dtype=torch.int8)
    assert (ref.int_matmul(a, b) == 127 * 128 * k).all()


@pytest.mark.parametrize("k", [32, 576, 1024, 2500, 5120])
def test_int_matmul_matches_int64_products(k):
    g = torch.Generator().manual_seed(k)
    a = torch.randint(-128, 128, (7, k), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (5, k), dtype=torch.int8, generator=g)
    a[0] = -128  # a chunk of 1024 products of 2^14 each: partial sums of exactly 2^24
    b[0] = -128
    expect = (a.to(torch.int64)[:, None, :] * b.to(torch.int64)[None, :, :]).sum(-1)
    got = ref.int_matmul(a, b)
    assert got.dtype == torch.int32
    assert torch.equal(got.to(torch.int64), expect)
    assert got[0, 0].item() == 128 * 128 * k


def test_validate_layer_names_the_problem():
    q = quantize_weight(torch.randn(32, 256), 128)
    bad = dict(q)
    del bad["s2_zeros"]
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj: missing tensor\(s\) s2_zeros"):
        fmt.validate_layer(bad, 128, "model.layers.0.mlp.up_proj")
    bad = dict(q, s1_scales=q["s1_scales"].float())
    with pytest.raises(ValueError, match="s1_scales"):
        fmt.validate_layer(bad, 128, "x")
