// W4A8 GEMM on Hopper wgmma (sm_90a): warp-specialised, weights dequantized in registers.
//
// Same math, inputs and kernel weight layout as the mma.sync path (w4a8_sm80.cuh; layouts
// written down in vllm_qoq/kernel_layout.py); the same epilogue (epilogue.cuh).
//
// ---- Formulation ("swap AB") ----
// wgmma takes its A operand from registers only as the M side of a 64-row tile, so the GEMM
// is computed transposed: D[n, m] = sum_k W[n, k] * X[m, k].  A = the weights (64 output
// channels per warpgroup), dequantized into the A register fragment; B = the int8
// activations, a BMT x 128-byte tile (tokens x K) in shared memory, K-major, 128-byte
// swizzled; D = int32 accumulators, BMT/2 registers per thread.
// A fragment of wgmma.m64nNk32 (8-bit; = mma.m16n8k32's A, warp w owning rows 16w..16w+15):
//   a0 = W[16w+g][4t..4t+3], a1 = W[16w+g+8][4t..], a2 = W[16w+g][16+4t..], a3 = W[16w+g+8][16+4t..]
// In the kernel weight layout, lane (g, t) of the 512-byte block (n32 block nb, k32 block kc)
// holds words j = 0..3 for rows 8j+g, low nibbles k = 4t+i, high nibbles k = 16+4t+i.  Rows
// 16h+g and 16h+8+g are words 2h and 2h+1: one 8-byte load gives a0/a2 (word 2h) and a1/a3
// (word 2h+1).  g128: the same bytes are multiplied by s2 and offset by the row's zero
// (dev::dequant_g128, qoq.md §1), with the s2/zneg bytes 2h, 2h+1 of the lane's 32-bit word.
// D fragment: d[4*v + 2*h + e] = D[16w + g + 8h][8v + 2t + e]  (row = channel, col = token).
//
// ---- CTA ----
// 288 threads: warpgroups 0 and 1 = consumers (wgmma needs warpgroups at warp 0 and 4), warp 8
// = producer (one warp keeps the register cap at 224 per thread without setmaxnreg, which
// ptxas did not honour here: 384 threads capped every thread at 168 and spilled).
// Producer (one thread): per stage one TMA load of the X tile (2-D tensor map, 128-byte
// swizzle, rows past M and columns past K zero-filled by the copy engine), four 1-D bulk
// copies of the 128x128 weight tile (four contiguous 2 KB runs: blocks (nb, kc..kc+3) of the
// kernel layout) and two 128-byte bulk copies of the s2/zneg rows, all completing on the
// stage's `full` mbarrier (expect_tx).  Weight blocks past K or N are not copied: their stale
// bytes meet zero activations (K) or feed rows that are never stored (N).  Consumers (64 output channels per warpgroup): wait `full`, load + dequantize the
// 4 k32 A fragments of the stage (double-buffered registers: the previous stage's wgmmas may
// still read theirs), issue 4 wgmmas, commit, wait until the previous stage's wgmmas are
// done, release that stage (`empty` mbarrier).  Dequantization of stage i+1 thus overlaps
// the tensor-core work of stage i, and loads run STAGES deep.
// Split-K across CTAs (grid.z): each split stores its int32 partial tile into its own slice
// of the self-cleaning workspace, the last CTA of a tile adds them up and runs the epilogue.
// Epilogue: through shared memory, so that every warp stores whole 16-byte row segments.
//
// ---- Measured (H100, benchmarks/results/gemm-h100-v2-wgmma.md) ----
// ~800 TOPS at M = 4096 (41% of the INT8 peak, 0.6x cuBLAS FP8).  Every tile shape reaches
// the same ~4.6 TB/s of L2->SM traffic (X is re-read by every N tile), so the kernel is bound
// by that traffic, not by the tensor cores or the dequantization (per-channel and g128 run
// within 10% of each other).  The CLUSTER variant below halves the X traffic (CTA pairs,
// TMA multicast); it was written after the last device run: opt-in (bindings.cu,
// kClusterByDefault; VLLM_QOQ_GEMM_PATH=sm90-cluster), covered by tests/gpu (path 4).
#pragma once

#include <algorithm>
#include <type_traits>

#include <cuda.h>
#include <cudaTypedefs.h>

