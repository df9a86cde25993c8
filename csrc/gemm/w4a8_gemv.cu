// W4A8 GEMV for the decode regime: CUDA cores and dp4a (M <= 16, path 5), and the same
// weight stream into mma.sync (M <= 32, path 6, further down).
//
// Why: at M = 1..4 an m16n8k32 MMA wastes 15/16..3/4 of its rows, and the mma.sync
// kernel's tiles (staging, intra-CTA reduction, stream-K) cost more than the ~2.5-20 us
// the weight bytes need at HBM speed.  Here every lane streams 16-byte words of the
// kernel-layout weights straight into registers (no shared-memory staging) and multiplies
// 4 codes x 4 activations per dp4a, so the kernel is a pure weight stream.
//
// Math (spec: vllm_qoq/reference/gemm.py; same int32 accumulator as the MMA kernels):
//   per-channel: acc[m,n] = sum_k qx[m,k] * u[n,k]
//   g128:        acc[m,n] = sum_k qx[m,k] * q8[n,k],  q8 = s2*(u - z)
//                         = sum_g s2[n,g] * (sum_{k in g} u*qx  -  z[n,g] * sum_{k in g} qx)
//   The second form is an exact integer identity; each lane applies it to its own share
//   of a group's k (the zero term uses the sum of the activations that lane multiplied),
//   and the lanes' shares add up to the whole group.  z*s2 comes from the kernel layout's
//   pre-negated byte: zneg = (-z*s2) mod 256 with z*s2 <= 240 -> z*s2 = (256 - zneg) mod 256.
//   Then the shared fp32 epilogue (gemm/epilogue.cuh), so outputs equal the other paths'.
//
// Layout (vllm_qoq/kernel_layout.py): the weights are 512-byte blocks (32 output x 32
// input channels); lane l = 4*g + t reads 16 bytes = words j = 0..3 for output channel
// n = 32*nc + 8*j + g, whose low nibbles are u[n, 32*kc + 4*t + 0..3] and high nibbles
// u[n, 32*kc + 16 + 4*t + 0..3]: exactly the 4 int8 activations at qx[m, 32*kc + 4*t]
// and at qx[m, 32*kc + 16 + 4*t] (natural layout, one 32-bit load each).
//
// Work split: CTA (nc, split) owns the 32 output channels of block nc and a range of
// k-steps (a step = 4 k32 blocks = one g128 group); its 8 warps take the steps round-
// robin, every lane issuing 4 independent 16-byte loads per step.  Partial sums: shuffles
// over the 4 lanes of a channel, shared memory over warps, and -- with several splits --
// exact int32 atomics into the shared split-K workspace, the last CTA of the block
// finishing (and zeroing what it read: the workspace stays clean, CUDA-graph safe).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "common/device.cuh"
#include "common/launch.h"
#include "gemm/epilogue.cuh"

