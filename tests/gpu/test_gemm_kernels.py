"""CUDA W4A8 GEMMs and the per-token activation quantizer vs the PyTorch reference.

* quantize_per_token: bit-exact (qx, sx, qsum) with reference.quantize_activation.
* GEMM accumulators: the debug op qoq_debug::w4a8_acc returns the kernels' raw int32
  accumulators (same kernels, same tile selection as the real ops; path 1 = mma.sync
  kernels, 3/4 = Hopper wgmma kernels without/with CTA-pair multicast, 7 = persistent
  wgmma); they must equal the exact integer product over a sweep of M, N, K for both
  variants and every path.  Path 7 is also forced onto a few CTAs (max_ctas) so that every
  shape runs many tiles per CTA through one continuing mbarrier ring.
* Path 7's float outputs (qoq_debug::w4a8_gemm: the real ops' computation through one
  forced path) are bit-identical to path 3's (same fp32 epilogue formula and order), with
  the default shared-memory/TMA-store epilogue and with VLLM_QOQ_GEMM_EPILOGUE=regs; all
  path-7 tests run again under the ping-pong schedule (VLLM_QOQ_GEMM_P7_SCHEDULE=pingpong,
  a subprocess).
* GEMM outputs (fp16/bf16, with and without bias): within fp tolerance of the reference
  ops (reference/gemm.py) run on the natural layout.
* Split-K workspace is self-cleaning (repeated calls agree) and the ops replay in a CUDA graph.
"""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"),
]

if torch.cuda.is_available():
    from vllm_qoq import format as fmt
    from vllm_qoq import kernel_layout as kl
    from vllm_qoq import ops
    from vllm_qoq.reference import gemm as ref
    from vllm_qoq.reference.quantize import quantize_activation, quantize_weight

    ops.register_ops()
    if not ops.has_cuda_kernels():
        pytest.skip(f"vllm_qoq._C not built: {ops.extension_error()}", allow_module_level=True)

DEV = "cuda"
M_SWEEP = [1, 3, 16, 17, 64, 255, 1024, 4097]
NK_SWEEP = [(32, 128), (96, 576), (4096, 4096), (4096, 14336), (160, 1024)]


def _gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def _x(m, k, dtype, seed):
    return (torch.randn(m, k, device=DEV, generator=_gen(seed)) * 3).to(dtype)


def _weights(n, k, gs, seed):
    w = torch.randn(n, k, device=DEV, generator=_gen(seed))
    return quantize_weight(w, gs)


def _exact_acc(qx, w8):
    """Exact int32 qx @ w8^T: torch._int_mm where it applies, float64 otherwise."""
    m, k = qx.shape
    if m > 16 and k % 8 == 0 and w8.shape[0] % 8 == 0:
        return torch._int_mm(qx, w8.t().contiguous())
    return (qx.double() @ w8.double().t()).to(torch.int32)


# ---------------------------------------------------------------- activation quant
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k", [(1, 576), (3, 128), (17, 4096), (255, 14336), (1024, 576),
                                 (4, 100), (2, 40000), (5, 8192), (7, 32768)])
def test_quantize_per_token_bit_exact(m, k, dtype):
    x = _x(m, k, dtype, m * 7 + k)
    if m > 2:
        x[1] = 0  # all-zero row: sx = 1, qx = 0
        x[2, : min(k, 5)] = 1e-3  # tiny amax
    qx, sx, qsum = ops.quantize_per_token(x)
    # The spec is the reference on CPU: there `amax / 127.0` is an IEEE division.  (On
    # CUDA, torch divides by a Python scalar as a multiply by its reciprocal, which can
    # differ by one ulp, so the reference must not be evaluated on the GPU here.)
    rqx, rsx, rqsum = quantize_activation(x.cpu())
    assert qx.dtype == torch.int8 and sx.dtype == torch.float32 and qsum.dtype == torch.int32
    assert torch.equal(sx.cpu(), rsx)
    assert torch.equal(qx.cpu(), rqx)
    assert torch.equal(qsum.cpu(), rqsum)


