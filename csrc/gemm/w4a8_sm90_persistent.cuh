// Persistent variant of the Hopper wgmma W4A8 GEMM (path 7, opt-in: VLLM_QOQ_GEMM_PATH=
// sm90-persistent).  Same CTA (288 threads: two consumer warpgroups, one TMA producer warp;
// 384 with a producer warpgroup and setmaxnreg for BMT = 192), same 128 x BMT tiles, same
// stage layout, same main loop and the same fp32 epilogue arithmetic as w4a8_sm90.cuh
// (path 3) -- read that file first.  What differs:
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
// * Two epilogues (template flag SMEM_EPI; env VLLM_QOQ_GEMM_EPILOGUE=regs|smem, default
//   smem; int32 output always stores from registers).  Both compute every value with
//   epi::epi_math (the same fp32 formula in the same order as path 3), so the outputs are
//   bit-identical to path 3's.  D fragment (see w4a8_sm90.cuh): a thread holds channels
//   c = 16w+g and c+8 for tokens 8v+2t+{0,1}.
//   - regs (the first version): straight from the accumulator registers; lanes g and g^1
//     swap one 16-bit value per (v, h) so each holds two adjacent channels of one token and
//     writes one 4-byte bf16x2/half2 store.  A warp store instruction covers 8 token rows x
//     16 bytes (half sectors): on the H100 this ran 20-30% behind the same kernel's int32
//     output (gemm-h100-persistent.md).
//   - smem (default): see `epilogue_smem` below.  Each consumer warpgroup owns a dedicated
//     64-channel x BMT-token staging tile (not aliasing the pipeline stages, so the producer
//     keeps filling the ring meanwhile), written with stmatrix.trans and stored by ONE
//     asynchronous TMA tensor store (whole 128-byte rows, rows past M / channels past N
//     clipped by the copy engine); the warpgroup goes straight back to the next tile's main
//     loop while the copy engine drains the tile.  Only the warpgroup's own 128 threads
//     synchronise (named barrier 2 + wg).
//
// Token tiles of 64 (M <= 64), 128 or 192 (path 3's pick_bmt; 192 with a 384-thread CTA and
// setmaxnreg, see dispatch_persistent).
// This is the "cooperative" schedule (both consumer warpgroups on one tile); the opt-in
// "ping-pong" one (warpgroups on alternate tiles, VLLM_QOQ_GEMM_P7_SCHEDULE=pingpong) is in
// w4a8_sm90_pingpong.cuh and shares the producer (produce_tiles) and epilogue_smem.
// Falls back to path 3 (the caller runs it, incl. its split-K) when the tiles fit in
// one wave (#tiles <= #SMs x CTAs per SM: persistence gains nothing there) or K == 0; the
// debug op can force the persistent kernel with a small grid (max_ctas) to test the
// cross-tile ring on any shape.
#pragma once

#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>

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

// Path 7's tile configuration: path 3's (Cfg), plus, for the shared-memory epilogue, one
// dedicated 2-byte output staging tile per consumer warpgroup (64 channels x BMT tokens,
// 128-byte rows, 128-byte swizzle) after the stages.  STAGES drops below path 3's only if
// the total would pass the 227 KB a CTA may use.  BMT 64 and 128 keep 6 stages: 121,952 /
// 187,488 bytes per CTA with the staging tiles (105,568 / 154,720 without); BMT 192 drops
// to 5 stages with them (219,216 bytes; 6 stages and 203,872 bytes without).
template <int BMT_, bool SMEM_EPI, bool WIDE_ = false>
struct PCfg : Cfg<BMT_> {
  using Base = Cfg<BMT_>;
  // WIDE: a whole producer warpgroup (384 threads) so that setmaxnreg can move registers
  // from it (40) to the consumers (232): 128 x 40 + 256 x 232 = 64,512 <= 65,536.
  // The consumers' BMT = 192 code then uses up to 193 (g128) / 172 (chn) registers in the
  // SASS (ptxas -v reports the 168 at entry; the producer region uses 7).  Path 3 (and path 7 before) could not get
  // there with 288 threads: cap 168, the wgmmas serialised (C7512).
  static constexpr bool WIDE = WIDE_;
  static constexpr int THREADS = WIDE_ ? 384 : 288;
  static constexpr int OUT_TILE_BYTES = SMEM_EPI ? BMT_ * 128 : 0;  // per warpgroup
  static constexpr int SMEM_LIMIT = 227 * 1024;
  static constexpr int STAGES =
      std::min(Base::STAGES, (SMEM_LIMIT - 1024 - 2 * OUT_TILE_BYTES - 2 * 8 * Base::STAGES) / Base::STAGE_BYTES);
  static constexpr int SMEM_BYTES = STAGES * Base::STAGE_BYTES + 2 * OUT_TILE_BYTES + 1024 + 2 * STAGES * 8;
  static_assert(STAGES >= 3, "pipeline depth");
  static_assert(SMEM_BYTES <= SMEM_LIMIT, "shared memory");
};

