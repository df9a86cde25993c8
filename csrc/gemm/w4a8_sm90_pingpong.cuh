// Path 7 with a "ping-pong" consumer schedule (opt-in: VLLM_QOQ_GEMM_P7_SCHEDULE=pingpong,
// read once; default `cooperative` = w4a8_sm90_persistent.cuh, read that file first).
//
// ---- Why ----
// In the cooperative schedule both consumer warpgroups compute halves of ONE 128 x BMT tile
// and reach its epilogue together: while they convert, stage and store, nobody issues
// wgmmas (the producer keeps loading, but the tensor cores idle).  At K = 4096 that was
// 10-25% of the int32-output kernel's time (gemm-notes.md, path 7).  Ping-pong (the idea
// of CUTLASS's "KernelTmaWarpSpecializedPingpong", written here from the description): the
// two warpgroups work on DIFFERENT tiles, alternating, so that one runs its epilogue while
// the other runs its main loop.
//
// ---- Tile per warpgroup: 128 channels x BMT tokens (BMT 128; 64 for M <= 64) ----
// The tile is path 7's tile (BN = 128, same scheduler, same `tile_mn` raster), now owned by
// one warpgroup.  A 64-channel tile per warpgroup would keep the register count but load
// the activation tile once per 64 channels: 20 KB of shared-memory fill per 2.1 M MACs
// instead of 24 KB per 4.2 M -- 1.7x the L2->SM traffic that already bounds this kernel
// (w4a8_sm90.cuh, "Measured").  So the warpgroup issues, per k32 step, two m64nBMTk32
// wgmmas (channel halves h = 0, 1: accumulators acc0, acc1, BMT/2 registers each) sharing
// the activation descriptor, exactly as warpgroups 0 and 1 did.
// Registers: 2 x 64 accumulators at BMT 128 do not fit the 168 a thread gets in a 288- or
// 384-thread CTA without setmaxnreg, so the CTA is path 7's WIDE one (384 threads, producer
// warpgroup setmaxnreg 40, consumers 232).  The A fragments stay at 2 x 16 registers by
// committing the halves as separate wgmma groups: per stage
//     dequant h0 -> fa; issue 4 wgmmas (acc0, fa); commit; wait_group 1
//         (the previous group, h1 of the previous stage, is done: fb is free and the
//          previous stage's shared memory is no longer read -> release it)
//     dequant h1 -> fb; issue 4 wgmmas (acc1, fb); commit; wait_group 1
//         (h0 of this stage done: fa is free)
// so the tensor cores always have one 64 x BMT x 128 group queued while the warpgroup
// dequantizes the next (the cooperative kernel double-buffers per stage instead, with
// 2 x 16 registers per warpgroup-half).  BMT 192 would need 192 accumulators: not offered.
//
// ---- Pipeline and ordering ----
// Local tile j of a CTA (global tile blockIdx.x + j * gridDim.x) belongs to warpgroup j % 2.
// The producer is the cooperative one (produce_tiles: every use of every tile, in order,
// through the same ring); a use is consumed, and released, by the one warpgroup owning its
// tile, so `empty` counts 128 arrivals.  Uses are numbered over the CTA's tiles: local
// tile j's k-step kt is use j * nk + kt, stage (use % STAGES), parity (use / STAGES) & 1 --
// the numbering the producer uses, so each warpgroup knows its uses without talking to the
// other.
// Ordering barrier (named barriers 4 and 5, 256 threads: the other warpgroup's 128 arrive,
// this one's 128 sync): warpgroup w starts local tile j >= 1's main loop only after the
// owner of tile j - 1 has issued all of that tile's wgmmas (it then bar.arrives, before
// its own wgmma_wait 0 and epilogue).  The main loops thus run one after the other, each
// with the whole tensor core, in the ring's order; each epilogue overlaps the other
// warpgroup's main loop.  The barrier is also what makes the `full` waits sound: an
// mbarrier parity wait cannot tell phase i from phase i - 2, so a warpgroup may wait for use
// u only once use u - STAGES has been filled.  Inside a tile that is its own earlier use;
// across tiles, tile j - 1's uses have all been waited for (filled) by their owner before
// it arrives, and older tiles' uses were filled before them (the producer is in order).
// Without the barrier, warpgroup 1 would wait for use nk (stage nk % STAGES, phase
// nk / STAGES) at kernel start and could pass on a phase-0 barrier.
// Why it cannot hang (every wait has a producer that is itself not waiting on it):
//  * Named barriers: for each local tile j >= 1 exactly one bar.sync (its owner, before the
//    main loop) and exactly one bar.arrive (owner of j - 1, only if tile j exists -- the same
//    `tile + gridDim.x < tiles` test both sides compute), on the barrier of the owner of j.
//    Two arrives on one barrier cannot pile up unsynced: after arriving for j, warpgroup w
//    arrives again only after finishing j + 2, which needs its sync for j + 2, i.e. the
//    other's arrive after j + 1, which comes after the other's sync for j + 1.
//  * Ring: order the events M(0) < M(1) < E(0) < M(2) < E(1) < ... (M = main loop,
//    E = epilogue of a local tile).  M(j) waits for: the ordering arrive from M(j - 1);
//    its own warpgroup's E(j - 2) (program order); `full` of its uses, which the producer
//    fills after the releases of uses STAGES earlier -- uses of tiles <= j, released within
//    M(j - 1) / M(j) themselves or earlier (a use is released by its own warpgroup's next
//    step or right after the tile's wait_group 0, never later).  E(j) waits only for M(j)
//    and its own warpgroup's barriers/bulk groups.  Every dependency points backwards in
//    this total order, so there is no cycle.  (Inside M(j): use u is released during
//    step u + 1 of the same warpgroup, whose `full` wait needs the release of
//    u + 1 - STAGES < u: earlier, by the same argument.)
//  * The last tile's bulk stores are waited for (wait_group 0) before the CTA exits.
//
// ---- Epilogue ----
// Cooperative path 7's `epilogue_smem` (same epi_math per element, so the outputs stay
// bit-identical to path 3) run twice, once per 64-channel half, into two staging buffers
// per warpgroup (4 x BMT x 128 bytes: 64 KB at BMT 128, 6 stages still fit in 227 KB).
// Buffer reuse: before half 0 is staged, all of ltid 0's earlier stores have read their
// source (wait_group.read 0: those were issued a whole main loop ago); before half 1, all
// but the most recent one (= this tile's half 0, which reads the other buffer).
// int32 output stores from registers, as in the cooperative kernel.  The register epilogue
// (VLLM_QOQ_GEMM_EPILOGUE=regs) has no ping-pong version: with it the schedule stays
// cooperative.  VLLM_QOQ_GEMM_P7_BMT is moot here (never 192).
#pragma once