#include "common/device.cuh"
#include "gemm/epilogue.cuh"

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define QOQ_HAS_WGMMA 1
#else
#define QOQ_HAS_WGMMA 0
#endif

namespace qoq {
namespace sm90 {

#if QOQ_HAS_WGMMA
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(dev::smem_addr(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(
                   dev::smem_addr(bar))
               : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred p;\nQOQ_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra QOQ_WAIT;\n}\n" ::"r"(dev::smem_addr(bar)),
      "r"(parity)
      : "memory");
}
// Cluster variant: acquire at cluster scope (the releases come from both CTAs), and give up
// with a trap -- a launch error instead of a hung process -- if a phase has not completed
// after ~10 s, i.e. if this (not yet device-tested) protocol ever deadlocks.
__device__ __forceinline__ void mbar_wait_cluster(uint64_t* bar, uint32_t parity) {
  const long long t0 = clock64();
  for (;;) {
    uint32_t done;
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(dev::smem_addr(bar)), "r"(parity)
        : "memory");
    if (done) return;
    if (clock64() - t0 > (1ll << 34)) __trap();
  }
}
// Arrive on the mbarrier at the same shared-memory offset in CTA `rank` of the cluster.
__device__ __forceinline__ void mbar_arrive_cluster(uint64_t* bar, uint32_t rank) {
  asm volatile(
      "{\n.reg .b32 ra;\nmapa.shared::cluster.u32 ra, %0, %1;\n"
      "mbarrier.arrive.release.cluster.shared::cluster.b64 _, [ra];\n}\n" ::"r"(dev::smem_addr(bar)),
      "r"(rank)
      : "memory");
}
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}
__device__ __forceinline__ void fence_mbar_init_cluster() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(dev::smem_addr(bar)),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, int c0, int c1,
                                            uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          dev::smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(dev::smem_addr(bar))
      : "memory");
}
// The same box into the same offset of every CTA in `mask`, each CTA's mbarrier signalled.
__device__ __forceinline__ void tma_load_2d_multicast(void* dst, const CUtensorMap* map, int c0, int c1,
                                                      uint64_t* bar, uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(dev::smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(dev::smem_addr(bar)), "h"(mask)
      : "memory");
}
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
          dev::smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(dev::smem_addr(bar))
      : "memory");
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void consumer_bar() { asm volatile("bar.sync 1, 256;\n" ::: "memory"); }

// Keep the compiler from moving accumulator registers across wgmma boundaries.
template <int N>
__device__ __forceinline__ void fence_regs(int32_t (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(d[i])::"memory");
}

__device__ __forceinline__ void fence_frag(uint32_t (&f)[4][4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(f[i][j])::"memory");
}

// Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row groups 1024 B apart.
__device__ __forceinline__ uint64_t sw128_desc(const void* p) {
  const uint64_t addr = dev::smem_addr(p);
  return ((addr & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) |
         (uint64_t(1) << 62);
}

#include "gemm/wgmma_s8_rs.inc"
#endif  // QOQ_HAS_WGMMA

template <int BMT_>
struct Cfg {
  static constexpr int BMT = BMT_;  // tokens per CTA tile (wgmma N): 64, 128 or 192
  // (256 would need 128 accumulator registers + 32 for the double-buffered A fragments: over
  // the 168 registers a thread gets with 9 warps per CTA, 3 per SM sub-partition.)
  static constexpr int BN = 128;    // output channels per CTA tile (2 consumer WGs x 64)
  static constexpr int BK = 128;    // input channels per stage (one g128 group)
  static constexpr int X_BYTES = BMT * BK;
  static constexpr int W_BYTES = BN * BK / 2;
  static constexpr int S_BYTES = 2 * BN;
  static constexpr int STAGE_BYTES = (X_BYTES + W_BYTES + S_BYTES + 1023) / 1024 * 1024;
  static constexpr int STAGES = std::min(6, (200 * 1024) / STAGE_BYTES);
  static constexpr int SMEM_BYTES = STAGES * STAGE_BYTES + 1024 + 2 * STAGES * 8;
  static constexpr int THREADS = 288;
  static_assert(STAGES >= 3, "pipeline depth");
};

#if QOQ_HAS_WGMMA
// The dynamic shared memory aligned up to 1024 bytes (the 128B-swizzle atom; every sm90
// kernel asks for 1024 bytes more than it lays out).
__device__ __forceinline__ uint8_t* smem_1024() {
  extern __shared__ uint8_t smem_raw[];
  return reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
}

// ---- a consumer warpgroup's work on one stage, shared by path 3 and path 7 (cooperative and
// ping-pong): every config is a Cfg<BMT> (the same stage layout).

// The dequantized A fragments (weights, wgmma register layout) of n32 block nb, row half
// sh = warp % 2, four k32 steps, lane (g, t), of the stage whose weight bytes start at
// base + WOFF: the stage (WOFF = X_BYTES) or its weights (WOFF = 0).  The two forms exist only
// for the code generation: each caller uses the one with which nvcc 13.0 gives the machine
// code it had when this was written out in each kernel (checked on the SASS; the other form
// moves an address add into or out of the main loop).
template <class C, bool G128, int WOFF>
__device__ __forceinline__ void load_a_frags(const uint8_t* base, int nb, int sh, int g, int lane,
                                             uint32_t (&f)[4][4]) {
  const uint8_t* sw = base + WOFF;
  uint32_t s2a = 0, s2b = 0, za = 0, zb = 0;
  if constexpr (G128) {
    const uint32_t s2w = *reinterpret_cast<const uint32_t*>(sw + C::W_BYTES + nb * 32 + g * 4);
    const uint32_t zw = *reinterpret_cast<const uint32_t*>(sw + C::W_BYTES + C::BN + nb * 32 + g * 4);
    s2a = (s2w >> (16 * sh)) & 0xffu;
    s2b = (s2w >> (16 * sh + 8)) & 0xffu;
    za = dev::g128_zc(zw >> (16 * sh));
    zb = dev::g128_zc(zw >> (16 * sh + 8));
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
}

// The stage's four wgmmas into acc (A = f, B = the X tile at st) as one commit group.
template <int BMT>
__device__ __forceinline__ void issue_stage_wgmmas(int32_t (&acc)[BMT / 2], const uint32_t (&f)[4][4],
                                                   const uint8_t* st) {
  wgmma_fence();
  fence_regs(acc);
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) wgmma_rs<BMT>(acc, f[ks], sw128_desc(st + ks * 32));
  wgmma_commit();
  fence_regs(acc);
}

// One stage of a cooperative consumer warpgroup (the caller has waited for it to be full and
// releases the previous one after): dequantize into f, issue, then wait for the previous
// stage's group, whose fragments fprev were live until its wgmmas finished.
template <class C, bool G128>
__device__ __forceinline__ void mma_stage(const uint8_t* st, int nb, int sh, int g, int lane,
                                          int32_t (&acc)[C::BMT / 2], uint32_t (&f)[4][4],
                                          uint32_t (&fprev)[4][4]) {
  load_a_frags<C, G128, C::X_BYTES>(st, nb, sh, g, lane, f);
  issue_stage_wgmmas<C::BMT>(acc, f, st);
  wgmma_wait<1>();
  fence_regs(acc);
  fence_frag(fprev);
}

// The element-wise epilogue (int32 output) straight from a warpgroup's accumulators: element
// acc[4v + 2h + e] of lane (g, t) is token m0 + 8v + 2t + e, channel nch + 8h (nch: the
// lane's h = 0 channel).
template <int BMT, bool G128, OutKind OUT>
__device__ __forceinline__ void store_acc_direct(const W4A8Args& a, const int32_t (&acc)[BMT / 2], int m0,
                                                 int nch, int t) {
#pragma unroll
  for (int v = 0; v < BMT / 8; ++v)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int m = m0 + 8 * v + 2 * t + e;
      if (m < a.M) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int n = nch + 8 * h;
          if (n < a.N) epi::store1<G128, OUT>(a, m, n, acc[4 * v + 2 * h + e]);
        }
      }
    }
}
#endif  // QOQ_HAS_WGMMA