#if QOQ_HAS_WGMMA
// stmatrix m8n8.x4.trans: four 8x8 matrices of 16-bit values, register i of lane (g, t)
// holding elements (g, 2t) and (g, 2t + 1) of matrix i (low half first); with .trans row r
// of matrix i -- i.e. column r of the fragment -- goes to the 16 bytes at lane 8i+r's address.
__device__ __forceinline__ void stmatrix_x4_trans(const void* row, uint32_t r0, uint32_t r1, uint32_t r2,
                                                  uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(
                   dev::smem_addr(row)),
               "r"(r0), "r"(r1), "r"(r2), "r"(r3)
               : "memory");
}
// TMA tensor store of a shared-memory box to global memory (elements outside the tensor are
// not written), tracked by the issuing thread's bulk async-groups.
__device__ __forceinline__ void tma_store_2d(const CUtensorMap* map, int c0, int c1, const void* src) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%1, %2}], [%3];\n" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(c0), "r"(c1), "r"(dev::smem_addr(src))
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// The issuing thread's stores have finished READING their shared-memory source, all but
// the N most recent bulk async-groups.
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
// All of the issuing thread's stores are complete (written to global memory).
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }
// Named barrier 2 + cw over consumer warpgroup cw's 128 threads (immediate ids: a register
// id makes ptxas reserve all 16 barriers).
__device__ __forceinline__ void warpgroup_bar(int cw) {
  if (cw == 0) {
    asm volatile("bar.sync 2, 128;\n" ::: "memory");
  } else {
    asm volatile("bar.sync 3, 128;\n" ::: "memory");
  }
}

