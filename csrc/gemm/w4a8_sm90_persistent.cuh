// Persistent variant of the Hopper wgmma W4A8 GEMM (path 7, opt-in: VLLM_QOQ_GEMM_PATH=
// sm90-persistent).  Same CTA (288 threads: two consumer warpgroups, one TMA producer warp),
// same 128 x BMT tiles, same stage layout, same main loop and the same fp32 epilogue
// arithmetic as w4a8_sm90.cuh (path 3) -- read that file first.  What differs:
//
// * Grid = min(#tiles, #SMs x CTAs per SM); CTA b runs tiles b, b + grid, b + 2 grid, ...
//   (static schedule; no split-K: path 7 is for large M).
// * Tile order (tile_mn): bands of `group_m` consecutive M tiles; inside a band the M tile
//   varies fastest, then the N tile.  The CTAs running at one time hold consecutive tile
//   numbers, i.e. group_m M tiles x (grid / group_m) N tiles: each weight tile is read by
//   group_m CTAs at about the same time and each activation tile by grid / group_m CTAs, so
//   both come from L2 once fetched, and the band's activations (group_m x BMT x K bytes) stay
//   L2-resident while the band walks N.  The wave's working set is
//   K x (group_m x BMT + (grid / group_m) x 64) bytes, smallest near group_m = 8 for 132 CTAs
//   and BMT 128-192 (default 8, VLLM_QOQ_GEMM_GROUP_M to tune).  Path 3's grid (N tile
//   fastest) instead spreads a wave over up to 132 weight tiles of one M row band, which for
//   the wide-N shapes (N = 28672: 224 tiles) is most of the L2.
// * The `full`/`empty` mbarrier ring simply continues across tiles: producer and consumers
//   count stage uses over all their tiles (q), stage q % STAGES, phase (q / STAGES) & 1.  The
//   producer thus runs up to STAGES stages ahead across a tile boundary: the next tile's
//   loads are in flight while the consumers run the current tile's epilogue.  Every stage
//   use is released exactly once (the last one of a tile right after wgmma.wait_group 0,
//   before the epilogue), so the ring never loses a phase.
// * Epilogue straight from the accumulator registers, no shared memory, no CTA or
//   warpgroup barrier (nothing is shared with the pipeline stages).  D fragment (see
//   w4a8_sm90.cuh): a thread holds channels c = 16w+g and c+8 for tokens 8v+2t+{0,1}.  Each
//   value gets epi::epi_math (the same fp32 formula in the same order as path 3, so the
//   outputs are bit-identical) and is rounded to the output type; then lanes g and g^1
//   (lane ^ 4: same tokens, neighbouring channels) swap one 16-bit value per (v, h), so each
//   holds two adjacent channels of one token (even g: token e = 0, odd g: e = 1) and writes
//   them as one 4-byte bf16x2/half2 store (a warp instruction writes 8 rows x 16 bytes).
//   Odd N (no 4-byte alignment) stores the two halves separately.
//
// Token tiles of 64 (M <= 64) or 128, never 192 (registers: see dispatch_persistent).
// Falls back to path 3 (the caller runs it, incl. its split-K) when the tiles fit in
// one wave (#tiles <= #SMs x CTAs per SM: persistence gains nothing there) or K == 0; the
// debug op can force the persistent kernel with a small grid (max_ctas) to test the
// cross-tile ring on any shape.
#pragma once

#include <climits>
#include <cstdint>
#include <cstdlib>

#include "gemm/w4a8_sm90.cuh"

namespace qoq {
namespace sm90 {

// Tile number -> (M tile, N tile): bands of gm M tiles, M fastest inside a band (see top).
__device__ __forceinline__ void tile_mn(int tile, int tn, int tm, int gm, int& mt, int& nt) {
  const int band_tiles = gm * tn;
  const int band = tile / band_tiles;
  const int r = tile - band * band_tiles;
  const int m_first = band * gm;
  const int rows = min(gm, tm - m_first);  // the last band may be narrower
  nt = r / rows;
  mt = m_first + (r - nt * rows);
}

__device__ __forceinline__ uint16_t out_bits(__half y) { return __half_as_ushort(y); }
__device__ __forceinline__ uint16_t out_bits(__nv_bfloat16 y) { return __bfloat16_as_ushort(y); }

template <class C, bool G128, OutKind OUT>
__global__ void __launch_bounds__(288, 1)
    w4a8_sm90p_kernel(const W4A8Args a, const __grid_constant__ CUtensorMap xmap, int group_m) {
#if QOQ_HAS_WGMMA
  constexpr int BMT = C::BMT, STAGES = C::STAGES;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + STAGES * C::STAGE_BYTES);
  uint64_t* empty = full + STAGES;