#include "gemm/w4a8_sm90_persistent.cuh"

namespace qoq {
namespace sm90 {

// The ping-pong CTA: path 3's tile and stage layout, 384 threads, four staging buffers.
template <int BMT_, bool SMEM_EPI>
struct PPCfg : Cfg<BMT_> {
  using Base = Cfg<BMT_>;
  static_assert(BMT_ == 64 || BMT_ == 128, "two BMT/2-register accumulators per thread");
  static constexpr bool WIDE = true;
  static constexpr int THREADS = 384;
  static constexpr int OUT_TILE_BYTES = SMEM_EPI ? BMT_ * 128 : 0;  // per 64-channel half
  static constexpr int SMEM_LIMIT = 227 * 1024;
  static constexpr int STAGES =
      std::min(Base::STAGES, (SMEM_LIMIT - 1024 - 4 * OUT_TILE_BYTES - 2 * 8 * Base::STAGES) / Base::STAGE_BYTES);
  static constexpr int SMEM_BYTES = STAGES * Base::STAGE_BYTES + 4 * OUT_TILE_BYTES + 1024 + 2 * STAGES * 8;
  static_assert(STAGES >= 3, "pipeline depth");
  static_assert(SMEM_BYTES <= SMEM_LIMIT, "shared memory");
};

#if QOQ_HAS_WGMMA
// Ordering barrier of consumer warpgroup w (4 + w): the other warpgroup arrives, w syncs.
__device__ __forceinline__ void order_wait(int w) {
  if (w == 0) {
    asm volatile("bar.sync 4, 256;\n" ::: "memory");
  } else {
    asm volatile("bar.sync 5, 256;\n" ::: "memory");
  }
}
__device__ __forceinline__ void order_signal(int w) {
  if (w == 0) {
    asm volatile("bar.arrive 4, 256;\n" ::: "memory");
  } else {
    asm volatile("bar.arrive 5, 256;\n" ::: "memory");
  }
}
#endif  // QOQ_HAS_WGMMA

template <class C, bool G128, OutKind OUT, bool SMEM_EPI>
__global__ void __launch_bounds__(C::THREADS, 1)
    w4a8_sm90pp_kernel(const W4A8Args a, const __grid_constant__ CUtensorMap xmap,
                       const __grid_constant__ CUtensorMap omap, int group_m, int tma_out) {
#if QOQ_HAS_WGMMA
  static_assert(!(SMEM_EPI && OUT == OutKind::I32), "int32 output stores from registers");
  constexpr int BMT = C::BMT, STAGES = C::STAGES;
  uint8_t* smem = smem_1024();
  uint8_t* otiles = smem + STAGES * C::STAGE_BYTES;  // SMEM_EPI: 4 x OUT_TILE_BYTES, 1024-aligned
  uint64_t* full = reinterpret_cast<uint64_t*>(otiles + 4 * C::OUT_TILE_BYTES);
  uint64_t* empty = full + STAGES;

  const int tid = threadIdx.x, wg = tid / 128, ltid = tid % 128;  // wg 2 = producer warpgroup
  const int tn = (a.N + C::BN - 1) / C::BN, tm = (a.M + BMT - 1) / BMT;
  const int tiles = tn * tm;  // < 2^31: checked on the host
  const int nk = (a.K + C::BK - 1) / C::BK;  // >= 1: K == 0 goes to path 3

  init_ring<STAGES>(full, empty, 128);  // one warpgroup consumes a use

  if (wg == 2) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (ltid == 0) produce_tiles<C, G128>(a, xmap, smem, full, empty, tiles, tn, tm, nk, group_m);
    return;
  }