// Shared-memory epilogue of one consumer warpgroup (64 channels nbase.. x BMT tokens m0..).
//
// Why this shape.  out is [M tokens, N channels] row-major and the accumulator fragment
// holds channels along lanes (g) and tokens along t: stored from registers, each lane writes
// 4 bytes per token row (the `regs` epilogue).  Staging the tile transposed in shared memory
// lets the stores be whole 128-byte rows (64 channels of one token).  Of the two ways to
// write those rows -- 16-byte vector stores by all 128 threads after a second barrier, or
// one TMA tensor store -- the TMA store is chosen: it is asynchronous (the warpgroup starts
// the next tile's main loop at once and the copy engine drains the tile meanwhile), it clips
// rows past M and channels past N by itself (no per-row predicates), and it costs one
// thread one instruction.  Its constraints (16-byte global row stride: N % 8 == 0; 16-byte
// aligned output) are checked on the host (`tma_out`); elsewhere the warpgroup copies the
// staged tile element by element (odd N etc.: correctness only).
//
// Staging: stmatrix.trans takes the fragment as it is -- register (v, h) packs the two
// tokens e = 0, 1 of channel 16w+g+8h (no lane exchange) and row r of each 8x8 matrix
// lands as 16 contiguous bytes (8 channels) of token row r.  x4 = matrices (v, h) for
// v = 2j, 2j+1 and h = 0, 1: lane l addresses row l%8 of matrix l/8.  The tile's layout is
// the TMA 128-byte swizzle (16-byte chunk c of token row m at chunk c ^ (m % 8); the tile is
// 1024-byte aligned): a matrix's 8 rows hit 8 different chunks = all 32 banks, no conflicts.
//
// Reuse: the buffer is written again one tile later, after the issuing thread (ltid 0) has
// waited for its store to have read it (cp.async.bulk.wait_group.read -- normally long
// done, a whole main loop has passed) and the warpgroup barrier that follows.
// Per-channel values (scales, szeros, bias) are loaded once per tile into registers,
// per-token values (sx, qsum) once per v (tokens 2t, 2t+1: one 8-byte load each in full tiles).
// PENDING: how many of ltid 0's most recent stores may still be reading when this one's
// buffer is written (0 here; the ping-pong kernel stages a tile's two halves in two buffers).
template <class C, bool G128, typename T, int PENDING = 0>
__device__ __forceinline__ void epilogue_smem(const W4A8Args& a, const CUtensorMap* omap, bool tma_out,
                                              const int32_t (&acc)[C::BMT / 2], uint8_t* obuf, int m0,
                                              int nbase, int cw, int ltid) {
  constexpr int BMT = C::BMT;
  const int warp = ltid / 32, lane = ltid % 32, g = lane / 4, t = lane % 4;
  const bool has_bias = a.bias_kind != BiasKind::None;
  epi::ColParams cp[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int n = nbase + warp * 16 + g + 8 * h;
    cp[h] = n < a.N ? epi::col_params<G128>(a, n) : epi::ColParams{0.f, 0.f, 0.f};
  }
  // 8-byte token loads need 8-byte aligned sx/qsum (views may be offset)
  const bool tok_vec =
      ((reinterpret_cast<uintptr_t>(a.sx) | (G128 ? uintptr_t(0) : reinterpret_cast<uintptr_t>(a.qsum))) & 7) == 0;
  const int mi = lane >> 3, r = lane & 7;  // stmatrix: this lane addresses row r of matrix mi
  uint8_t* row = obuf + (8 * (mi >> 1) + r) * 128 + (((2 * warp + (mi & 1)) ^ r) << 4);

  if (ltid == 0) bulk_wait_read<PENDING>();  // the buffer's previous store has read it
  warpgroup_bar(cw);
  // Token values without branches inside the unrolled loop (so that ptxas can issue the loads
  // early): FULL tiles (all BMT rows < M, 8-byte aligned sx/qsum) load tokens m, m + 1 as one
  // 8-byte load each; otherwise scalar loads at indices clamped to M - 1 (rows past M get
  // some row's values and are never stored).
  auto stage = [&](auto full_tile) {
    constexpr bool FULL = decltype(full_tile)::value;
#pragma unroll
    for (int j = 0; j < BMT / 16; ++j) {
      uint32_t rr[4];
#pragma unroll
      for (int dv = 0; dv < 2; ++dv) {
        const int v = 2 * j + dv;
        const int m = m0 + 8 * v + 2 * t;  // even: tokens m, m + 1
        float sx0, sx1, qs0 = 0.f, qs1 = 0.f;
        if constexpr (FULL) {
          const float2 s = __ldg(reinterpret_cast<const float2*>(a.sx + m));
          sx0 = s.x;
          sx1 = s.y;
          if constexpr (!G128) {
            const int2 q = __ldg(reinterpret_cast<const int2*>(a.qsum + m));
            qs0 = static_cast<float>(q.x);
            qs1 = static_cast<float>(q.y);
          }
        } else {
          const int i0 = min(m, a.M - 1), i1 = min(m + 1, a.M - 1);
          sx0 = __ldg(a.sx + i0);
          sx1 = __ldg(a.sx + i1);
          if constexpr (!G128) {
            qs0 = static_cast<float>(__ldg(a.qsum + i0));
            qs1 = static_cast<float>(__ldg(a.qsum + i1));
          }
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t lo =
              out_bits(epi::to_out<T>(epi::epi_math<G128>(acc[4 * v + 2 * h], cp[h], sx0, qs0, has_bias)));
          const uint32_t hi =
              out_bits(epi::to_out<T>(epi::epi_math<G128>(acc[4 * v + 2 * h + 1], cp[h], sx1, qs1, has_bias)));
          rr[2 * dv + h] = lo | (hi << 16);
        }
      }
      stmatrix_x4_trans(row + j * (16 * 128), rr[0], rr[1], rr[2], rr[3]);
    }
  };
  if (tok_vec && m0 + BMT <= a.M) {
    stage(std::true_type{});
  } else {
    stage(std::false_type{});
  }
  fence_proxy_async();  // this thread's stmatrix writes -> visible to the copy engine
  warpgroup_bar(cw);
  if (tma_out) {
    if (ltid == 0) {
      tma_store_2d(omap, nbase, m0, obuf);
      bulk_commit();
    }
  } else {
    T* out = static_cast<T*>(a.out);
    const int rows = min(BMT, a.M - m0);
    for (int c = ltid; c < rows * 64; c += 128) {
      const int ml = c >> 6, ch = c & 63, n = nbase + ch;
      if (n < a.N) {
        const uint8_t* src = obuf + ml * 128 + ((((ch >> 3) ^ ml) & 7) << 4) + (ch & 7) * 2;
        out[static_cast<int64_t>(m0 + ml) * a.N + n] = *reinterpret_cast<const T*>(src);
      }
    }
  }
}
#endif  // QOQ_HAS_WGMMA