template <class C, bool G128, OutKind OUT, bool CLUSTER>
__global__ void __launch_bounds__(288, 1)
    w4a8_sm90_kernel(const W4A8Args a, const __grid_constant__ CUtensorMap xmap, int k_tiles_per_split) {
#if QOQ_HAS_WGMMA
  constexpr int BMT = C::BMT, STAGES = C::STAGES;
  uint8_t* smem = smem_1024();
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + STAGES * C::STAGE_BYTES);
  uint64_t* empty = full + STAGES;
  __shared__ int is_last;

  const int tid = threadIdx.x, wg = tid / 128, ltid = tid % 128;  // wg 2 = producer warp
  const int n0 = blockIdx.x * C::BN, m0 = blockIdx.y * BMT;
  const int kt_total = (a.K + C::BK - 1) / C::BK;
  const int kt0 = blockIdx.z * k_tiles_per_split;
  const int nk = max(0, min(kt_total, kt0 + k_tiles_per_split) - kt0);
  // CLUSTER: CTA pairs (consecutive N tiles, same M tile and K range) share the X tile: each
  // producer loads half of its rows and multicasts them into both CTAs, halving the L2->SM
  // traffic of X.  A stage may then be refilled only when the consumers of BOTH CTAs have
  // released it: every consumer warp arrives on the `empty` barrier of both CTAs.
  const uint32_t crank = CLUSTER ? cluster_rank() : 0;

  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], CLUSTER ? 16 : 256);
    }
    if constexpr (CLUSTER) fence_mbar_init_cluster();
  }
  if constexpr (CLUSTER) {
    cluster_sync();
  } else {
    __syncthreads();
  }

  if (wg == 2) {
    // ------------------------------------------------------------------ producer
    if (ltid == 0) {
      const int kblocks = a.K / 32;
      for (int it = 0; it < nk; ++it) {
        const int s = it % STAGES;
        if (it >= STAGES) {
          if constexpr (CLUSTER) {
            mbar_wait_cluster(&empty[s], ((it / STAGES) - 1) & 1);
          } else {
            mbar_wait(&empty[s], ((it / STAGES) - 1) & 1);
          }
        }
        uint8_t* st = smem + s * C::STAGE_BYTES;
        uint8_t* sw = st + C::X_BYTES;
        const int kt = kt0 + it, kc0 = kt * (C::BK / 32);
        const int kvalid = min(C::BK / 32, kblocks - kc0);  // k32 blocks inside K
        int nvalid = 0;                                      // n32 blocks inside Np
#pragma unroll
        for (int nc = 0; nc < C::BN / 32; ++nc) nvalid += (n0 + nc * 32 < a.Np) ? 1 : 0;
        const int sbytes = (G128 && n0 < a.Np) ? 2 * min(C::BN, a.Np - n0) : 0;
        mbar_expect_tx(&full[s], C::X_BYTES + nvalid * kvalid * 512 + sbytes);
        if constexpr (CLUSTER) {
          tma_load_2d_multicast(st + crank * (C::X_BYTES / 2), &xmap, kt * C::BK,
                                m0 + static_cast<int>(crank) * (BMT / 2), &full[s], uint16_t(3));
        } else {
          tma_load_2d(st, &xmap, kt * C::BK, m0, &full[s]);
        }
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
      }
    }
    if constexpr (CLUSTER) {
      __syncwarp();
      cluster_sync();  // pairs with the consumers' one after their main loop
    }
    return;
  }

  // -------------------------------------------------------------------- consumers
  const int cw = wg, warp = ltid / 32, lane = ltid % 32, g = lane / 4, t = lane % 4;
  const int nb = cw * 2 + warp / 2, sh = warp % 2;
  int32_t acc[BMT / 2];
