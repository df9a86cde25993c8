// W4A8 GEMM on mma.sync m16n8k32 (sm_80 / sm_89; also runs on sm_90).
//
//   per-channel: acc = sum_k qx[m,k] * u[n,k];   y = sx[m] * (s[n]*acc - szeros[n]*qsum[m])
//   g128:        acc = sum_k qx[m,k] * q8[n,k];  y = (acc * sx[m]) * s1[n],  q8 = s2*(u - z)
//   then + bias, cast to fp16/bf16 (or the raw int32 acc for the debug op).
// The spec is vllm_qoq/reference/gemm.py; acc is exact int32, the fp32 epilogue uses
// explicitly rounded ops (__fmul_rn / __fsub_rn / __fadd_rn: no FMA contraction) in the
// reference's order, so the outputs match it to the last bit in practice.
//
// ---- Layouts read here (produced by vllm_qoq/kernel_layout.py, which says the same) ----
// qx      int8 [M, K] row-major (the activation quantizer's output).
// qweight uint8, Np*K/2 bytes, viewed as [Np/32][K/32][32 lanes][16 bytes]: one 512-byte
//         block per (32 output channels, 32 input channels).  Lane l = 4*g + t of a warp
//         loads its 16 bytes = 4 words; word j (0..3) serves output channel n = 32*nc + 8*j + g
//         (the B fragment of the n8 sub-tile j, see device.cuh): byte i (0..3) of word j holds
//         u[n, 32*kc + 4*t + i] in its low nibble and u[n, 32*kc + 16 + 4*t + i] in its high
//         nibble, so  b0 = w & 0x0F0F0F0F,  b1 = (w >> 4) & 0x0F0F0F0F.
// s2, zneg uint8 [K/128, Np] (g128): row = group, columns permuted inside each block of 32 so
//         that position 4*g + j holds channel 8*j + g: lane g reads one 32-bit word and gets
//         the 4 channels it serves.  zneg = (-z*s2) mod 256.
// scales/szeros/s1 fp16 [N], natural order.
//
// ---- Tiling and pipeline ----
// A CTA computes a BM x BN output tile.  Its warps form a WM x WN x WK grid: (wm, wn) picks a
// TM x TN sub-tile, wk a slice of TK = BK/WK input channels of every BK-wide stage (intra-CTA
// split-K, reduced through shared memory at the end).  STAGES-deep cp.async pipeline; each
// stage holds A (BM x BK int8, 16-byte chunks XOR-swizzled so ldmatrix is conflict-free),
// B (BN x BK/2 bytes in the 512-byte block order above: a warp's 16-byte loads are one
// contiguous 512-byte run) and, for g128, the s2/zneg rows of the stage's groups.
// Across CTAs, stream-K (see the kernel) splits tiles along K: each part of a tile stores its
// partial int32 sums into its own slice of a zeroed workspace; the last part of a tile
// (per-tile counter) adds them up (exact and order-independent), zeroes the slices and the
// counter again (self-cleaning: no memset per call, CUDA-graph safe) and runs the epilogue.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/device.cuh"
#include "gemm/epilogue.cuh"