#if QOQ_HAS_WGMMA
// The TMA producer (one thread): every stage use of this CTA's tiles, in order, through the
// `full`/`empty` ring (see the top).  Shared by the cooperative kernel below and the
// ping-pong kernel (w4a8_sm90_pingpong.cuh): both consume the uses in this order.
template <class C, bool G128>
__device__ __forceinline__ void produce_tiles(const W4A8Args& a, const CUtensorMap& xmap, uint8_t* smem,
                                              uint64_t* full, uint64_t* empty, int tiles, int tn, int tm,
                                              int nk, int group_m) {
  constexpr int BMT = C::BMT, STAGES = C::STAGES;
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
#endif  // QOQ_HAS_WGMMA

#if QOQ_HAS_WGMMA
// Path 7's `full` (one producer arrive + the bytes) / `empty` (`consumers` arrives) ring,
// initialised by thread 0, visible to the CTA on return.
template <int STAGES>
__device__ __forceinline__ void init_ring(uint64_t* full, uint64_t* empty, int consumers) {
  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], consumers);
    }
  }
  __syncthreads();
}
#endif  // QOQ_HAS_WGMMA

template <class C, bool G128, OutKind OUT, bool SMEM_EPI>
__global__ void __launch_bounds__(C::THREADS, 1)
    w4a8_sm90p_kernel(const W4A8Args a, const __grid_constant__ CUtensorMap xmap,
                      const __grid_constant__ CUtensorMap omap, int group_m, int tma_out) {
#if QOQ_HAS_WGMMA
  static_assert(!(SMEM_EPI && OUT == OutKind::I32), "int32 output stores from registers");
  constexpr int BMT = C::BMT, STAGES = C::STAGES;
  uint8_t* smem = smem_1024();
  uint8_t* otiles = smem + STAGES * C::STAGE_BYTES;  // SMEM_EPI: 2 x OUT_TILE_BYTES, 1024-aligned
  uint64_t* full = reinterpret_cast<uint64_t*>(otiles + 2 * C::OUT_TILE_BYTES);
  uint64_t* empty = full + STAGES;

  const int tid = threadIdx.x, wg = tid / 128, ltid = tid % 128;  // wg 2 = producer warp
  const int tn = (a.N + C::BN - 1) / C::BN, tm = (a.M + BMT - 1) / BMT;
  const int tiles = tn * tm;  // < 2^31: checked on the host
  const int nk = (a.K + C::BK - 1) / C::BK;  // >= 1: K == 0 goes to path 3

  init_ring<STAGES>(full, empty, 256);

  if (wg == 2) {
    // ------------------------------------------------------------------ producer
    // (the whole warpgroup: setmaxnreg is .sync.aligned per warpgroup)
    if constexpr (C::WIDE) asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (ltid == 0) produce_tiles<C, G128>(a, xmap, smem, full, empty, tiles, tn, tm, nk, group_m);
    return;
  }

  // -------------------------------------------------------------------- consumers
  if constexpr (C::WIDE) asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
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
    // (g128 through the stage, chn through the weights: the forms that keep nvcc 13.0's
    // code for this kernel what it was with load_a_frags written out here)
    load_a_frags<C, G128, G128 ? C::X_BYTES : 0>(G128 ? st : sw, nb, sh, g, lane, f);
    issue_stage_wgmmas<BMT>(acc, f, st);
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

    // ---- epilogue: D[n][m] -> out[m][n]
    if constexpr (SMEM_EPI) {
      const int nbase = n0 + cw * 64;
      if (nbase < a.N) {  // uniform in the warpgroup (its barriers included)
        epilogue_smem<C, G128, T>(a, &omap, tma_out != 0, acc, otiles + cw * C::OUT_TILE_BYTES, m0, nbase,
                                  cw, ltid);
      }
    } else if constexpr (OUT == OutKind::I32) {
      store_acc_direct<BMT, G128, OUT>(a, acc, m0, n0 + nrow, t);
    } else {  // regs: straight from the accumulator registers (see the top)
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
  // the last tile's store must be complete before the CTA's shared memory goes away
  if constexpr (SMEM_EPI) {
    if (ltid == 0) bulk_wait_all();
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

// VLLM_QOQ_GEMM_EPILOGUE=regs|smem: path 7's fp16/bf16 epilogue (default smem; A/B only);
// read once.
inline bool persistent_smem_epilogue() {
  static const bool v = [] {
    const char* e = std::getenv("VLLM_QOQ_GEMM_EPILOGUE");
    return !(e != nullptr && std::strcmp(e, "regs") == 0);
  }();
  return v;
}

// Tensor map of out [M, N] (2-byte elements) for the TMA store of one warpgroup's tile:
// boxes of 64 channels (128 bytes) x bmt tokens, 128-byte swizzle (the staging layout).
// False where TMA cannot store it: row stride not a multiple of 16 bytes (N % 8 != 0) or
// an unaligned base; the kernel then copies the staged tile element by element.
inline bool make_out_map(const W4A8Args& a, int bmt, CUtensorMap* map) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult q;
    QOQ_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                                    cudaEnableDefault, &q));
    if (q != cudaDriverEntryPointSuccess || fn == nullptr) {
      qoq::throw_cuda_error(cudaErrorNotSupported, "cuTensorMapEncodeTiled lookup", __FILE__, __LINE__);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  if (a.N % 8 != 0 || (reinterpret_cast<uintptr_t>(a.out) & 15) != 0) return false;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(a.N), static_cast<cuuint64_t>(a.M)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(a.N) * 2};
  const cuuint32_t box[2] = {64, static_cast<cuuint32_t>(bmt)};
  const cuuint32_t estr[2] = {1, 1};
  const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, a.out, dims, strides, box, estr,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    qoq::throw_cuda_error(cudaErrorInvalidValue, "cuTensorMapEncodeTiled(out)", __FILE__, __LINE__);
  }
  return true;
}