namespace qoq {
namespace gemv {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kStep = 4;  // k32 blocks per step (one g128 group)

// The 4 weight words (16 bytes each) of one step of lane `wptr`, zeros past kc_end.
__device__ __forceinline__ void load_step(uint4 (&w)[kStep], const uint4* wptr, int kc, int kc_end) {
#pragma unroll
  for (int s = 0; s < kStep; ++s) {
    w[s] = kc + s < kc_end ? __ldcs(wptr + static_cast<int64_t>(kc + s) * 32)
                           : make_uint4(0u, 0u, 0u, 0u);
  }
}

template <int MT, bool G128, OutKind OUT>
__global__ void __launch_bounds__(kThreads) w4a8_gemv_kernel(const W4A8Args a, int steps_per_split) {
  const int nc = blockIdx.x;
  const int kblocks = a.K / 32;
  const int kc_begin = blockIdx.y * steps_per_split * kStep;
  const int kc_end = min(kblocks, kc_begin + steps_per_split * kStep);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;

  const uint4* wptr = reinterpret_cast<const uint4*>(a.qweight) +
                      static_cast<int64_t>(nc) * kblocks * 32 + lane;
  int32_t acc[MT][4];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[m][j] = 0;

  // Register double buffer: the next step's 4 x 16 bytes are in flight while this step
  // computes, so a warp never waits a full memory latency per step.
  uint4 wn[kStep];
  load_step(wn, wptr, kc_begin + warp * kStep, kc_end);
  for (int kc = kc_begin + warp * kStep; kc < kc_end; kc += kWarps * kStep) {
    uint4 w[kStep];
#pragma unroll
    for (int s = 0; s < kStep; ++s) w[s] = wn[s];
    load_step(wn, wptr, kc + kWarps * kStep, kc_end);
    int32_t part[MT][4];
    int32_t xsum[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      xsum[m] = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) part[m][j] = 0;
    }
#pragma unroll
    for (int s = 0; s < kStep; ++s) {
      const int k = (kc + s) * 32 + 4 * t;
      const bool kv = kc + s < kc_end;
      const uint32_t ws[4] = {w[s].x, w[s].y, w[s].z, w[s].w};
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        int xlo = 0, xhi = 0;
        if (kv && m < a.M) {
          const int8_t* xr = a.qx + static_cast<int64_t>(m) * a.K + k;
          xlo = __ldg(reinterpret_cast<const int*>(xr));
          xhi = __ldg(reinterpret_cast<const int*>(xr + 16));
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          part[m][j] = __dp4a(static_cast<int>(dev::lo_nibbles(ws[j])), xlo, part[m][j]);
          part[m][j] = __dp4a(static_cast<int>(dev::hi_nibbles(ws[j])), xhi, part[m][j]);
        }
        if constexpr (G128) {
          xsum[m] = __dp4a(0x01010101, xlo, xsum[m]);
          xsum[m] = __dp4a(0x01010101, xhi, xsum[m]);
        }
      }
    }
    if constexpr (G128) {
      // the step is group kc/4; lane g's word holds channels 8*j + g, j = byte
      const int64_t off = static_cast<int64_t>(kc / kStep) * a.Np + nc * 32 + 4 * g;
      const uint32_t s2w = __ldg(reinterpret_cast<const uint32_t*>(a.s2 + off));
      const uint32_t znw = __ldg(reinterpret_cast<const uint32_t*>(a.zneg + off));
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int s2 = static_cast<int>((s2w >> (8 * j)) & 0xFFu);
        const int zs2 = (256 - static_cast<int>((znw >> (8 * j)) & 0xFFu)) & 0xFF;
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[m][j] += s2 * part[m][j] - zs2 * xsum[m];
      }
    } else {
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[m][j] += part[m][j];
    }
  }

  // ---- reduce: the 4 lanes of a channel, then the warps
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      acc[m][j] += __shfl_xor_sync(0xffffffffu, acc[m][j], 1);
      acc[m][j] += __shfl_xor_sync(0xffffffffu, acc[m][j], 2);
    }
  __shared__ int32_t red[kWarps][MT][32];
  if (t == 0) {
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int j = 0; j < 4; ++j) red[warp][m][8 * j + g] = acc[m][j];
  }
  __syncthreads();
  const int tid = threadIdx.x;
  constexpr int kOut = MT * 32;  // (m, c) outputs of this CTA, one per thread
  static_assert(kOut <= kThreads || kOut % kThreads == 0, "outputs per thread");
  int32_t v[(kOut + kThreads - 1) / kThreads];
#pragma unroll
  for (int i = 0; i < (kOut + kThreads - 1) / kThreads; ++i) {
    const int o = tid + i * kThreads;
    v[i] = 0;
    if (o < kOut) {
#pragma unroll
      for (int w2 = 0; w2 < kWarps; ++w2) v[i] += red[w2][o / 32][o % 32];
    }
  }

  // ---- across splits: int32 atomics, the last CTA of the block finishes
  if (gridDim.y > 1) {
    int32_t* ws = a.workspace;  // [M][Np] partial sums, then one counter per block
    int* counter = reinterpret_cast<int*>(a.workspace + static_cast<int64_t>(a.M) * a.Np) + nc;
#pragma unroll
    for (int i = 0; i < (kOut + kThreads - 1) / kThreads; ++i) {
      const int o = tid + i * kThreads;
      if (o < kOut && o / 32 < a.M) atomicAdd(ws + static_cast<int64_t>(o / 32) * a.Np + nc * 32 + o % 32, v[i]);
    }
    __threadfence();
    __syncthreads();
    __shared__ int is_last;
    if (tid == 0) is_last = (atomicAdd(counter, 1) == static_cast<int>(gridDim.y) - 1);
    __syncthreads();
    if (!is_last) return;
    __threadfence();
#pragma unroll
    for (int i = 0; i < (kOut + kThreads - 1) / kThreads; ++i) {
      const int o = tid + i * kThreads;
      if (o < kOut && o / 32 < a.M) {
        int32_t* p = ws + static_cast<int64_t>(o / 32) * a.Np + nc * 32 + o % 32;
        v[i] = __ldcg(p);
        __stcg(p, 0);
      }
    }
    if (tid == 0) *counter = 0;
  }

  // ---- epilogue