namespace qoq {
namespace sm80 {

using epi::store2;

template <int BM_, int BN_, int BK_, int WM_, int WN_, int WK_, int STAGES_>
struct TileCfg {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, WM = WM_, WN = WN_, WK = WK_;
  static constexpr int STAGES = STAGES_;
  static constexpr int THREADS = 32 * WM * WN * WK;
  static constexpr int TM = BM / WM, TN = BN / WN, TK = BK / WK;
  static constexpr int MT = TM / 16;  // m16 tiles per warp
  static constexpr int NC = TN / 32;  // n32 blocks per warp
  static constexpr int KS = TK / 32;  // k32 steps per warp per stage
  static constexpr int KC = BK / 32;  // k32 blocks per stage
  static constexpr int GPS = BK >= 128 ? BK / 128 : 1;  // g128 groups per stage
  static constexpr int A_BYTES = BM * BK;
  static constexpr int B_BYTES = BN * BK / 2;
  static constexpr int S_BYTES = 2 * GPS * BN;  // s2 then zneg (g128 only)
  static constexpr int STAGE_BYTES = A_BYTES + B_BYTES + S_BYTES;
  static constexpr int SMEM_BYTES = STAGES * STAGE_BYTES;
  static constexpr int RED_BYTES = (WK - 1) * BM * BN * 4;
  static_assert(TM % 16 == 0 && TN % 32 == 0 && TK % 32 == 0, "warp tile");
  static_assert(BK < 128 ? 128 % BK == 0 : BK % 128 == 0, "a stage covers whole groups");
  static_assert(TK <= 128 && 128 % TK == 0, "a warp's k-slice lies in one g128 group");
  static_assert(RED_BYTES <= SMEM_BYTES, "reduction buffer reuses the pipeline smem");
  static_assert(A_BYTES % 16 == 0 && B_BYTES % 16 == 0 && S_BYTES % 16 == 0, "16B chunks");
};

// XOR swizzle of the 16-byte chunk `ch` of A row `r` (rows are BK bytes): the 8 rows one
// ldmatrix phase reads land in 8 different 16-byte bank groups.
template <int BK>
__device__ __forceinline__ int swz(int r, int ch) {
  constexpr int CPR = BK / 16;
  if constexpr (CPR >= 8) {
    return ch ^ (r & 7);
  } else {
    return ch ^ ((r / (8 / CPR)) & (CPR - 1));
  }
}

template <class C, bool G128>
__device__ __forceinline__ void load_stage(uint8_t* st, const W4A8Args& a, int m0, int n0,
                                           int kt) {
  const int tid = threadIdx.x;
  const int k0 = kt * C::BK;
  // A: BM rows x BK/16 chunks.
  constexpr int ACH = C::BK / 16;
#pragma unroll
  for (int c = tid; c < C::BM * ACH; c += C::THREADS) {
    const int r = c / ACH, ch = c % ACH;
    const int m = m0 + r, k = k0 + ch * 16;
    const bool v = (m < a.M) && (k < a.K);
    const int8_t* src = v ? a.qx + static_cast<int64_t>(m) * a.K + k : a.qx;
    dev::cp_async16(st + r * C::BK + swz<C::BK>(r, ch) * 16, src, v);
  }
  // B: BN/32 blocks x KC k32 blocks x 32 lanes x 16 bytes (the global 512-byte blocks).
  uint8_t* sb = st + C::A_BYTES;
  const int kblocks = a.K / 32;
#pragma unroll
  for (int p = tid; p < C::BN * C::BK / 32; p += C::THREADS) {
    const int nc = p / (C::KC * 32), rem = p % (C::KC * 32);
    const int kk = rem / 32, lane = rem % 32;
    const int ncg = n0 / 32 + nc, kcg = k0 / 32 + kk;
    const bool v = (ncg * 32 < a.Np) && (kcg < kblocks);
    const uint8_t* src =
        v ? a.qweight + ((static_cast<int64_t>(ncg) * kblocks + kcg) * 32 + lane) * 16
          : a.qweight;
    dev::cp_async16(sb + p * 16, src, v);
  }
  if constexpr (G128) {
    uint8_t* ss = sb + C::B_BYTES;
    constexpr int PER = C::GPS * C::BN / 16;  // 16-byte pieces per array
    const int groups = a.K / 128;
    for (int p = tid; p < 2 * PER; p += C::THREADS) {
      const int which = p / PER, q = p % PER;
      const int gi = q / (C::BN / 16), c = q % (C::BN / 16);
      const int grp = k0 / 128 + gi, n = n0 + c * 16;
      const bool v = (grp < groups) && (n < a.Np);
      const uint8_t* base = which ? a.zneg : a.s2;
      const uint8_t* src = v ? base + static_cast<int64_t>(grp) * a.Np + n : base;
      dev::cp_async16(ss + which * C::GPS * C::BN + gi * C::BN + c * 16, src, v);
    }
  }
}

// One segment of the stream-K schedule: output tile `tile`, k-tiles [kb, ke), part `part` of
// the tile's `parts`.  When the segment is the whole K range it writes the outputs; otherwise
// it stores its int32 partial into the workspace (slice `part` of the tile's
// `slices_per_tile`) and the last of the tile's parts to finish adds them up and writes them.
template <class C, bool G128, OutKind OUT>
__device__ __forceinline__ void segment(const W4A8Args& a, uint8_t* smem, int tile, int kb, int ke,
                                        int part, int parts, int slices_per_tile) {
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int g = lane / 4, t = lane % 4;
  const int wk = warp / (C::WM * C::WN), wmn = warp % (C::WM * C::WN);
  const int wm = wmn / C::WN, wn = wmn % C::WN;
  const int tn = (a.N + C::BN - 1) / C::BN;
  const int n0 = (tile % tn) * C::BN, m0 = (tile / tn) * C::BM;
  const int kt0 = kb;
  const int nkt = ke - kb;

  int32_t acc[C::MT][C::NC][4][4];
#pragma unroll
  for (int i = 0; i < C::MT; ++i)
#pragma unroll
    for (int j = 0; j < C::NC; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][q][e] = 0;

#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < nkt) load_stage<C, G128>(smem + s * C::STAGE_BYTES, a, m0, n0, kt0 + s);
    dev::cp_async_commit();
  }