  const int tid = threadIdx.x, wg = tid / 128, ltid = tid % 128;  // wg 2 = producer warp
  const int tn = (a.N + C::BN - 1) / C::BN, tm = (a.M + BMT - 1) / BMT;
  const int tiles = tn * tm;  // < 2^31: checked on the host
  const int nk = (a.K + C::BK - 1) / C::BK;  // >= 1: K == 0 goes to path 3

  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 256);
    }
  }
  __syncthreads();

  if (wg == 2) {
    // ------------------------------------------------------------------ producer
    if (ltid == 0) {
      const int kblocks = a.K / 32;
      int s = 0;           // stage of the next use
      uint32_t ph = 0;     // pass over the ring of the next use (its parity)
      bool wrapped = false;  // a stage is reused only after the first pass
      for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        int mt, nt;
        tile_mn(tile, tn, tm, group_m, mt, nt);
        const int n0 = nt * C::BN, m0 = mt * BMT;
        int nvalid = 0;  // n32 blocks inside Np
#pragma unroll
        for (int nc = 0; nc < C::BN / 32; ++nc) nvalid += (n0 + nc * 32 < a.Np) ? 1 : 0;
        const int sbytes = (G128 && n0 < a.Np) ? 2 * min(C::BN, a.Np - n0) : 0;
        for (int kt = 0; kt < nk; ++kt) {
          // use q waits for the consumers' release of use q - STAGES (the previous pass)
          if (wrapped) mbar_wait(&empty[s], ph ^ 1);
          uint8_t* st = smem + s * C::STAGE_BYTES;
          uint8_t* sw = st + C::X_BYTES;
          const int kc0 = kt * (C::BK / 32);
          const int kvalid = min(C::BK / 32, kblocks - kc0);  // k32 blocks inside K
          mbar_expect_tx(&full[s], C::X_BYTES + nvalid * kvalid * 512 + sbytes);
          tma_load_2d(st, &xmap, kt * C::BK, m0, &full[s]);
#pragma unroll
          for (int nc = 0; nc < C::BN / 32; ++nc) {
            if (nc < nvalid) {
              const uint8_t* src = a.qweight + (static_cast<int64_t>(n0 / 32 + nc) * kblocks + kc0) * 512;
              bulk_load(sw + nc * (C::BK / 32) * 512, src, kvalid * 512, &full[s]);
            }
          }
          if (G128 && sbytes > 0) {
            const int64_t off = static_cast<int64_t>(kt) * a.Np + n0;
            bulk_load(sw + C::W_BYTES, a.s2 + off, sbytes / 2, &full[s]);
            bulk_load(sw + C::W_BYTES + C::BN, a.zneg + off, sbytes / 2, &full[s]);
          }
          if (++s == STAGES) {
            s = 0;
            ph ^= 1;
            wrapped = true;
          }
        }
      }
    }
    return;
  }

  // -------------------------------------------------------------------- consumers
  const int cw = wg, warp = ltid / 32, lane = ltid % 32, g = lane / 4, t = lane % 4;
  const int nb = cw * 2 + warp / 2, sh = warp % 2;
  const int nrow = cw * 64 + warp * 16 + g;  // channel (within the tile) of acc[.. 2h=0 ..]
  int32_t acc[BMT / 2];
  uint32_t fa[4][4], fb[4][4];

  // One stage: use q (over all of this CTA's tiles), `release` = release use q - 1 once this
  // stage's wgmmas are issued and the previous ones have completed.
  auto step = [&](uint32_t q, bool release, uint32_t(&f)[4][4], uint32_t(&fprev)[4][4]) {
    const int s = static_cast<int>(q % STAGES);
    mbar_wait(&full[s], (q / STAGES) & 1);
    const uint8_t* st = smem + s * C::STAGE_BYTES;
    const uint8_t* sw = st + C::X_BYTES;
    uint32_t s2a = 0, s2b = 0, za = 0, zb = 0;
    if constexpr (G128) {
      const uint32_t s2w = *reinterpret_cast<const uint32_t*>(sw + C::W_BYTES + nb * 32 + g * 4);
      const uint32_t zw = *reinterpret_cast<const uint32_t*>(sw + C::W_BYTES + C::BN + nb * 32 + g * 4);
      s2a = (s2w >> (16 * sh)) & 0xffu;
      s2b = (s2w >> (16 * sh + 8)) & 0xffu;
      za = dev::splat_byte(zw, 2 * sh);
      zb = dev::splat_byte(zw, 2 * sh + 1);
    }
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
      const uint2 w = *reinterpret_cast<const uint2*>(sw + ((nb * 4 + ks) * 32 + lane) * 16 + 8 * sh);
      uint32_t a0 = dev::lo_nibbles(w.x), a2 = dev::hi_nibbles(w.x);
      uint32_t a1 = dev::lo_nibbles(w.y), a3 = dev::hi_nibbles(w.y);
      if constexpr (G128) {
        a0 = dev::dequant_g128(a0, s2a, za);
        a2 = dev::dequant_g128(a2, s2a, za);
        a1 = dev::dequant_g128(a1, s2b, zb);
        a3 = dev::dequant_g128(a3, s2b, zb);
      }
      f[ks][0] = a0;
      f[ks][1] = a1;
      f[ks][2] = a2;
      f[ks][3] = a3;
    }
    wgmma_fence();
    fence_regs(acc);
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) wgmma_rs<BMT>(acc, f[ks], sw128_desc(st + ks * 32));
    wgmma_commit();
    fence_regs(acc);
    wgmma_wait<1>();
    fence_regs(acc);
    fence_frag(fprev);  // the previous stage's fragments were live until its wgmmas finished
    if (release) mbar_arrive(&empty[(q - 1) % STAGES]);
  };

  using T = std::conditional_t<OUT == OutKind::F16, __half, __nv_bfloat16>;
  const bool has_bias = a.bias_kind != BiasKind::None;
  uint32_t q0 = 0;  // stage uses before this tile
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
#pragma unroll
    for (int i = 0; i < BMT / 2; ++i) acc[i] = 0;
    // The first step's fence_frag(fprev) reads fb: define it here, or the previous tile's
    // fragments stay live through its epilogue (ptxas then serialises the wgmmas, C7512).
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) fb[i][j] = 0;
    int it = 0;
    for (; it + 1 < nk; it += 2) {
      step(q0 + it, it > 0, fa, fb);
      step(q0 + it + 1, true, fb, fa);
    }
    if (it < nk) step(q0 + it, it > 0, fa, fb);
    wgmma_wait<0>();
    fence_regs(acc);
    // This tile's last stage is free now: release it before the epilogue, so the producer
    // can fill the whole ring with the next tile while the epilogue runs.
    q0 += nk;
    mbar_arrive(&empty[(q0 - 1) % STAGES]);
    // (the tile's coordinates only now: nothing in the main loop needs them, and every
    // register live across it counts against the accumulators)
    int mt, nt;
    tile_mn(tile, tn, tm, group_m, mt, nt);
    const int n0 = nt * C::BN, m0 = mt * BMT;

    // ---- epilogue: D[n][m] -> out[m][n], straight from registers
    if constexpr (OUT == OutKind::I32) {
#pragma unroll
      for (int v = 0; v < BMT / 8; ++v)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int m = m0 + 8 * v + 2 * t + e;
          if (m < a.M) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int n = n0 + nrow + 8 * h;
              if (n < a.N) epi::store1<G128, OUT>(a, m, n, acc[4 * v + 2 * h + e]);
            }
          }
        }
    } else {
      epi::ColParams cp[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int n = n0 + nrow + 8 * h;
        cp[h] = n < a.N ? epi::col_params<G128>(a, n) : epi::ColParams{0.f, 0.f, 0.f};
      }
      const bool odd = (g & 1) != 0;      // keeps token e = 1 (even g: e = 0)
      const int npair = n0 + nrow - (g & 1);  // first channel of this lane's pair (h = 0)
      const bool pair_store = (a.N & 1) == 0;  // 4-byte aligned pairs
      T* out = static_cast<T*>(a.out);
#pragma unroll
      for (int v = 0; v < BMT / 8; ++v) {
        uint16_t o[2][2];  // [h][e], rounded outputs (bit patterns)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int m = m0 + 8 * v + 2 * t + e;
          const float sxm = m < a.M ? a.sx[m] : 0.f;
          const float qsm = (!G128 && m < a.M) ? static_cast<float>(a.qsum[m]) : 0.f;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            o[h][e] = out_bits(epi::to_out<T>(epi::epi_math<G128>(acc[4 * v + 2 * h + e], cp[h], sxm, qsm, has_bias)));
          }
        }
        // give the partner (channel c ^ 1) the token it keeps, get ours of its channel
        const uint32_t send = odd ? (uint32_t(o[0][0]) | (uint32_t(o[1][0]) << 16))
                                  : (uint32_t(o[0][1]) | (uint32_t(o[1][1]) << 16));
        const uint32_t recv = __shfl_xor_sync(0xffffffffu, send, 4);
        const int m = m0 + 8 * v + 2 * t + (odd ? 1 : 0);
        if (m < a.M) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint32_t mine = odd ? o[h][1] : o[h][0];
            const uint32_t theirs = (recv >> (16 * h)) & 0xffffu;
            const uint32_t lo = odd ? theirs : mine, hi = odd ? mine : theirs;
            const int n = npair + 8 * h;
            T* dst = out + static_cast<int64_t>(m) * a.N + n;
            if (pair_store) {
              if (n < a.N) *reinterpret_cast<uint32_t*>(dst) = lo | (hi << 16);
            } else {
              if (n < a.N) *reinterpret_cast<uint16_t*>(dst) = static_cast<uint16_t>(lo);
              if (n + 1 < a.N) *reinterpret_cast<uint16_t*>(dst + 1) = static_cast<uint16_t>(hi);
            }
          }
        }
      }
    }
  }