#pragma unroll
  for (int i = 0; i < (kOut + kThreads - 1) / kThreads; ++i) {
    const int o = tid + i * kThreads;
    const int m = o / 32, n = nc * 32 + o % 32;
    if (o < kOut && m < a.M && n < a.N) epi::store1<G128, OUT>(a, m, n, v[i]);
  }
}

// ---- The same weight stream feeding mma.sync m16n8k32 (path 6, "MMV"): for M up to 32
// the dp4a loop above becomes ALU-bound, while one MMA per (16 rows, 8 channels, 32 k)
// keeps the kernel a pure weight stream.  The kernel-layout word j of lane (g, t) is
// exactly the B fragment of n8 tile j (b0 = low nibbles, b1 = high nibbles); the A
// fragment rows g and g+8 of each m16 tile are 32-bit loads of qx (natural layout, L1).
// g128: the codes become q8 = s2*(u - z) in registers (dev::dequant_g128), as in the
// tiled kernels, so the accumulator is sum_k qx*q8 directly.
template <int MT, bool G128, OutKind OUT>
__global__ void __launch_bounds__(kThreads) w4a8_mmv_kernel(const W4A8Args a, int steps_per_split) {
  const int nc = blockIdx.x;
  const int kblocks = a.K / 32;
  const int kc_begin = blockIdx.y * steps_per_split * kStep;
  const int kc_end = min(kblocks, kc_begin + steps_per_split * kStep);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;

  const uint4* wptr = reinterpret_cast<const uint4*>(a.qweight) +
                      static_cast<int64_t>(nc) * kblocks * 32 + lane;
  int32_t acc[MT][4][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;

  // (No register double buffer here, unlike the GEMV: the extra registers cost the MMV
  // more occupancy than the overlap gains -- H100 sweeps, gemm-notes.md.)
  for (int kc = kc_begin + warp * kStep; kc < kc_end; kc += kWarps * kStep) {
    uint4 w[kStep];
    load_step(w, wptr, kc, kc_end);
    uint32_t s2w = 0, znw = 0;
    if constexpr (G128) {
      const int64_t off = static_cast<int64_t>(kc / kStep) * a.Np + nc * 32 + 4 * g;
      s2w = __ldg(reinterpret_cast<const uint32_t*>(a.s2 + off));
      znw = __ldg(reinterpret_cast<const uint32_t*>(a.zneg + off));
    }
#pragma unroll
    for (int s = 0; s < kStep; ++s) {
      if (kc + s >= kc_end) break;
      const int k = (kc + s) * 32 + 4 * t;
      uint32_t af[MT][4];
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int m = 16 * i + g + 8 * h;
          uint32_t lo = 0, hi = 0;
          if (m < a.M) {
            const int8_t* xr = a.qx + static_cast<int64_t>(m) * a.K + k;
            lo = __ldg(reinterpret_cast<const uint32_t*>(xr));
            hi = __ldg(reinterpret_cast<const uint32_t*>(xr + 16));
          }
          af[i][h] = lo;      // a0 (row g) / a1 (row g+8): k = 4t..4t+3
          af[i][2 + h] = hi;  // a2 / a3: k = 16+4t..
        }
      dev::w4_word_frags<G128>(w[s], s2w, znw, [&](int j, uint32_t b0, uint32_t b1) {
#pragma unroll
        for (int i = 0; i < MT; ++i) dev::mma_s8_16832(acc[i][j], af[i], b0, b1);
      });
    }
  }

  // ---- reduce over warps: C fragment c0,c1 = C[g][2t, 2t+1], c2,c3 = C[g+8][2t, 2t+1];
  // column c of n8 tile j is output channel 8*j + c of the block.
  constexpr int kRows = 16 * MT;
  __shared__ int32_t red[kWarps][kRows][32];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) red[warp][16 * i + g + 8 * (e / 2)][8 * j + 2 * t + (e % 2)] = acc[i][j][e];
  __syncthreads();
  const int tid = threadIdx.x;
  constexpr int kOut = kRows * 32;
  constexpr int kPer = kOut / kThreads;
  static_assert(kOut % kThreads == 0, "outputs per thread");
  int32_t v[kPer];