  for (int it = 0; it < nkt; ++it) {
    dev::cp_async_wait<C::STAGES - 2>();
    __syncthreads();
    {
      const int nxt = it + C::STAGES - 1;
      if (nxt < nkt)
        load_stage<C, G128>(smem + (nxt % C::STAGES) * C::STAGE_BYTES, a, m0, n0, kt0 + nxt);
      dev::cp_async_commit();
    }
    const uint8_t* sa = smem + (it % C::STAGES) * C::STAGE_BYTES;
    const uint8_t* sb = sa + C::A_BYTES;

    uint32_t s2w[C::NC], zw[C::NC];
    if constexpr (G128) {
      const uint8_t* ss = sb + C::B_BYTES;
      const int gi = C::BK >= 128 ? (wk * C::TK) / 128 : 0;
#pragma unroll
      for (int nc = 0; nc < C::NC; ++nc) {
        const int col = (wn * C::NC + nc) * 32 + g * 4;
        s2w[nc] = *reinterpret_cast<const uint32_t*>(ss + gi * C::BN + col);
        zw[nc] = *reinterpret_cast<const uint32_t*>(ss + C::GPS * C::BN + gi * C::BN + col);
      }
    }

#pragma unroll
    for (int ks = 0; ks < C::KS; ++ks) {
      const int kl = wk * C::TK + ks * 32;
      uint32_t af[C::MT][4];
#pragma unroll
      for (int mt = 0; mt < C::MT; ++mt) {
        const int row = wm * C::TM + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int ch = kl / 16 + (lane >> 4);
        dev::ldmatrix_x4(af[mt], sa + row * C::BK + swz<C::BK>(row, ch) * 16);
      }
#pragma unroll
      for (int nc = 0; nc < C::NC; ++nc) {
        const uint4 w = *reinterpret_cast<const uint4*>(
            sb + ((((wn * C::NC + nc) * C::KC) + kl / 32) * 32 + lane) * 16);
        dev::w4_word_frags<G128>(w, G128 ? s2w[nc] : 0u, G128 ? zw[nc] : 0u, [&](int j, uint32_t b0, uint32_t b1) {
#pragma unroll
          for (int mt = 0; mt < C::MT; ++mt) dev::mma_s8_16832(acc[mt][nc][j], af[mt], b0, b1);
        });
      }
    }
  }
  dev::cp_async_wait<0>();

  // ---- intra-CTA split-K reduction (warps wk > 0 hand their partials to wk == 0).
  constexpr int ACCN = C::MT * C::NC * 16;
  if constexpr (C::WK > 1) {
    __syncthreads();
    int32_t* red = reinterpret_cast<int32_t*>(smem);
    if (wk > 0) {
      int32_t* dst = red + ((wk - 1) * (C::WM * C::WN) + wmn) * ACCN * 32 + lane;
#pragma unroll
      for (int i = 0; i < C::MT; ++i)
#pragma unroll
        for (int j = 0; j < C::NC; ++j)
#pragma unroll
          for (int q = 0; q < 4; ++q)
#pragma unroll
            for (int e = 0; e < 4; ++e) dst[(((i * C::NC + j) * 4 + q) * 4 + e) * 32] = acc[i][j][q][e];
    }
    __syncthreads();
    if (wk == 0) {
#pragma unroll 1
      for (int w = 1; w < C::WK; ++w) {
        const int32_t* src = red + ((w - 1) * (C::WM * C::WN) + wmn) * ACCN * 32 + lane;
#pragma unroll
        for (int i = 0; i < C::MT; ++i)
#pragma unroll
          for (int j = 0; j < C::NC; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q)
#pragma unroll
              for (int e = 0; e < 4; ++e)
                acc[i][j][q][e] += src[(((i * C::NC + j) * 4 + q) * 4 + e) * 32];
      }
    }
  }