def test_quantize_per_token_3d_and_ties():
    # values at exact .5 multiples of the scale exercise round-half-even
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 126.5, -127.0]], device=DEV)
    x = x.to(torch.bfloat16).reshape(1, 1, 8).repeat(2, 3, 16)
    qx, sx, qsum = ops.quantize_per_token(x)
    rqx, rsx, rqsum = quantize_activation(x.cpu())
    assert qx.shape == (2, 3, 128) and sx.shape == (2, 3)
    assert torch.equal(qx.cpu(), rqx) and torch.equal(sx.cpu(), rsx) and torch.equal(qsum.cpu(), rqsum)
    assert qx[0, 0, :8].tolist() == [127, 0, 2, 2, 0, -2, 126, -127]


# ---------------------------------------------------------------- exact accumulators
# 1: mma.sync (sm_80+); 3: wgmma (sm_90a); 4: wgmma with CTA pairs sharing the activation
# tile through TMA multicast; 5: the dp4a GEMV (M <= 16; the real ops use it for
# M <= VLLM_QOQ_GEMV_MAX_M, default 2; 4 for g128 off sm_90); 6: the mma.sync weight stream
# (M <= 32; real ops up to VLLM_QOQ_MMV_MAX_M, default off; 8 for g128 off sm_90); 7: persistent wgmma
# (path 3 where the tiles fit in one wave); 8: the weight stream through per-warp rings (M <= 32;
# the real ops' default on sm_90 at M = 2-32 where its grid fits one wave, docs/kernels.md).
# (2 = the wgmma default.)
PATHS = [1, 3, 4, 5, 6, 7, 8]
MAX_M = {5: 16, 6: 32, 8: 32}


def _need_path(path):
    if path >= 2 and not torch.ops.qoq_debug.sm90_available():
        pytest.skip("no sm_90a wgmma kernels on this GPU/build")


def _acc_case(m, n, k, gs, seed, path=0, max_ctas=0):
    q = _weights(n, k, gs, seed)
    kt = kl.to_kernel_layout(q, gs)
    qx = torch.randint(-127, 128, (m, k), device=DEV, dtype=torch.int8, generator=_gen(seed + 1))
    if gs == -1:
        w8 = fmt.unpack_int4(q["qweight"]).to(torch.int8)
        acc = torch.ops.qoq_debug.w4a8_acc(qx, kt["qweight"], None, None, n, path, max_ctas)
    else:
        w8 = fmt.int8_weight_g128(q["qweight"], q["s2_scales"], q["s2_zeros"])
        acc = torch.ops.qoq_debug.w4a8_acc(qx, kt["qweight"], kt["s2_scales"], kt["s2_zeros"], n,
                                           path, max_ctas)
    return acc, _exact_acc(qx, w8)


def _few_ctas(m, n, k):
    """CTAs for the forced persistent kernel: few enough that every CTA runs many tiles
    (the stage ring wraps across tile boundaries at every phase offset), many enough that
    the large shapes stay quick; 0 (= as the real ops) for the largest."""
    ops_ = m * n * k
    return 2 if ops_ <= 2**30 else 7 if ops_ <= 2**34 else 0


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("gs", [-1, 128])
@pytest.mark.parametrize("n,k", NK_SWEEP)
@pytest.mark.parametrize("m", M_SWEEP)
def test_int32_accumulators_exact(m, n, k, gs, path):
    if gs == 128 and k % 128:
        pytest.skip("g128 needs K % 128 == 0")
    if m > MAX_M.get(path, m):
        pytest.skip(f"path {path} serves M <= {MAX_M[path]}")
    _need_path(path)
    acc, want = _acc_case(m, n, k, gs, seed=m + n + k, path=path)
    assert acc.dtype == torch.int32 and acc.shape == (m, n)
    assert torch.equal(acc, want), f"{int((acc != want).sum())} of {acc.numel()} differ"


@pytest.mark.parametrize("gs", [-1, 128])
@pytest.mark.parametrize("n,k", NK_SWEEP + [(33, 256), (1000, 128)])
@pytest.mark.parametrize("m", M_SWEEP)
def test_persistent_int32_exact_few_ctas(m, n, k, gs):
    """Path 7 with the persistent kernel forced (no one-wave fallback) on a few CTAs."""
    if gs == 128 and k % 128:
        pytest.skip("g128 needs K % 128 == 0")
    _need_path(7)
    acc, want = _acc_case(m, n, k, gs, seed=3 * m + n + k, path=7, max_ctas=_few_ctas(m, n, k))
    assert acc.dtype == torch.int32 and acc.shape == (m, n)
    assert torch.equal(acc, want), f"{int((acc != want).sum())} of {acc.numel()} differ"