#pragma unroll
  for (int q = 0; q < kPer; ++q) {
    const int o = tid + q * kThreads;
    v[q] = 0;
#pragma unroll
    for (int w2 = 0; w2 < kWarps; ++w2) v[q] += red[w2][o / 32][o % 32];
  }

  if (gridDim.y > 1) {
    int32_t* wsp = a.workspace;
    int* counter = reinterpret_cast<int*>(a.workspace + static_cast<int64_t>(a.M) * a.Np) + nc;
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      const int o = tid + q * kThreads;
      if (o / 32 < a.M) atomicAdd(wsp + static_cast<int64_t>(o / 32) * a.Np + nc * 32 + o % 32, v[q]);
    }
    __threadfence();
    __syncthreads();
    __shared__ int is_last;
    if (tid == 0) is_last = (atomicAdd(counter, 1) == static_cast<int>(gridDim.y) - 1);
    __syncthreads();
    if (!is_last) return;
    __threadfence();
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      const int o = tid + q * kThreads;
      if (o / 32 < a.M) {
        int32_t* p = wsp + static_cast<int64_t>(o / 32) * a.Np + nc * 32 + o % 32;
        v[q] = __ldcg(p);
        __stcg(p, 0);
      }
    }
    if (tid == 0) *counter = 0;
  }
#pragma unroll
  for (int q = 0; q < kPer; ++q) {
    const int o = tid + q * kThreads;
    const int m = o / 32, n = nc * 32 + o % 32;
    if (m < a.M && n < a.N) epi::store1<G128, OUT>(a, m, n, v[q]);
  }
}

// ---- The MMA weight stream through a per-warp cp.async ring (path 8, "MMR").  Same math as
// the MMV above; the work is the (channel block of 32*NB outputs, k-step) space, balanced
// over one wave of CTAs stream-K fashion (launch_ring), and in each block a CTA touches its
// warps take the steps round-robin.  Each warp stages its own steps -- its lanes' weight
// words, the 16*MT activation rows of the step (16-byte chunks, XOR-swizzled for ldmatrix)
// and, for g128, the step's s2/zneg bytes -- in its own RING_STAGES-deep ring in shared
// memory.  Nothing in the K loop waits for another warp: a warp waits for its own copies
// (cp.async.wait_group) and meets its lanes (__syncwarp, for ldmatrix), never the CTA.  Why:
// on H100 path 1's 16-row tiles spend their time on CTA-wide barriers (ncu at 4096 x 4096,
// M = 16: barrier stalls lead, benchmarks/results/gemm-notes.md), and the MMV, which has no
// barriers, loads one step at a time and reads its activations with 4-byte loads.
constexpr int kRingWarps = 4;
constexpr int kRingThreads = 32 * kRingWarps;
constexpr int kRingStages = 4;

template <int MT, int NB, bool G128>
struct Ring {
  static constexpr int W_BYTES = NB * kStep * 512;      // lane-ordered weight words of a step
  static constexpr int A_BYTES = MT * 16 * kStep * 32;  // 16*MT rows x 128 activations
  static constexpr int S_BYTES = G128 ? NB * 64 : 0;    // s2, then zneg: 32 bytes per block
  static constexpr int SLOT = W_BYTES + A_BYTES + S_BYTES;
  static constexpr int RING_BYTES = kRingWarps * kRingStages * SLOT;
  static constexpr int ROWS = 16 * MT, COLS = 32 * NB;  // a segment's outputs
  static constexpr int SMEM = RING_BYTES + ROWS * COLS * 4;  // + the segment's sum
  static_assert(SLOT % 16 == 0, "16-byte copies");
};