#pragma unroll
  for (int i = 0; i < BMT / 2; ++i) acc[i] = 0;
  uint32_t fa[4][4], fb[4][4];

  auto step = [&](int it, uint32_t(&f)[4][4], uint32_t(&fprev)[4][4]) {
    const int s = it % STAGES;
    if constexpr (CLUSTER) {
      mbar_wait_cluster(&full[s], (it / STAGES) & 1);
    } else {
      mbar_wait(&full[s], (it / STAGES) & 1);
    }
    mma_stage<C, G128>(smem + s * C::STAGE_BYTES, nb, sh, g, lane, acc, f, fprev);
    if (it > 0) {
      if constexpr (CLUSTER) {
        if (lane == 0) {
          mbar_arrive_cluster(&empty[(it - 1) % STAGES], 0);
          mbar_arrive_cluster(&empty[(it - 1) % STAGES], 1);
        }
      } else {
        mbar_arrive(&empty[(it - 1) % STAGES]);
      }
    }
  };

  int it = 0;
  for (; it + 1 < nk; it += 2) {
    step(it, fa, fb);
    step(it + 1, fb, fa);
  }
  if (it < nk) step(it, fa, fb);
  wgmma_wait<0>();
  fence_regs(acc);
  // After this no CTA of the pair touches the other's shared memory or barriers: every
  // multicast into this CTA was for a stage it consumed, every remote arrive was issued.
  if constexpr (CLUSTER) cluster_sync();

  // ---- split-K across CTAs: each split reduces through its own workspace slice
  // (dev::splitk_slices; thread tid's q-th int4 at q * 256 + tid).  The workspace is shared
  // with the other paths.
  const int nrow = cw * 64 + warp * 16 + g;  // channel (within the tile) of acc[.. 2h=0 ..]
  if (gridDim.z > 1) {
    static_assert(BMT % 8 == 0, "int4 slices");
    constexpr int TILE_INTS = BMT * C::BN;  // = 256 consumer threads x BMT / 2
    const int tile = blockIdx.y * gridDim.x + blockIdx.x;
    const int ntiles = gridDim.x * gridDim.y;
    auto slice = [&](int split) {
      return reinterpret_cast<int4*>(a.workspace + (static_cast<int64_t>(split) * ntiles + tile) * TILE_INTS) + tid;
    };
    int* counter = reinterpret_cast<int*>(a.workspace + static_cast<int64_t>(gridDim.z) * ntiles * TILE_INTS) + tile;
    auto acc4 = [&](int q) -> int32_t* { return &acc[4 * q]; };
    if (!dev::splitk_slices<BMT / 8, 256>(slice, static_cast<int>(blockIdx.z), static_cast<int>(gridDim.z),
                                          counter, true, acc4, [] { consumer_bar(); }, tid == 0, is_last))
      return;
  }

  // ---- epilogue: D[n][m] -> out[m][n]
  if constexpr (OUT == OutKind::I32) {
    store_acc_direct<BMT, G128, OUT>(a, acc, m0, n0 + nrow, t);
  } else {
    // Through shared memory: each warpgroup writes its 64-channel x BMT-token tile as
    // out[m][n] rows (144-byte stride: conflict-free 2-byte writes), then stores full 16-byte
    // row segments to global memory.
    using T = std::conditional_t<OUT == OutKind::F16, __half, __nv_bfloat16>;
    constexpr int LD = 72;  // elements per staged row (64 + 8 pad)
    epi::ColParams cp[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = n0 + nrow + 8 * h;
      cp[h] = n < a.N ? epi::col_params<G128>(a, n) : epi::ColParams{0.f, 0.f, 0.f};
    }
    const bool has_bias = a.bias_kind != BiasKind::None;
    consumer_bar();  // every consumer is past its last wgmma: the stage buffers are free
    T* tile = reinterpret_cast<T*>(smem) + cw * (BMT * LD);
#pragma unroll
    for (int v = 0; v < BMT / 8; ++v)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int ml = 8 * v + 2 * t + e;
        const int m = m0 + ml;
        const float sxm = m < a.M ? a.sx[m] : 0.f;
        const float qsm = (!G128 && m < a.M) ? static_cast<float>(a.qsum[m]) : 0.f;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float y = epi::epi_math<G128>(acc[4 * v + 2 * h + e], cp[h], sxm, qsm, has_bias);
          tile[ml * LD + warp * 16 + g + 8 * h] = epi::to_out<T>(y);
        }
      }
    asm volatile("bar.sync %0, 128;\n" ::"r"(2 + cw) : "memory");
    T* out = static_cast<T*>(a.out);
    const int nbase = n0 + cw * 64;
    const bool vec_ok = (a.N % 8) == 0;
    for (int c = ltid; c < BMT * 8; c += 128) {
      const int ml = c >> 3, ch = c & 7;
      const int m = m0 + ml, n = nbase + ch * 8;
      if (m >= a.M || n >= a.N) continue;
      const T* src = tile + ml * LD + ch * 8;
      T* dst = out + static_cast<int64_t>(m) * a.N + n;
      if (vec_ok && n + 8 <= a.N) {
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
      } else {
        for (int i = 0; i < 8 && n + i < a.N; ++i) dst[i] = src[i];
      }
    }
  }
#endif  // QOQ_HAS_WGMMA
}

// Whether this build has the sm_90a kernels (a device probe: the kernels above are empty
// when compiled for anything else).
__global__ void probe_kernel(int* out);