@pytest.mark.parametrize("gs", [-1, 128])
@pytest.mark.parametrize("m,n,k", [
    (16, 6144, 4096),    # 64-channel tiles, stream-K shares rounded up to whole tiles
    (16, 10240, 8192),   # 64-channel tiles, exact shares (rounding would idle > 30% of slots)
    (16, 16384, 2816),   # 128-channel tiles, exact shares crossing tile boundaries
    (9, 28672, 1024),    # 128-channel tiles, one CTA per tile
    (3, 16416, 640),     # 128-channel tiles: a partial last tile and a partial k-tile
    (16, 20000, 384),    # N % 32 != 0 on the wide tiles
])
def test_mma_small_m_configurations(m, n, k, gs):
    """Path 1 at M <= 16 picks its tile configuration and stream-K shares by shape on sm_90
    (csrc/gemm/w4a8_sm80.cuh, dispatch); each of its cases stays exact (elsewhere these all
    run the one configuration, and must be exact too)."""
    acc, want = _acc_case(m, n, k, gs, seed=5 * m + n + k, path=1)
    assert torch.equal(acc, want), f"{int((acc != want).sum())} of {acc.numel()} differ"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("gs", [-1, 128])
@pytest.mark.parametrize("n", [80, 40])  # N % 32 != 0: padded kernel layout
def test_int32_accumulators_padded_n(n, gs, path):
    _need_path(path)
    for m in (1, 33, 300) if path not in MAX_M else (1, 5, 16):
        acc, want = _acc_case(m, n, 256, gs, seed=n + m, path=path)
        assert torch.equal(acc, want)