// Issue the copies of step `kc` (its first k32 block; blocks from kc_end on read as zeros)
// into `slot`: every lane its own 16-byte weight word per (block, k32), the activation rows
// as 16-byte chunks (chunk ch of row r at chunk position ch ^ (r & 7)), and the g128 bytes.
template <int MT, int NB, bool G128>
__device__ __forceinline__ void ring_load(uint8_t* slot, const W4A8Args& a, int nc0, int kc,
                                          int kc_end, int lane) {
  using R = Ring<MT, NB, G128>;
  const int kblocks = a.K / 32;
#pragma unroll
  for (int b = 0; b < NB; ++b)
#pragma unroll
    for (int s = 0; s < kStep; ++s) {
      const bool v = kc + s < kc_end;
      const uint8_t* src =
          v ? a.qweight + ((static_cast<int64_t>(nc0 + b) * kblocks + kc + s) * 32 + lane) * 16
            : a.qweight;
      dev::cp_async16(slot + ((b * kStep + s) * 32 + lane) * 16, src, v);
    }
  uint8_t* sa = slot + R::W_BYTES;
#pragma unroll
  for (int c = lane; c < R::ROWS * 8; c += 32) {
    const int r = c / 8, ch = c % 8;
    const bool v = r < a.M && kc + ch / 2 < kc_end;
    const int8_t* src = v ? a.qx + static_cast<int64_t>(r) * a.K + kc * 32 + ch * 16 : a.qx;
    dev::cp_async16(sa + r * 128 + ((ch ^ (r & 7)) * 16), src, v);
  }
  if constexpr (G128) {
    if (lane < 4 * NB) {  // lane = 4*b + 2*which + piece
      const int b = lane / 4, which = (lane / 2) & 1, piece = lane & 1;
      const uint8_t* base = which ? a.zneg : a.s2;
      const uint8_t* src =
          base + static_cast<int64_t>(kc / kStep) * a.Np + (nc0 + b) * 32 + piece * 16;
      dev::cp_async16(sa + R::A_BYTES + (which * NB + b) * 32 + piece * 16, src, true);
    }
  }
}