  // -------------------------------------------------------------------- consumers
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  const int cw = wg, warp = ltid / 32, lane = ltid % 32, g = lane / 4, t = lane % 4;
  const int sh = warp % 2;
  int32_t acc0[BMT / 2], acc1[BMT / 2];  // channels 0-63 / 64-127 of the tile
  uint32_t fa[4][4], fb[4][4];           // A fragments of half 0 / half 1

  // Dequantize channel half h's A fragments of the stage at sw (n32 block nb = 2h + warp/2:
  // the rows warpgroup h held in the cooperative kernel).
  auto load_frag = [&](const uint8_t* sw, int h, uint32_t(&f)[4][4]) {
    load_a_frags<C, G128, 0>(sw, 2 * h + warp / 2, sh, g, lane, f);
  };

  // One stage use q: the two channel halves as two wgmma groups (see the top); `release` =
  // release use q - 1 (this warpgroup's previous use, same tile) once its groups are done.
  auto step = [&](uint32_t q, bool release) {
    const int s = static_cast<int>(q % STAGES);
    mbar_wait(&full[s], (q / STAGES) & 1);
    const uint8_t* st = smem + s * C::STAGE_BYTES;
    const uint8_t* sw = st + C::X_BYTES;
    load_frag(sw, 0, fa);
    issue_stage_wgmmas<BMT>(acc0, fa, st);
    wgmma_wait<1>();  // h1 of use q - 1 done: fb free, use q - 1 no longer read
    fence_regs(acc0);
    fence_regs(acc1);
    fence_frag(fb);
    if (release) mbar_arrive(&empty[(q - 1) % STAGES]);
    load_frag(sw, 1, fb);
    issue_stage_wgmmas<BMT>(acc1, fb, st);
    wgmma_wait<1>();  // h0 of use q done: fa free
    fence_regs(acc0);
    fence_regs(acc1);
    fence_frag(fa);
  };