  // ---- inter-CTA split-K: part `part` of the tile's `parts` reduces through its own
  // workspace slice (dev::splitk_slices); the threads of the wk == 0 warps hold the partial.
  if (parts > 1) {
    constexpr int T0 = 32 * C::WM * C::WN;  // the threads of the wk == 0 warps (tid < T0)
    constexpr int TILE_INTS = C::BM * C::BN;
    static_assert(T0 * ACCN == TILE_INTS, "slice layout");
    const int ntiles = tn * ((a.M + C::BM - 1) / C::BM);
    auto slice = [&](int p) {
      return reinterpret_cast<int4*>(a.workspace + (static_cast<int64_t>(tile) * slices_per_tile + p) * TILE_INTS) + tid;
    };
    int* counter = reinterpret_cast<int*>(a.workspace + static_cast<int64_t>(ntiles) * slices_per_tile * TILE_INTS) + tile;
    auto acc4 = [&](int v) -> int32_t* { return &acc[v / (C::NC * 4)][(v / 4) % C::NC][v % 4][0]; };
    __shared__ int is_last;
    if (!dev::splitk_slices<ACCN / 4, T0>(slice, part, parts, counter, wk == 0, acc4,
                                          [] { __syncthreads(); }, tid == 0, is_last))
      return;
  }

  // ---- epilogue
  if (wk != 0) return;
#pragma unroll
  for (int i = 0; i < C::MT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int m = m0 + wm * C::TM + i * 16 + g + 8 * h;
      if (m >= a.M) continue;
#pragma unroll
      for (int j = 0; j < C::NC; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int n = n0 + wn * C::TN + j * 32 + q * 8 + 2 * t;
          store2<G128, OUT>(a, m, n, acc[i][j][q][2 * h], acc[i][j][q][2 * h + 1]);
        }
    }
}

// Stream-K over the (tile, k-tile) iteration space: CTA b runs iterations [b*per, (b+1)*per)
// (tile-major), i.e. the tail of one tile, whole tiles, the head of another.  per == k-tiles
// gives the classic one-tile-per-CTA grid.  Splitting a tile across CTAs costs a workspace
// round trip of its BM x BN partials, so it is used where tiles are small (M <= 64) or too few.
template <class C, bool G128, OutKind OUT>
__global__ void __launch_bounds__(C::THREADS) w4a8_sm80_kernel(const W4A8Args a, int per,
                                                                int slices_per_tile) {
  extern __shared__ __align__(128) uint8_t smem[];
  const int kt = (a.K + C::BK - 1) / C::BK;
  const int tiles = ((a.N + C::BN - 1) / C::BN) * ((a.M + C::BM - 1) / C::BM);
  const int64_t total = static_cast<int64_t>(tiles) * kt;
  int64_t it = static_cast<int64_t>(blockIdx.x) * per;
  const int64_t end = min(total, it + per);
  while (it < end) {
    const int tile = static_cast<int>(it / kt);
    const int kb = static_cast<int>(it % kt);
    const int ke = static_cast<int>(min(static_cast<int64_t>(kt), kb + (end - it)));
    const int first = static_cast<int>((static_cast<int64_t>(tile) * kt) / per);
    const int last = static_cast<int>((static_cast<int64_t>(tile + 1) * kt - 1) / per);
    segment<C, G128, OUT>(a, smem, tile, kb, ke, static_cast<int>(blockIdx.x) - first, last - first + 1,
                          slices_per_tile);
    it += ke - kb;
    if (it < end) __syncthreads();  // the next segment refills the pipeline buffers
  }
}

// Launch one configuration: one CTA per tile, or -- when there are fewer tiles than resident
// CTA slots and stream_k is allowed -- the iterations balanced over one wave of CTAs.
// aligned: round the stream-K share up to a divisor of the tile's k-tiles, so that no CTA
// crosses a tile boundary (draining and refilling its pipeline there), unless that leaves fewer
// than 70% of the CTA slots busy (then the exact share, crossings and all).
template <class C, bool G128, OutKind OUT>
void launch(const W4A8Args& a, bool stream_k, cudaStream_t stream, bool aligned = false) {
  auto kern = w4a8_sm80_kernel<C, G128, OUT>;
  static unsigned long long setup_done = 0;  // per instantiation, one bit per device
  static int per_sm = 1;                      // resident CTAs per SM (same on every device)
  const unsigned long long bit = current_device_bit();
  if (!(setup_done & bit)) {
    QOQ_CUDA_CHECK(
        cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM_BYTES));
    int n = 0;
    QOQ_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kern, C::THREADS, C::SMEM_BYTES));
    per_sm = std::max(1, n);
    setup_done |= bit;
  }
  const int64_t tiles = static_cast<int64_t>((a.N + C::BN - 1) / C::BN) * ((a.M + C::BM - 1) / C::BM);
  const int kt = (a.K + C::BK - 1) / C::BK;
  const int64_t total = tiles * kt;
  const int64_t slots = static_cast<int64_t>(per_sm) * a.num_sms;
  int64_t per = kt;
  // (Balancing over several waves was tried for M <= 16 and lost: a CTA that crosses a tile
  // boundary drains and refills its pipeline, which costs more than the wave tail.)
  if (a.workspace != nullptr && stream_k && tiles < slots) {
    const int64_t grid_want = slots * ((tiles + slots - 1) / slots);
    per = std::max<int64_t>(std::min<int64_t>(2, kt), (total + grid_want - 1) / grid_want);
    if (aligned) {
      int64_t pa = per;
      while (kt % pa) ++pa;
      if (10 * tiles * (kt / pa) >= 7 * slots) per = pa;
    }
  }
  // a tile is cut into at most ceil(kt / per) + 1 parts, each with its workspace slice (+ a
  // counter per tile); without room for them, one CTA per tile
  int64_t slices = std::min<int64_t>(kt, (kt + per - 1) / per + 1);
  if (per < kt && tiles * slices * (C::BM * C::BN) + tiles > a.workspace_ints) per = kt;
  if (per >= kt) slices = 1;
  const int64_t grid = (total + per - 1) / per;
  kern<<<static_cast<unsigned>(grid), C::THREADS, C::SMEM_BYTES, stream>>>(a, static_cast<int>(per),
                                                                          static_cast<int>(slices));
  QOQ_CUDA_CHECK(cudaGetLastError());
}