// Per-device launch setup of one path-7 kernel instantiation (shared-memory attribute set,
// CTAs per SM), one bit per device in `done`.
struct P7LaunchCache {
  unsigned long long done = 0;
  int per_sm[64] = {};
};

// Launches path-7 kernel `kern` (config C; the cooperative or the ping-pong one).  max_ctas
// > 0 (debug op): at most max_ctas CTAs, never the path-3 fallback.  max_ctas == 0: grid =
// #SMs x CTAs per SM.  Returns false, launching nothing, where the caller must run path 3
// instead (one wave or less, K == 0): the path-3 kernels are instantiated in their own
// translation units, not again here.
template <class C, bool SMEM_EPI, class Kernel>
bool launch_p7(Kernel kern, P7LaunchCache& cache, const W4A8Args& a, int max_ctas, cudaStream_t stream) {
  const int64_t tn = (a.N + C::BN - 1) / C::BN;
  const int64_t tm = (a.M + C::BMT - 1) / C::BMT;
  const int64_t tiles = tn * tm;
  if (a.K == 0 || tiles > INT_MAX) return false;
  int dev = 0;
  QOQ_CUDA_CHECK(cudaGetDevice(&dev));
  const unsigned long long bit = 1ull << (dev & 63);
  if (!(cache.done & bit)) {
    QOQ_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM_BYTES));
    int occ = 0;
    QOQ_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kern, C::THREADS, C::SMEM_BYTES));
    cache.per_sm[dev & 63] = std::max(1, occ);
    cache.done |= bit;
  }
  const int64_t slots = static_cast<int64_t>(cache.per_sm[dev & 63]) * a.num_sms;
  if (max_ctas <= 0 && tiles <= slots) return false;
  const int64_t grid = std::min<int64_t>(tiles, max_ctas > 0 ? max_ctas : slots);
  const CUtensorMap xmap = make_x_map(a, C::BMT);
  CUtensorMap omap;
  std::memset(&omap, 0, sizeof(omap));
  const bool tma_out = SMEM_EPI && make_out_map(a, C::BMT, &omap);
  kern<<<static_cast<unsigned>(grid), C::THREADS, C::SMEM_BYTES, stream>>>(a, xmap, omap, persistent_group_m(),
                                                                          tma_out ? 1 : 0);
  QOQ_CUDA_CHECK(cudaGetLastError());
  return true;
}