  using T = std::conditional_t<OUT == OutKind::F16, __half, __nv_bfloat16>;
  for (int j = cw;; j += 2) {  // this warpgroup's local tiles
    const int64_t tile64 = static_cast<int64_t>(blockIdx.x) + static_cast<int64_t>(j) * gridDim.x;
    if (tile64 >= tiles) break;
    const int tile = static_cast<int>(tile64);
    const uint32_t q0 = static_cast<uint32_t>(j) * static_cast<uint32_t>(nk);  // uses before this tile
#pragma unroll
    for (int i = 0; i < BMT / 2; ++i) {
      acc0[i] = 0;
      acc1[i] = 0;
    }
    // The first step's fence_frag(fb) reads fb: define it here (else the previous tile's
    // fragments would stay live through its epilogue; see the cooperative kernel).
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int k = 0; k < 4; ++k) fb[i][k] = 0;
    if (j >= 1) order_wait(cw);  // tile j - 1's wgmmas are all issued
    for (int it = 0; it < nk; ++it) step(q0 + it, it > 0);
    // Tile j + 1 (if any) may start its main loop: all of this tile's wgmmas are issued.
    if (tile64 + gridDim.x < tiles) order_signal(cw ^ 1);
    wgmma_wait<0>();
    fence_regs(acc0);
    fence_regs(acc1);
    mbar_arrive(&empty[(q0 + nk - 1) % STAGES]);  // the tile's last use
    int mt, nt;
    tile_mn(tile, tn, tm, group_m, mt, nt);
    const int n0 = nt * C::BN, m0 = mt * BMT;

    // ---- epilogue: D[n][m] -> out[m][n], channel half 0 then half 1
    if constexpr (SMEM_EPI) {
      uint8_t* ob = otiles + 2 * cw * C::OUT_TILE_BYTES;
      // nbase < N is uniform in the warpgroup; half 0 always has it (n0 < N)
      epilogue_smem<C, G128, T, 0>(a, &omap, tma_out != 0, acc0, ob, m0, n0, cw, ltid);
      if (n0 + 64 < a.N) {
        epilogue_smem<C, G128, T, 1>(a, &omap, tma_out != 0, acc1, ob + C::OUT_TILE_BYTES, m0, n0 + 64, cw,
                                     ltid);
      }
    } else {
      static_assert(OUT == OutKind::I32, "fp16/bf16 output: the staged epilogue only");
#pragma unroll
      for (int v = 0; v < BMT / 8; ++v)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int m = m0 + 8 * v + 2 * t + e;
          if (m < a.M) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int n = n0 + warp * 16 + g + 8 * h;
              if (n < a.N) epi::store1<G128, OUT>(a, m, n, acc0[4 * v + 2 * h + e]);
              if (n + 64 < a.N) epi::store1<G128, OUT>(a, m, n + 64, acc1[4 * v + 2 * h + e]);
            }
          }
        }
    }
  }
  if constexpr (SMEM_EPI) {
    if (ltid == 0) bulk_wait_all();  // stores done before the CTA's shared memory goes away
  }
#endif  // QOQ_HAS_WGMMA
}

// VLLM_QOQ_GEMM_P7_SCHEDULE=pingpong|cooperative: path 7's consumer schedule (default
// cooperative; A/B); read once.
inline bool persistent_pingpong() {
  static const bool v = [] {
    const char* e = std::getenv("VLLM_QOQ_GEMM_P7_SCHEDULE");
    return e != nullptr && std::strcmp(e, "pingpong") == 0;
  }();
  return v;
}

// The ping-pong kernel through launch_p7 (same grid rule, same one-wave fallback, same
// tensor maps as the cooperative one).
template <class C, bool G128, OutKind OUT, bool SMEM_EPI>
bool launch_pingpong(const W4A8Args& a, int max_ctas, cudaStream_t stream) {
  static P7LaunchCache cache;  // per instantiation
  return launch_p7<C, SMEM_EPI>(w4a8_sm90pp_kernel<C, G128, OUT, SMEM_EPI>, cache, a, max_ctas, stream);
}

// Path 7's entry: the ping-pong kernel where it applies (VLLM_QOQ_GEMM_P7_SCHEDULE=pingpong,
// int32 output or the staged epilogue), else the cooperative one.  Token tiles: 64 where
// path 3 picks 64 (M <= 64), else 128.
template <bool G128, OutKind OUT>
bool dispatch_p7(const W4A8Args& a, int max_ctas, cudaStream_t stream) {
  const bool pp = persistent_pingpong() && (OUT == OutKind::I32 || persistent_smem_epilogue());
  if (!pp) return dispatch_persistent<G128, OUT>(a, max_ctas, stream);
  constexpr bool SMEM_EPI = OUT != OutKind::I32;
  if (pick_bmt(a) == 64) return launch_pingpong<PPCfg<64, SMEM_EPI>, G128, OUT, SMEM_EPI>(a, max_ctas, stream);
  return launch_pingpong<PPCfg<128, SMEM_EPI>, G128, OUT, SMEM_EPI>(a, max_ctas, stream);
}

}  // namespace sm90
}  // namespace qoq