@pytest.mark.parametrize("path", PATHS)
def test_g128_extreme_codes(path):
    """Largest |q8| products (s2 = 16, u at both ends) stay exact."""
    n, k = 64, 512
    u = torch.randint(0, 2, (n, k), device=DEV, dtype=torch.uint8, generator=_gen(5)) * 15
    s2 = torch.full((n, k // 128), 16, device=DEV, dtype=torch.uint8)
    z = torch.full((n, k // 128), 8, device=DEV, dtype=torch.uint8)
    # q8 = 16*(u - 8) in {-128, 112}
    qw = fmt.pack_int4(u)
    kt = kl.to_kernel_layout(
        {"qweight": qw, "s1_scales": torch.ones(n, device=DEV, dtype=torch.float16),
         "s2_scales": s2, "s2_zeros": z}, 128)
    qx = torch.full((20 if path != 5 else 16, k), -127, device=DEV, dtype=torch.int8)
    qx[::2] = 127
    _need_path(path)
    acc = torch.ops.qoq_debug.w4a8_acc(qx, kt["qweight"], kt["s2_scales"], kt["s2_zeros"], n, path)
    w8 = fmt.int8_weight_g128(qw, s2, z)
    assert int(w8.min()) == -128
    assert torch.equal(acc, _exact_acc(qx, w8))


@pytest.mark.parametrize("path", PATHS)
def test_g128_every_scale_and_zero(path):
    """All 256 (s2, z) pairs of the format (s2 1..16, z 0..15), one per (row, group), with
    codes drawn from the u the format allows there (s2*(u - z) in [-128, 127]), including
    z*s2 > 128 (e.g. s2 = 16, z = 15: u 7..15): the dequantization is exact for each."""
    n, k = 64, 512
    idx = torch.arange(n * (k // 128), device=DEV).reshape(n, k // 128)
    s2 = (idx // 16 + 1).to(torch.uint8)
    z = (idx % 16).to(torch.uint8)
    s2e = s2.to(torch.int32).repeat_interleave(128, dim=1)
    ze = z.to(torch.int32).repeat_interleave(128, dim=1)
    # valid codes per element: u in [lo, hi], lo = z - floor(128 / s2), hi = z + floor(127 / s2)
    lo = (ze - 128 // s2e).clamp(min=0)
    hi = (ze + 127 // s2e).clamp(max=15)
    r = torch.rand((n, k), device=DEV, generator=_gen(11))
    u = (lo + (r * (hi - lo + 1).float()).floor().to(torch.int32)).clamp(max=15).to(torch.uint8)
    qw = fmt.pack_int4(u)
    w8 = fmt.int8_weight_g128(qw, s2, z)
    q8 = s2e * (u.to(torch.int32) - ze)
    assert int(q8.min()) >= -128 and int(q8.max()) <= 127 and int(q8.min()) == -128
    assert bool(((s2.int() * z.int()) > 128).any())
    kt = kl.to_kernel_layout(
        {"qweight": qw, "s1_scales": torch.ones(n, device=DEV, dtype=torch.float16),
         "s2_scales": s2, "s2_zeros": z}, 128)
    _need_path(path)
    m = 16 if path in MAX_M else 40
    qx = torch.randint(-127, 128, (m, k), device=DEV, dtype=torch.int8, generator=_gen(12))
    acc = torch.ops.qoq_debug.w4a8_acc(qx, kt["qweight"], kt["s2_scales"], kt["s2_zeros"], n, path)
    assert torch.equal(acc, _exact_acc(qx, w8))


@pytest.mark.parametrize("gs", [-1, 128])
def test_split_k_paths_share_a_clean_workspace(gs):
    """Path 3's split-K, the mma.sync tiles' and the weight streams' partial sums all go
    through the one per-device workspace, and each must leave it zeroed: interleaved calls
    stay exact.  M = 256 / 64 / 40 at N = K = 4096 split path 3's K."""
    _need_path(3)
    n, k = 4096, 4096
    for m, path in [(256, 3), (8, 1), (64, 3), (2, 5), (40, 3), (16, 6), (256, 3), (12, 1), (16, 8), (30, 8)]:
        acc, want = _acc_case(m, n, k, gs, seed=m + path, path=path)
        assert torch.equal(acc, want), (m, path)


# ---------------------------------------------------------------- full ops vs reference
OUT_SHAPES = [(32, 128), (96, 576), (4096, 4096), (80, 256)]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gs", [-1, 128])
@pytest.mark.parametrize("n,k", OUT_SHAPES)
@pytest.mark.parametrize("m", [1, 17, 255, 1024])
def test_gemm_matches_reference(m, n, k, gs, dtype, bias):
    if gs == 128 and k % 128:
        pytest.skip("g128 needs K % 128 == 0")
    seed = m * 31 + n + k
    q = _weights(n, k, gs, seed)
    kt = kl.to_kernel_layout(q, gs)
    x = _x(m, k, dtype, seed + 2)
    b = (torch.randn(n, device=DEV, generator=_gen(seed + 3)) * 4).to(dtype) if bias else None
    qx, sx, qsum = ops.quantize_per_token(x)
    if gs == -1:
        y = ops.w4a8_chn_gemm(qx, sx, qsum, kt["qweight"], kt["scales"], kt["szeros"], b, dtype)
        want = ref.w4a8_chn_gemm(qx, sx, qsum, q["qweight"], q["scales"], q["szeros"], b, dtype)
    else:
        y = ops.w4a8_g128_gemm(qx, sx, kt["qweight"], kt["s1_scales"], kt["s2_scales"],
                               kt["s2_zeros"], b, dtype)
        want = ref.w4a8_g128_gemm(qx, sx, q["qweight"], q["s1_scales"], q["s2_scales"],
                                  q["s2_zeros"], b, dtype)
    assert y.dtype == dtype and y.shape == (m, n)
    assert torch.isfinite(y).all()
    # same int32 accumulator, same fp32 epilogue order: at most one output ulp apart
    torch.testing.assert_close(y.float(), want.float(), rtol=1e-2, atol=1e-2)
    ulp_frac = float((y != want).float().mean())
    assert ulp_frac < 0.01, f"{ulp_frac:.3%} of outputs differ from the reference"


def _capture_graph(fn, warmup=None):
    """CUDA graph of fn() captured on a side stream after one eager warm-up call (warmup, or
    fn); returns (graph, fn's output inside the graph)."""
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        (warmup or fn)()
        with torch.cuda.graph(g):
            y = fn()
    torch.cuda.current_stream().wait_stream(s)
    return g, y


def _gemm_path(q, kt, x, b, gs, dtype, path, max_ctas=0):
    qx, sx, qsum = ops.quantize_per_token(x)
    if gs == -1:
        return torch.ops.qoq_debug.w4a8_gemm(qx, sx, qsum, kt["qweight"], kt["scales"],
                                             kt["szeros"], None, None, b, dtype, path, max_ctas)
    return torch.ops.qoq_debug.w4a8_gemm(qx, sx, None, kt["qweight"], kt["s1_scales"], None,
                                         kt["s2_scales"], kt["s2_zeros"], b, dtype, path, max_ctas)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gs", [-1, 128])
# (33, 130: N % 8 != 0, the element-copy fallback of path 7's staged epilogue; 33: the
# second warpgroup of every tile has no channels; 200: its last tile 8 of 64)
@pytest.mark.parametrize("n,k", OUT_SHAPES + [(33, 256), (130, 256), (200, 384), (4096, 14336)])
@pytest.mark.parametrize("m", [17, 1000, 4097])
def test_persistent_outputs_bit_identical_to_path3(m, n, k, gs, dtype, bias):
    """Path 7's epilogue (by default staged in shared memory and written by TMA tensor
    stores, rows past M / channels past N clipped) writes exactly path 3's values, forced
    persistent on a few CTAs and as the real ops run it; both within one output ulp of the
    reference."""
    if gs == 128 and k % 128:
        pytest.skip("g128 needs K % 128 == 0")
    _need_path(7)
    seed = m * 13 + n + k
    q = _weights(n, k, gs, seed)
    kt = kl.to_kernel_layout(q, gs)
    x = _x(m, k, dtype, seed + 2)
    b = (torch.randn(n, device=DEV, generator=_gen(seed + 3)) * 4).to(dtype) if bias else None
    y3 = _gemm_path(q, kt, x, b, gs, dtype, 3)
    assert y3.dtype == dtype and y3.shape == (m, n) and torch.isfinite(y3).all()
    for max_ctas in {_few_ctas(m, n, k), 0}:
        y7 = _gemm_path(q, kt, x, b, gs, dtype, 7, max_ctas)
        assert torch.equal(y7, y3), (
            f"max_ctas={max_ctas}: {int((y7 != y3).sum())} of {y3.numel()} differ from path 3")
    qx, sx, qsum = ops.quantize_per_token(x)
    if gs == -1:
        want = ref.w4a8_chn_gemm(qx, sx, qsum, q["qweight"], q["scales"], q["szeros"], b, dtype)
    else:
        want = ref.w4a8_g128_gemm(qx, sx, q["qweight"], q["s1_scales"], q["s2_scales"],
                                  q["s2_zeros"], b, dtype)
    torch.testing.assert_close(y3.float(), want.float(), rtol=1e-2, atol=1e-2)
    assert float((y3 != want).float().mean()) < 0.01


@pytest.mark.parametrize("gs", [-1, 128])
def test_persistent_epilogue_unaligned_token_scales(gs):
    """sx / qsum views at an odd element offset (no 8-byte token loads in path 7's staged
    epilogue: the scalar path) give path 3's outputs."""
    _need_path(7)
    m, n, k = 1000, 256, 512
    q = _weights(n, k, gs, 21)
    kt = kl.to_kernel_layout(q, gs)
    x = _x(m, k, torch.bfloat16, 22)
    qx, sx, qsum = ops.quantize_per_token(x)
    sx_off = torch.empty(m + 1, device=DEV, dtype=sx.dtype)[1:]
    qsum_off = torch.empty(m + 1, device=DEV, dtype=qsum.dtype)[1:]
    sx_off.copy_(sx)
    qsum_off.copy_(qsum)
    assert sx_off.data_ptr() % 8 == 4 and qsum_off.data_ptr() % 8 == 4
    ys = []
    for sx_, qsum_, path in ((sx, qsum, 3), (sx_off, qsum_off, 7)):
        if gs == -1:
            ys.append(torch.ops.qoq_debug.w4a8_gemm(qx, sx_, qsum_, kt["qweight"], kt["scales"],
                                                    kt["szeros"], None, None, None, torch.bfloat16,
                                                    path, 3))
        else:
            ys.append(torch.ops.qoq_debug.w4a8_gemm(qx, sx_, None, kt["qweight"], kt["s1_scales"],
                                                    None, kt["s2_scales"], kt["s2_zeros"], None,
                                                    torch.bfloat16, path, 3))
    assert torch.equal(ys[1], ys[0]), f"{int((ys[1] != ys[0]).sum())} differ from path 3"


@pytest.mark.parametrize("gs", [-1, 128])
@pytest.mark.parametrize("n", [2048, 2044, 1990])
def test_persistent_bmt192_tiles(n, gs):
    """Shapes where path 7 picks 192-token tiles (the 384-thread setmaxnreg CTA; M = 8191:
    a partial last tile; N % 8 != 0 and a half-empty last warpgroup; 192 is picked on a
    132-SM H100 -- elsewhere this tests 128-token tiles): int32 accumulators
    exact and float outputs bit-identical to path 3, on a few CTAs and on the full grid."""
    _need_path(7)
    m, k = 8191, 256
    acc, want = _acc_case(m, n, k, gs, seed=n + gs, path=7, max_ctas=7)
    assert torch.equal(acc, want), f"{int((acc != want).sum())} of {acc.numel()} differ"
    q = _weights(n, k, gs, n + 1)
    kt = kl.to_kernel_layout(q, gs)
    x = _x(m, k, torch.bfloat16, n + 2)
    b = (torch.randn(n, device=DEV, generator=_gen(n + 3)) * 4).to(torch.bfloat16)
    y3 = _gemm_path(q, kt, x, b, gs, torch.bfloat16, 3)
    for max_ctas in (7, 0):
        y7 = _gemm_path(q, kt, x, b, gs, torch.bfloat16, 7, max_ctas)
        assert torch.equal(y7, y3), (
            f"max_ctas={max_ctas}: {int((y7 != y3).sum())} of {y3.numel()} differ from path 3")


def test_persistent_graph_replay():
    """Path 7 (forced persistent, TMA-store epilogue: the output tensor map is a kernel
    argument) captured in a CUDA graph replays to the eager outputs."""
    _need_path(7)
    m, n, k = 600, 384, 1024
    q = _weights(n, k, 128, 31)
    kt = kl.to_kernel_layout(q, 128)
    x = _x(m, k, torch.float16, 32)
    qx, sx, _ = ops.quantize_per_token(x)

    def run():
        return torch.ops.qoq_debug.w4a8_gemm(qx, sx, None, kt["qweight"], kt["s1_scales"], None,
                                             kt["s2_scales"], kt["s2_zeros"], None, torch.float16,
                                             7, 4)

    first = run()
    assert torch.equal(first, _gemm_path(q, kt, x, None, 128, torch.float16, 3))
    g, y = _capture_graph(run)
    for _ in range(3):
        y.zero_()
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, first)


_REGS_EPILOGUE_SCRIPT = """
import torch
from vllm_qoq import kernel_layout as kl, ops
from vllm_qoq.reference.quantize import quantize_weight
ops.register_ops()
assert ops.has_cuda_kernels(), ops.extension_error()
g = torch.Generator(device="cuda").manual_seed(5)
for (m, n, k, gs) in [(17, 96, 576, -1), (1000, 200, 384, 128), (4097, 33, 256, -1), (1000, 512, 1024, 128)]:
    q = quantize_weight(torch.randn(n, k, device="cuda", generator=g), gs)
    kt = kl.to_kernel_layout(q, gs)
    x = (torch.randn(m, k, device="cuda", generator=g) * 3).to(torch.bfloat16)
    b = (torch.randn(n, device="cuda", generator=g) * 4).to(torch.bfloat16)
    qx, sx, qsum = ops.quantize_per_token(x)
    ys = []
    for path in (3, 7):
        if gs == -1:
            ys.append(torch.ops.qoq_debug.w4a8_gemm(qx, sx, qsum, kt["qweight"], kt["scales"],
                      kt["szeros"], None, None, b, torch.bfloat16, path, 3))
        else:
            ys.append(torch.ops.qoq_debug.w4a8_gemm(qx, sx, None, kt["qweight"], kt["s1_scales"],
                      None, kt["s2_scales"], kt["s2_zeros"], b, torch.bfloat16, path, 3))
    assert torch.equal(ys[0], ys[1]), (m, n, k, gs, int((ys[0] != ys[1]).sum()))
print("OK")
"""


def test_persistent_regs_epilogue_bit_identical_to_path3():
    """The register epilogue kept for A/B (VLLM_QOQ_GEMM_EPILOGUE=regs, read once per
    process: a subprocess) still writes path 3's values."""
    _need_path(7)
    import os
    import subprocess
    import sys

    env = dict(os.environ, VLLM_QOQ_GEMM_EPILOGUE="regs")
    r = subprocess.run([sys.executable, "-c", _REGS_EPILOGUE_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout[-2000:] + r.stderr[-4000:]


@pytest.mark.parametrize("max_ctas", [1, 3])
@pytest.mark.parametrize("gs", [-1, 128])
@pytest.mark.parametrize("m,n,k", [(1000, 200, 384), (300, 130, 256), (64, 520, 640), (4097, 33, 256)])
def test_persistent_int32_exact_one_and_three_ctas(m, n, k, gs, max_ctas):
    """Path 7 forced onto 1 and 3 CTAs: every CTA runs many tiles, an odd or even number of
    them (under VLLM_QOQ_GEMM_P7_SCHEDULE=pingpong: the two consumer warpgroups alternate
    tiles, the last one may have none; one CTA = one strict alternation over all tiles)."""
    if gs == 128 and k % 128:
        pytest.skip("g128 needs K % 128 == 0")
    _need_path(7)
    acc, want = _acc_case(m, n, k, gs, seed=5 * m + n + k + max_ctas, path=7, max_ctas=max_ctas)
    assert torch.equal(acc, want), f"{int((acc != want).sum())} of {acc.numel()} differ"
    q = _weights(n, k, gs, m + n)
    kt = kl.to_kernel_layout(q, gs)
    x = _x(m, k, torch.bfloat16, m + n + 1)
    b = (torch.randn(n, device=DEV, generator=_gen(m + n + 2)) * 4).to(torch.bfloat16)
    y3 = _gemm_path(q, kt, x, b, gs, torch.bfloat16, 3)
    y7 = _gemm_path(q, kt, x, b, gs, torch.bfloat16, 7, max_ctas)
    assert torch.equal(y7, y3), f"{int((y7 != y3).sum())} of {y3.numel()} differ from path 3"


# Every path-7 test of this file (names containing "persistent", bar the subprocess ones),
# plus path 7's column of the int32 sweep.
_PINGPONG_K = "(persistent or (int32_accumulators_exact and 7]) or (g128_extreme_codes and 7])) " \
              "and not pingpong and not regs_epilogue"


def test_persistent_pingpong_schedule_runs_every_path7_test():
    """The ping-pong consumer schedule (VLLM_QOQ_GEMM_P7_SCHEDULE=pingpong, read once per
    process: a subprocess running this file's path-7 tests -- int32 exactness on 1-7 CTAs
    and the full grid, outputs bit-identical to path 3 incl. N % 8 != 0, partial tiles,
    unaligned token scales, CUDA-graph replay).  A deadlock in its ordering barriers shows
    up as the timeout."""
    _need_path(7)
    import os
    import subprocess
    import sys

    env = dict(os.environ, VLLM_QOQ_GEMM_P7_SCHEDULE="pingpong")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                        "-k", _PINGPONG_K], env=env, capture_output=True, text=True, timeout=540)
    tail = r.stdout[-3000:] + r.stderr[-3000:]
    assert r.returncode == 0 and " passed" in r.stdout and " failed" not in r.stdout, tail


DISPATCH_KNOBS = ("VLLM_QOQ_GEMM_PATH", "VLLM_QOQ_GEMV_MAX_M", "VLLM_QOQ_MMV_MAX_M", "VLLM_QOQ_MMR_MAX_M",
                  "VLLM_QOQ_PERSISTENT_MIN_M")


@pytest.mark.parametrize("g128", [False, True])
def test_default_path_follows_the_documented_rule(g128):
    """docs/kernels.md: M = 1 on the GEMV; on sm_90 the ring MMV (path 8) at M = 2-32 where
    N/32 fits one wave of its CTAs, else the GEMV (M = 2), path 1 (M <= 16), wgmma above."""
    import os

    set_knobs = [v for v in DISPATCH_KNOBS if os.environ.get(v)]
    if set_knobs:
        pytest.skip(f"dispatch knobs set: {set_knobs}")
    dp = torch.ops.qoq_debug.default_path
    assert dp(1, 4096, 4096, g128) == 5
    if not torch.ops.qoq_debug.sm90_available():
        assert all(dp(m, 4096, 4096, g128) != 8 for m in range(1, 33))
        return
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    fits = 32 * sms  # one block per SM: one wave at any M
    wide = 32 * 8 * sms  # eight per SM: more than its shared memory lets stay resident
    for m in (2, 3, 8, 16, 17, 24, 32):
        assert dp(m, fits, 4096, g128) == 8, m
        assert dp(m, fits + 17, 576, g128) == 8, m  # N padded to 32, SmolLM2's K
    assert dp(33, fits, 4096, g128) in (3, 4)
    assert dp(2, wide, 4096, g128) == 5
    assert dp(3, wide, 4096, g128) == 1 and dp(16, wide, 4096, g128) == 1
    assert dp(17, wide, 4096, g128) in (3, 4) and dp(32, wide, 4096, g128) in (3, 4)


@pytest.mark.parametrize("path", [5, 6, 8])
@pytest.mark.parametrize("gs", [-1, 128])
@pytest.mark.parametrize("n,k", [(4096, 4096), (96, 576), (1536, 4608), (28672, 4096)])
def test_weight_stream_every_small_m(n, k, gs, path):
    """The GEMV (5), MMV (6) and ring MMV (8: 64 channels per CTA, 32 where N rounded up to
    32 is not a multiple of 64, as at N = 96) against the exact product for every M they serve (each
    register-tile size below and at its capacity), incl. split-K and K % 128 != 0."""
    if gs == 128 and k % 128:
        pytest.skip("g128 needs K % 128 == 0")
    for m in range(1, MAX_M[path] + 1):
        acc, want = _acc_case(m, n, k, gs, seed=7 * m + n + k + gs, path=path)
        assert torch.equal(acc, want), f"M={m}: {int((acc != want).sum())} differ"


def test_wgmma_kernels_present_on_hopper():
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("not an sm_90 GPU")
    # the default build (TORCH_CUDA_ARCH_LIST 8.0;8.9;9.0a) must run the wgmma kernels here
    assert torch.ops.qoq_debug.sm90_available()


# split-K in the GEMV (1), the MMV (8), the mma.sync stream-K (12: g128 goes to path 1 above
# M = 8), the wgmma tiles (100)
@pytest.mark.parametrize("m", [1, 8, 12, 100])
def test_split_k_workspace_self_cleans_and_graph_replay(m):
    n, k = 4096, 4096
    q = _weights(n, k, 128, 11)
    kt = kl.to_kernel_layout(q, 128)
    x = _x(m, k, torch.float16, 12)
    qx, sx, _ = ops.quantize_per_token(x)

    def run():
        return ops.w4a8_g128_gemm(qx, sx, kt["qweight"], kt["s1_scales"], kt["s2_scales"],
                                  kt["s2_zeros"], None, torch.float16)

    first = run()
    for _ in range(3):
        assert torch.equal(run(), first)
    want = ref.w4a8_g128_gemm(qx, sx, q["qweight"], q["s1_scales"], q["s2_scales"],
                              q["s2_zeros"], None, torch.float16)
    torch.testing.assert_close(first, want, rtol=1e-2, atol=1e-3)

    def quantize_and_run():
        qx2, sx2, _ = ops.quantize_per_token(x)
        return ops.w4a8_g128_gemm(qx2, sx2, kt["qweight"], kt["s1_scales"], kt["s2_scales"],
                                  kt["s2_zeros"], None, torch.float16)

    g, y = _capture_graph(quantize_and_run, warmup=run)
    for _ in range(3):
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, first)