template <int MT, int NB, bool G128, OutKind OUT>
__global__ void __launch_bounds__(kRingThreads) w4a8_mmr_kernel(const W4A8Args a, int per) {
  using R = Ring<MT, NB, G128>;
  extern __shared__ __align__(128) uint8_t smem[];
  const int kblocks = a.K / 32;
  const int steps = (kblocks + kStep - 1) / kStep;
  const int total = (a.Np / R::COLS) * steps;  // launch_ring checks it fits
  const int beg = blockIdx.x * per;
  const int end = min(total, beg + per);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  uint8_t* ring = smem + warp * kRingStages * R::SLOT;
  int32_t* red = reinterpret_cast<int32_t*>(smem + R::RING_BYTES);
  constexpr int kOut = R::ROWS * R::COLS;
  constexpr int kPer = kOut / kRingThreads;
  static_assert(kOut % kRingThreads == 0, "outputs per thread");
#pragma unroll
  for (int q = 0; q < kPer; ++q) red[tid + q * kRingThreads] = 0;
  __syncthreads();
  // The CTA's iterations [beg, end) of the (channel block, step) space, block-major, fall
  // into segments, one per block they touch: the first starts at step beg % steps of block
  // beg / steps, the others at step 0 of the next block.  In a segment, warp w takes steps
  // w, w + kRingWarps, ...  Only the first segment divides; the cursors below step along.
  auto warp_steps = [&](int len) { return len > warp ? (len - warp + kRingWarps - 1) / kRingWarps : 0; };
  const int blk0 = beg / steps, s00 = beg - blk0 * steps;

  // The copy cursor runs ahead of the computation over the same sequence of this warp's
  // steps, across segments (the ring does not drain at a block boundary): segment start
  // l_it (block l_blk, first step l_s0), this warp's l_n steps in it, l_i issued so far.
  int l_it = beg, l_blk = blk0, l_s0 = s00, l_i = 0;
  int l_n = warp_steps(min(steps - s00, end - beg));
  auto l_norm = [&] {
    while (l_it < end && l_i >= l_n) {
      l_it += min(steps - l_s0, end - l_it);
      ++l_blk;
      l_s0 = 0;
      l_i = 0;
      l_n = warp_steps(min(steps, end - l_it));
    }
  };
  auto issue = [&](uint8_t* slot) {
    if (l_it < end) {
      const int s = l_s0 + warp + l_i * kRingWarps;
      ring_load<MT, NB, G128>(slot, a, l_blk * NB, s * kStep, kblocks, lane);
      ++l_i;
      l_norm();
    }
    dev::cp_async_commit();
  };
  l_norm();
#pragma unroll
  for (int p = 0; p < kRingStages - 1; ++p) issue(ring + p * R::SLOT);

  __shared__ int is_last;
  int f = 0;  // this warp's steps so far: step f sits in slot f % kRingStages
  int blk = blk0, s0 = s00;
  for (int it = beg; it < end; ++blk, s0 = 0) {
    const int len = min(steps - s0, end - it);
    int32_t acc[MT][NB][4][4] = {};

    const int n = warp_steps(len);
    for (int i = 0; i < n; ++i, ++f) {
      dev::cp_async_wait<kRingStages - 2>();
      __syncwarp();  // every lane's copies of step f landed; every lane is done with step f - 1
      issue(ring + ((f + kRingStages - 1) % kRingStages) * R::SLOT);
      const uint8_t* sw = ring + (f % kRingStages) * R::SLOT;
      const uint8_t* sa = sw + R::W_BYTES;
      const int kc = (s0 + warp + i * kRingWarps) * kStep;
      uint32_t s2w[NB], znw[NB];
      if constexpr (G128) {
#pragma unroll
        for (int b = 0; b < NB; ++b) {
          s2w[b] = *reinterpret_cast<const uint32_t*>(sa + R::A_BYTES + b * 32 + 4 * g);
          znw[b] = *reinterpret_cast<const uint32_t*>(sa + R::A_BYTES + (NB + b) * 32 + 4 * g);
        }
      }
#pragma unroll
      for (int s = 0; s < kStep; ++s) {
        if (kc + s >= kblocks) break;
        uint32_t af[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const int row = mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
          const int ch = 2 * s + (lane >> 4);
          dev::ldmatrix_x4(af[mt], sa + row * 128 + ((ch ^ (row & 7)) * 16));
        }
#pragma unroll
        for (int b = 0; b < NB; ++b) {
          const uint4 w = *reinterpret_cast<const uint4*>(sw + ((b * kStep + s) * 32 + lane) * 16);
          dev::w4_word_frags<G128>(w, G128 ? s2w[b] : 0u, G128 ? znw[b] : 0u, [&](int j, uint32_t b0, uint32_t b1) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) dev::mma_s8_16832(acc[mt][b][j], af[mt], b0, b1);
          });
        }
      }
    }

    // ---- the segment's sum over warps in one shared tile, by shared-memory atomics (the
    // rings stay busy with the next segment's copies; a tile per warp would cost 16 KB at
    // MT = 2: one CTA per SM fewer), read back and zeroed for the next segment.  C fragment
    // c0,c1 = C[g][2t, 2t+1], c2,c3 = C[g+8][2t, 2t+1]; column 8*j + c of block b is output
    // channel 32*(blk*NB + b) + 8*j + c.
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int b = 0; b < NB; ++b)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            atomicAdd(red + (16 * i + g + 8 * (e / 2)) * R::COLS + 32 * b + 8 * j + 2 * t + (e % 2), acc[i][b][j][e]);
    __syncthreads();
    int32_t v[kPer];
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      const int o = tid + q * kRingThreads;
      v[q] = red[o];
      red[o] = 0;
    }
    __syncthreads();  // red is free (and zero) for the next segment

    // ---- a block split over CTAs: exact int32 atomics into the [M, Np] workspace; the
    // block's last part reads the sums back, zeroes them and the block's counter (the
    // workspace stays clean: CUDA-graph safe) and writes the outputs.
    const int col0 = blk * R::COLS;
    bool mine = true;
    if (len < steps) {
      const int first = blk * steps / per, last = ((blk + 1) * steps - 1) / per;
      int32_t* wsp = a.workspace;
      int* counter = reinterpret_cast<int*>(a.workspace + static_cast<int64_t>(a.M) * a.Np) + blk;
#pragma unroll
      for (int q = 0; q < kPer; ++q) {
        const int o = tid + q * kRingThreads;
        if (o / R::COLS < a.M) atomicAdd(wsp + static_cast<int64_t>(o / R::COLS) * a.Np + col0 + o % R::COLS, v[q]);
      }
      __threadfence();
      __syncthreads();
      if (tid == 0) is_last = (atomicAdd(counter, 1) == last - first);
      __syncthreads();
      mine = is_last;
      if (mine) {
        __threadfence();
#pragma unroll
        for (int q = 0; q < kPer; ++q) {
          const int o = tid + q * kRingThreads;
          if (o / R::COLS < a.M) {
            int32_t* p = wsp + static_cast<int64_t>(o / R::COLS) * a.Np + col0 + o % R::COLS;
            v[q] = __ldcg(p);
            __stcg(p, 0);
          }
        }
        if (tid == 0) *counter = 0;
      }
    }
    if (mine) {
#pragma unroll
      for (int q = 0; q < kPer; ++q) {
        const int o = tid + q * kRingThreads;
        const int m = o / R::COLS, nn = col0 + o % R::COLS;
        if (m < a.M && nn < a.N) epi::store1<G128, OUT>(a, m, nn, v[q]);
      }
    }
    it += len;
  }
  dev::cp_async_wait<0>();
}

