"""The CUDA kernels' weight layout (vllm_qoq/kernel_layout.py) on CPU.

Two independent checks: the reorder is a permutation (exact round trip, padding
included), and every code sits at the byte/nibble the kernel documentation
(csrc/gemm/w4a8_sm80.cuh) says a lane reads it from -- the addressing formula
is recomputed here by hand, not through the packer.
"""

import pytest
import torch

from vllm_qoq import format as fmt
from vllm_qoq import kernel_layout as kl
from vllm_qoq.reference.quantize import quantize_weight


def _rand_codes(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("n,k", [(32, 32), (96, 576), (64, 256), (80, 128), (5, 64)])
def test_qweight_round_trip(n, k):
    u = _rand_codes(n, k, n * 1000 + k)
    qw = fmt.pack_int4(u)
    kq = kl.pack_qweight(qw)
    np_ = (n + 31) // 32 * 32
    assert kq.shape == (np_, k // 2) and kq.dtype == torch.uint8
    assert torch.equal(kl.unpack_qweight(kq, n), qw)


def test_padding_rows_are_zero_codes():
    n, k = 40, 64
    u = torch.full((n, k), 15, dtype=torch.uint8)
    kq = kl.pack_qweight(fmt.pack_int4(u))
    full = fmt.unpack_int4(kl.pack_qweight(fmt.pack_int4(torch.cat([u, torch.zeros(24, k, dtype=torch.uint8)]))))
    assert torch.equal(fmt.unpack_int4(kq), full)
    # exactly N*K codes are 15, the rest 0
    assert int((fmt.unpack_int4(kq) == 15).sum()) == n * k
    assert int((fmt.unpack_int4(kq) == 0).sum()) == 24 * k


def test_qweight_matches_documented_lane_addressing():
    n, k = 64, 96
    u = _rand_codes(n, k, 7)
    kq = kl.pack_qweight(fmt.pack_int4(u)).reshape(-1)
    kblocks = k // 32
    for nn in range(n):
        nc, rem = divmod(nn, 32)
        j, g = divmod(rem, 8)
        for kk in range(k):
            kc, r = divmod(kk, 32)
            h, r = divmod(r, 16)
            t, i = divmod(r, 4)
            lane = 4 * g + t
            byte = int(kq[((nc * kblocks + kc) * 32 + lane) * 16 + 4 * j + i])
            code = (byte >> 4) if h else (byte & 0xF)
            assert code == int(u[nn, kk]), (nn, kk)


def test_group_params_layout_and_round_trip():
    torch.manual_seed(1)
    n, k = 72, 512
    q = quantize_weight(torch.randn(n, k), 128)
    s2, zneg = kl.pack_group_params(q["s2_scales"], q["s2_zeros"])
    np_ = 96
    assert s2.shape == (k // 128, np_) and zneg.shape == (k // 128, np_)
    for nn in range(n):
        blk, rem = divmod(nn, 32)
        j, g = divmod(rem, 8)
        col = 32 * blk + 4 * g + j
        for grp in range(k // 128):
            sv = int(q["s2_scales"][nn, grp])
            zv = int(q["s2_zeros"][nn, grp])
            assert int(s2[grp, col]) == sv
            assert int(zneg[grp, col]) == (-zv * sv) % 256
    # padding channels 72..95 (block 2, rem = 8..31): scale 0, zero 0
    for nn in range(n, np_):
        j, g = divmod(nn - 64, 8)
        assert int(s2[:, 64 + 4 * g + j].abs().sum()) == 0
        assert int(zneg[:, 64 + 4 * g + j].abs().sum()) == 0
    s2b, zb = kl.unpack_group_params(s2, zneg, n)
    assert torch.equal(s2b, q["s2_scales"]) and torch.equal(zb, q["s2_zeros"])


def test_dequant_trick_reproduces_q8():
    """u*s2 (one multiply of packed bytes) + zneg per byte == s2*(u - z) as int8."""
    torch.manual_seed(2)
    q = quantize_weight(torch.randn(64, 256), 128)
    q8 = fmt.int8_weight_g128(q["qweight"], q["s2_scales"], q["s2_zeros"]).to(torch.int32)
    u = fmt.unpack_int4(q["qweight"]).to(torch.int32).reshape(64, 2, 128)
    s2 = q["s2_scales"].to(torch.int32)[:, :, None]
    zneg = torch.remainder(-q["s2_zeros"].to(torch.int32)[:, :, None] * s2, 256)
    assert int((u * s2).max()) <= 240  # no carry into the next byte
    byte = (u * s2 + zneg) % 256
    as_int8 = torch.where(byte >= 128, byte - 256, byte).reshape(64, 256)
    assert torch.equal(as_int8, q8)


@pytest.mark.parametrize("gs", [-1, 128])
def test_to_from_kernel_layout(gs):
    torch.manual_seed(3)
    q = quantize_weight(torch.randn(48, 256), gs)
    q["bias"] = torch.randn(48)
    kt = kl.to_kernel_layout(q, gs)
    assert kt["bias"] is q["bias"]
    back = kl.from_kernel_layout(kt, gs)
    for name, t in q.items():
        assert torch.equal(back[name], t), name


def test_rejects_k_not_multiple_of_32():
    q = fmt.pack_int4(torch.zeros(32, 48, dtype=torch.uint8))
    with pytest.raises(ValueError, match="K % 32"):
        kl.pack_qweight(q)