#endif  // QOQ_HAS_WGMMA
}

// VLLM_QOQ_GEMM_GROUP_M: M tiles per raster band (1..64, default 8); read once.
inline int persistent_group_m() {
  static const int v = [] {
    const char* e = std::getenv("VLLM_QOQ_GEMM_GROUP_M");
    const int x = (e == nullptr || *e == '\0') ? 8 : std::atoi(e);
    return std::max(1, std::min(64, x));
  }();
  return v;
}

// max_ctas > 0 (debug op): persistent kernel with at most max_ctas CTAs, never the path-3
// fallback.  max_ctas == 0: grid = #SMs x CTAs per SM.  Returns false, launching nothing,
// where the caller must run path 3 instead (one wave or less, K == 0): the path-3 kernels
// are instantiated in their own translation units, not again here.
template <class C, bool G128, OutKind OUT>
bool launch_persistent(const W4A8Args& a, int max_ctas, cudaStream_t stream) {
  const int64_t tn = (a.N + C::BN - 1) / C::BN;
  const int64_t tm = (a.M + C::BMT - 1) / C::BMT;
  const int64_t tiles = tn * tm;
  if (a.K == 0 || tiles > INT_MAX) return false;
  auto kern = w4a8_sm90p_kernel<C, G128, OUT>;
  static unsigned long long setup_done = 0;  // per instantiation, one bit per device
  static int per_sm[64] = {};
  int dev = 0;
  QOQ_CUDA_CHECK(cudaGetDevice(&dev));
  const unsigned long long bit = 1ull << (dev & 63);
  if (!(setup_done & bit)) {
    QOQ_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM_BYTES));
    int occ = 0;
    QOQ_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kern, C::THREADS, C::SMEM_BYTES));
    per_sm[dev & 63] = std::max(1, occ);
    setup_done |= bit;
  }
  const int64_t slots = static_cast<int64_t>(per_sm[dev & 63]) * a.num_sms;
  if (max_ctas <= 0 && tiles <= slots) return false;
  const int64_t grid = std::min<int64_t>(tiles, max_ctas > 0 ? max_ctas : slots);
  const CUtensorMap xmap = make_x_map(a, C::BMT);
  kern<<<static_cast<unsigned>(grid), C::THREADS, C::SMEM_BYTES, stream>>>(a, xmap, persistent_group_m());
  QOQ_CUDA_CHECK(cudaGetLastError());
  return true;
}

// Token-tile width: 64 up to M = 64, else 128.  Not 192 (path 3's choice at large M): with
// the tile loop around the main loop, ptxas serialises the BMT = 192 wgmmas for lack of
// registers (C7512; 96 accumulators + 32 fragment registers under the 168-register cap a
// 288-thread wgmma CTA gets); BMT = 128 compiles without it (~145 registers).  192 would
// need setmaxnreg (consumers up, producer down) -- not done yet.
template <bool G128, OutKind OUT>
bool dispatch_persistent(const W4A8Args& a, int max_ctas, cudaStream_t stream) {
  if (a.M <= 64) return launch_persistent<Cfg<64>, G128, OUT>(a, max_ctas, stream);
  return launch_persistent<Cfg<128>, G128, OUT>(a, max_ctas, stream);
}

}  // namespace sm90
}  // namespace qoq