// Split policy (VLLM_QOQ_MMR_SPLIT, read once).  2, the default: one CTA per block, split
// along K (into a divisor of the steps) only where the blocks alone leave CTA slots idle.
// A/B knobs, slower on the H100 (benchmarks/results/gemm-notes.md): 0 = stream-K, the
// (block, step) iterations balanced over one wave of CTAs, at least one step per warp;
// 1 = the same with the share rounded up to a divisor or a multiple of the steps.
template <int MT, int NB, bool G128, OutKind OUT>
void launch_ring(const W4A8Args& a, cudaStream_t stream) {
  using R = Ring<MT, NB, G128>;
  auto kern = w4a8_mmr_kernel<MT, NB, G128, OUT>;
  static unsigned long long setup_done = 0;  // per instantiation, one bit per device
  static int per_sm = 1;
  const unsigned long long bit = current_device_bit();
  if (!(setup_done & bit)) {
    QOQ_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, R::SMEM));
    int n = 0;
    QOQ_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kern, kRingThreads, R::SMEM));
    per_sm = std::max(1, n);
    setup_done |= bit;
  }
  static const int policy = [] {
    const char* e = std::getenv("VLLM_QOQ_MMR_SPLIT");
    return e != nullptr ? std::max(0, std::min(2, std::atoi(e))) : 2;
  }();
  const int blocks = a.Np / R::COLS;
  const int kblocks = a.K / 32;
  const int64_t steps = (kblocks + kStep - 1) / kStep;
  const int64_t total = blocks * steps;
  const int64_t slots = static_cast<int64_t>(per_sm) * a.num_sms;
  int64_t per = steps;
  if (policy == 2) {
    const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(slots / blocks, steps / kRingWarps));
    per = (steps + splits - 1) / splits;
    while (steps % per) ++per;
  } else {
    per = std::max<int64_t>((total + slots - 1) / slots, std::min<int64_t>(steps, kRingWarps));
    if (policy == 1) {  // a divisor or a multiple of the steps: no CTA splits a block unevenly
      if (per < steps) {
        while (steps % per) ++per;
      } else {
        per = (per + steps - 1) / steps * steps;
      }
    }
  }
  const int64_t need = static_cast<int64_t>(a.M) * a.Np + blocks;
  if (a.workspace == nullptr || need > a.workspace_ints) per = std::max(per, steps) / steps * steps;
  if (total + per > INT32_MAX)  // the kernel counts iterations in int32
    throw std::runtime_error("qoq ring MMV: N/32 x K/128 = " + std::to_string(total) + " iterations exceed int32");
  const int64_t grid = (total + per - 1) / per;
  kern<<<static_cast<unsigned>(grid), kRingThreads, R::SMEM, stream>>>(a, static_cast<int>(per));
  QOQ_CUDA_CHECK(cudaGetLastError());
}