// Tile configurations by M (see the header comment; tuned on H100).
using CfgSmall = TileCfg<16, 64, 256, 1, 2, 4, 4>;    // M <= 16   (decode), off Hopper
using CfgMid = TileCfg<64, 64, 128, 2, 2, 2, 4>;      // M <= 64
using CfgLarge = TileCfg<128, 128, 64, 2, 4, 1, 4>;   // M > 64
// M <= 16 on sm_90: twice the bytes per stage (and per barrier) as CfgSmall, in K for most
// shapes and in N from N = 16384 on, with aligned stream-K shares.  H100, 14 configurations
// timed on the eight Llama-3-8B/-70B shapes at M = 4, 8, 16 (benchmarks/device/
// sm80_variants.py; benchmarks/results/gemm-h100-sm80-variants.json, gemm-notes.md): this
// dispatch against CfgSmall, 1.12x geomean for g128 and 1.07x per-channel at M = 4-16
// (0.98-1.31x per shape; the wide tiles win most on the widest).  Other GPUs keep CfgSmall:
// measured on none (sm_89 has 100 KB of shared memory per SM, where one 75 KB CfgSmallK CTA
// would halve the resident CTAs).
using CfgSmallK = TileCfg<16, 64, 512, 1, 2, 4, 3>;   // M <= 16, sm_90, N < 16384
using CfgSmallN = TileCfg<16, 128, 256, 1, 4, 2, 4>;  // M <= 16, sm_90, N >= 16384

template <bool G128, OutKind OUT>
void dispatch(const W4A8Args& a, cudaStream_t stream) {
  if (a.M <= 16) {
    if (!cc9()) {
      launch<CfgSmall, G128, OUT>(a, true, stream);
    } else if (a.N >= 16384) {
      launch<CfgSmallN, G128, OUT>(a, true, stream, true);
    } else {
      launch<CfgSmallK, G128, OUT>(a, true, stream, true);
    }
  } else if (a.M <= 64) {
    launch<CfgMid, G128, OUT>(a, true, stream);
  } else {
    launch<CfgLarge, G128, OUT>(a, true, stream);
  }
}

}  // namespace sm80
}  // namespace qoq