// The cooperative kernel through launch_p7.
template <class C, bool G128, OutKind OUT, bool SMEM_EPI>
bool launch_persistent(const W4A8Args& a, int max_ctas, cudaStream_t stream) {
  static P7LaunchCache cache;  // per instantiation
  return launch_p7<C, SMEM_EPI>(w4a8_sm90p_kernel<C, G128, OUT, SMEM_EPI>, cache, a, max_ctas, stream);
}

// VLLM_QOQ_GEMM_P7_BMT=128: path 7 never uses 192-token tiles (A/B); read once.
inline bool persistent_allow_192() {
  static const bool v = [] {
    const char* e = std::getenv("VLLM_QOQ_GEMM_P7_BMT");
    return !(e != nullptr && std::strcmp(e, "128") == 0);
  }();
  return v;
}

// Token-tile width: path 3's (pick_bmt: 64 up to M = 64, 128 up to 128, above 128 or 192 by
// a waves x (BMT + 64) cost model).  BMT = 192 runs the 384-thread CTA (producer warpgroup,
// setmaxnreg 40 / 232): with 288 threads every thread is capped at 168 registers and, with
// the tile loop around the main loop, ptxas serialised the 192-token wgmmas (C7512).  The
// register epilogue (VLLM_QOQ_GEMM_EPILOGUE=regs) keeps the first version's tiles (64/128,
// 288 threads) for A/B.
template <bool G128, OutKind OUT>
bool dispatch_persistent(const W4A8Args& a, int max_ctas, cudaStream_t stream) {
  const int bmt = pick_bmt(a);
  const bool wide = bmt == 192 && persistent_allow_192();
  if constexpr (OUT == OutKind::I32) {
    if (bmt == 64) return launch_persistent<PCfg<64, false>, G128, OUT, false>(a, max_ctas, stream);
    if (wide) return launch_persistent<PCfg<192, false, true>, G128, OUT, false>(a, max_ctas, stream);
    return launch_persistent<PCfg<128, false>, G128, OUT, false>(a, max_ctas, stream);
  } else {
    if (persistent_smem_epilogue()) {
      if (bmt == 64) return launch_persistent<PCfg<64, true>, G128, OUT, true>(a, max_ctas, stream);
      if (wide) return launch_persistent<PCfg<192, true, true>, G128, OUT, true>(a, max_ctas, stream);
      return launch_persistent<PCfg<128, true>, G128, OUT, true>(a, max_ctas, stream);
    }
    if (bmt == 64) return launch_persistent<PCfg<64, false>, G128, OUT, false>(a, max_ctas, stream);
    return launch_persistent<PCfg<128, false>, G128, OUT, false>(a, max_ctas, stream);
  }
}

}  // namespace sm90
}  // namespace qoq