template <int MT, bool G128, OutKind OUT, bool MMA>
void launch(const W4A8Args& a, cudaStream_t stream) {
  const int blocks = a.Np / 32;
  const int kblocks = a.K / 32;
  const int steps = (kblocks + kStep - 1) / kStep;
  // Enough CTAs to cover the SMs a few times over (every lane keeps 4 x 16 bytes in
  // flight, so ~4 resident CTAs per SM saturate HBM), but at least one step per warp.
  const int target = 4 * a.num_sms;
  int splits = std::max(1, std::min((target + blocks - 1) / blocks, steps / kWarps));
  const int64_t need = static_cast<int64_t>(a.M) * a.Np + blocks;
  if (a.workspace == nullptr || need > a.workspace_ints) splits = 1;
  const int per = (steps + splits - 1) / splits;
  splits = (steps + per - 1) / per;
  dim3 grid(blocks, splits);
  if constexpr (MMA) {
    w4a8_mmv_kernel<MT, G128, OUT><<<grid, kThreads, 0, stream>>>(a, per);
  } else {
    w4a8_gemv_kernel<MT, G128, OUT><<<grid, kThreads, 0, stream>>>(a, per);
  }
  QOQ_CUDA_CHECK(cudaGetLastError());
}

// kind: 0 = the dp4a GEMV (M <= 16), 1 = the MMV (M <= 32), 2 = the ring MMV (M <= 32; 32
// channels per block, 64 with VLLM_QOQ_MMR_BLOCKS=2 where Np allows: an A/B knob).
template <bool G128, OutKind OUT>
void dispatch(const W4A8Args& a, int kind, cudaStream_t stream) {
  if (kind == 2) {
    static const int nb = [] {
      const char* e = std::getenv("VLLM_QOQ_MMR_BLOCKS");
      return (e != nullptr && std::atoi(e) == 2) ? 2 : 1;
    }();
    const bool two = nb == 2 && a.Np % 64 == 0;
    if (a.M <= 16) {
      two ? launch_ring<1, 2, G128, OUT>(a, stream) : launch_ring<1, 1, G128, OUT>(a, stream);
    } else {
      two ? launch_ring<2, 2, G128, OUT>(a, stream) : launch_ring<2, 1, G128, OUT>(a, stream);
    }
  } else if (kind == 1) {
    if (a.M <= 16) {
      launch<1, G128, OUT, true>(a, stream);
    } else {
      launch<2, G128, OUT, true>(a, stream);
    }
  } else if (a.M <= 1) {
    launch<1, G128, OUT, false>(a, stream);
  } else if (a.M <= 2) {
    launch<2, G128, OUT, false>(a, stream);
  } else if (a.M <= 4) {
    launch<4, G128, OUT, false>(a, stream);
  } else if (a.M <= 8) {
    launch<8, G128, OUT, false>(a, stream);
  } else {
    launch<16, G128, OUT, false>(a, stream);
  }
}

template <bool G128>
void run(const W4A8Args& a, OutKind out, int kind, cudaStream_t stream) {
  switch (out) {
    case OutKind::F16: dispatch<G128, OutKind::F16>(a, kind, stream); break;
    case OutKind::BF16: dispatch<G128, OutKind::BF16>(a, kind, stream); break;
    case OutKind::I32: dispatch<G128, OutKind::I32>(a, kind, stream); break;
  }
}

// How many 32-channel blocks one wave of path 8's CTAs for this M covers (resident CTAs per
// SM x SMs): choose_path's default takes path 8 only where Np / 32 fits.
template <int MT, bool G128>
int mmr_wave_blocks(int num_sms) {
  using R = Ring<MT, 1, G128>;
  auto kern = w4a8_mmr_kernel<MT, 1, G128, OutKind::BF16>;
  QOQ_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, R::SMEM));
  int n = 0;
  QOQ_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kern, kRingThreads, R::SMEM));
  return std::max(1, n) * num_sms;
}

}  // namespace gemv

int w4a8_mmr_wave_blocks(bool g128, int M, int num_sms) {
  if (M <= 16) return g128 ? gemv::mmr_wave_blocks<1, true>(num_sms) : gemv::mmr_wave_blocks<1, false>(num_sms);
  return g128 ? gemv::mmr_wave_blocks<2, true>(num_sms) : gemv::mmr_wave_blocks<2, false>(num_sms);
}

void w4a8_gemv_chn(const W4A8Args& a, OutKind out, int kind, cudaStream_t stream) {
  gemv::run<false>(a, out, kind, stream);
}

void w4a8_gemv_g128(const W4A8Args& a, OutKind out, int kind, cudaStream_t stream) {
  gemv::run<true>(a, out, kind, stream);
}

}  // namespace qoq