// Tensor map of qx [M, K] int8 for TMA: boxes of BMT rows x 128 bytes, 128-byte swizzle.
inline CUtensorMap make_x_map(const W4A8Args& a, int bmt) {
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
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(a.K), static_cast<cuuint64_t>(a.M)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(a.K)};
  const cuuint32_t box[2] = {128, static_cast<cuuint32_t>(bmt)};
  const cuuint32_t estr[2] = {1, 1};
  const CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<int8_t*>(a.qx), dims,
                            strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    qoq::throw_cuda_error(cudaErrorInvalidValue, "cuTensorMapEncodeTiled(qx)", __FILE__, __LINE__);
  }
  return map;
}

template <class C, bool G128, OutKind OUT, bool CLUSTER>
void launch(const W4A8Args& a, int ctas_per_sm_target, cudaStream_t stream) {
  auto kern = w4a8_sm90_kernel<C, G128, OUT, CLUSTER>;
  static unsigned long long setup_done = 0;  // per instantiation, one bit per device
  const unsigned long long bit = current_device_bit();
  if (!(setup_done & bit)) {
    QOQ_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM_BYTES));
    setup_done |= bit;
  }
  int tn = (a.N + C::BN - 1) / C::BN;
  if (CLUSTER) tn += tn & 1;  // whole CTA pairs (a CTA past N loads X, computes, stores nothing)
  const int tm = (a.M + C::BMT - 1) / C::BMT;
  const int kt = (a.K + C::BK - 1) / C::BK;
  const int64_t tiles = static_cast<int64_t>(tn) * tm;
  const int64_t target = static_cast<int64_t>(ctas_per_sm_target) * a.num_sms;
  int splits = 1;
  if (tiles < target && a.workspace != nullptr) {
    // one wave: tiles * splits <= CTA slots; at least 3 k-tiles per split; one workspace
    // slice per split (+ a counter per tile)
    const int64_t fit = (a.workspace_ints - tiles) / (tiles * (C::BMT * C::BN));
    splits = static_cast<int>(std::min<int64_t>(std::min<int64_t>(target / tiles, 16), fit));
    splits = std::max(1, std::min(splits, kt / 3));
  }
  const int per = (kt + splits - 1) / splits;
  splits = (kt + per - 1) / per;
  dim3 grid(tn, tm, splits);
  const CUtensorMap xmap = make_x_map(a, CLUSTER ? C::BMT / 2 : C::BMT);
  if constexpr (CLUSTER) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = dim3(C::THREADS);
    cfg.dynamicSmemBytes = C::SMEM_BYTES;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = 2;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    QOQ_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kern, a, xmap, per));
  } else {
    kern<<<grid, C::THREADS, C::SMEM_BYTES, stream>>>(a, xmap, per);
  }
  QOQ_CUDA_CHECK(cudaGetLastError());
}

// Token-tile width by M: 64 up to M = 64, 128 up to 128; above, 128 or 192, whichever needs
// less (waves x per-tile time), modelling a tile's time as BMT + 64 (the weight load and
// dequantization cost that does not shrink with BMT).  One CTA per SM (registers).
inline int pick_bmt(const W4A8Args& a) {
  if (a.M <= 64) return 64;
  if (a.M <= 128) return 128;
  const int64_t tn = (a.N + 127) / 128;
  int best = 192;
  int64_t best_cost = -1;
  for (int bmt : {192, 128}) {
    const int64_t tiles = tn * ((a.M + bmt - 1) / bmt);
    const int64_t waves = (tiles + a.num_sms - 1) / a.num_sms;
    const int64_t cost = waves * (bmt + 64);
    if (best_cost < 0 || cost < best_cost) {
      best = bmt;
      best_cost = cost;
    }
  }
  return best;
}

template <bool G128, OutKind OUT, bool CLUSTER>
void dispatch_bmt(const W4A8Args& a, cudaStream_t stream) {
  switch (pick_bmt(a)) {
    case 64: launch<Cfg<64>, G128, OUT, CLUSTER>(a, 1, stream); break;
    case 128: launch<Cfg<128>, G128, OUT, CLUSTER>(a, 1, stream); break;
    default: launch<Cfg<192>, G128, OUT, CLUSTER>(a, 1, stream); break;
  }
}

}  // namespace sm90
}  // namespace qoq
