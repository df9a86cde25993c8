// Small device helpers shared by the vllm_qoq kernels (no torch headers here,
// so the kernel translation units compile fast).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "common/launch.h"

namespace qoq {

namespace dev {

// ---- cp.async (sm_80+): 16-byte global -> shared copies; src_bytes = 0 zero-fills.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)),
               "l"(gmem), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ---- ldmatrix: four 8x8 b16 matrices (= 8 rows x 16 bytes of int8 each).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

// ---- mma.sync m16n8k32 s8 x s8 -> s32 (Ampere+).  Fragments (PTX ISA, "Matrix
// fragments for mma.m16n8k32"), g = lane / 4, t = lane % 4:
//   A (16x32, row): a0 = A[g][4t..4t+3], a1 = A[g+8][4t..], a2 = A[g][16+4t..], a3 = A[g+8][16+4t..]
//   B (32x8, col):  b0 = B[4t..4t+3][g], b1 = B[16+4t..16+4t+3][g]
//   C (16x8):       c0,c1 = C[g][2t, 2t+1], c2,c3 = C[g+8][2t, 2t+1]
__device__ __forceinline__ void mma_s8_16832(int32_t (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---- QoQ weight dequantization in registers (qoq.md §1).
// A packed word holds 8 nibbles: byte i = u_lo(i) | u_hi(i) << 4.  The low nibbles
// form one 4 x int8 MMA operand, the high nibbles the other.
__device__ __forceinline__ uint32_t lo_nibbles(uint32_t w) { return w & 0x0F0F0F0Fu; }
__device__ __forceinline__ uint32_t hi_nibbles(uint32_t w) { return (w >> 4) & 0x0F0F0F0Fu; }

// g128 "subtraction after multiplication" (qoq.md §1): q8 = s2*(u - z) for 4 bytes u
// (0..15) with ONE 32-bit multiply-add and one XOR.  Per byte j the offset-binary value
// v_j = s2*u_j + (128 - z*s2) = q8_j + 128 lies in [0, 255] (q8 in [-128, 127] by the
// format), so over the integers  sum_j v_j 256^j = s2 * (sum_j u_j 256^j) + (128 - z*s2) *
// 0x01010101  exactly: the 32-bit IMAD below yields the four v_j with no carry between
// bytes (whatever the sign of 128 - z*s2), and XOR 0x80 per byte turns offset binary into
// two's complement.  zc = g128_zc(zneg) is per (row, group): hoisted out of the K loop.
// (Was u*s2 followed by __vadd4 with the pre-negated zero: sm_90 has no SIMD video add,
// nvcc emulates it with 5 integer ops, so that was 6 ops per word, now 2.)
__device__ __forceinline__ uint32_t dequant_g128(uint32_t u4, uint32_t s2, uint32_t zc) {
  return (u4 * s2 + zc) ^ 0x80808080u;
}

// The dequant_g128 addend (128 - z*s2) * 0x01010101 (mod 2^32) of a row, from the low byte
// of zneg = (-z*s2) mod 256 as the kernel layout stores it: z*s2 <= 15*16 = 240 < 256, so
// z*s2 = (-zneg) mod 256.
__device__ __forceinline__ uint32_t g128_zc(uint32_t zneg) {
  return 0x80808080u - ((0u - zneg) & 0xFFu) * 0x01010101u;
}

// The mma.sync B fragments of one 16-byte kernel-layout weight word: for j = 0..3, word j's
// low / high nibbles are the b0 / b1 registers of the j-th 8-column k32 fragment (g128: the
// codes dequantized to int8 with byte j of the row's s2 and zneg words).  f(j, b0, b1) then
// issues the mma(s).  Shared by the mma.sync paths (1, 6, 8).
template <bool G128, class F>
__device__ __forceinline__ void w4_word_frags(const uint4& w, uint32_t s2word, uint32_t znword, F&& f) {
  const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint32_t b0 = lo_nibbles(ws[j]), b1 = hi_nibbles(ws[j]);
    if constexpr (G128) {
      const uint32_t s2 = (s2word >> (8 * j)) & 0xFFu;
      const uint32_t zc = g128_zc(znword >> (8 * j));
      b0 = dequant_g128(b0, s2, zc);
      b1 = dequant_g128(b1, s2, zc);
    }
    f(j, b0, b1);
  }
}

// ---- Split-K through workspace slices (GEMM paths 1 and 3).  Each of a tile's `parts` CTAs
// stores its int32 partial, in register order, into its own slice of the workspace
// (thread-interleaved 16-byte stores: a thread's v-th int4 at slice(p) + v * STRIDE, coalesced),
// then takes a ticket; the tile's last part adds the other slices into its registers and zeroes
// every slice of the tile and the counter (the workspace is all zeros between calls).  Exact
// int32, any order.  slice(p): this thread's first int4 of part p's slice; acc4(v): this
// thread's v-th group of 4 accumulators; active: this thread holds a share of the partial;
// bar(): a barrier over every thread that gets here; leader: one of them; is_last: a shared
// int.  Returns true in the tile's last part only, whose registers then hold the sum.
// (Was: int32 atomics of every element; H100, 1.4-1.6x slower at M = 64-256 on the split
// 8B/70B shapes, benchmarks/results/gemm-notes.md, 2026-11-22.)
template <int NV, int STRIDE, class Slice, class Acc4, class Bar>
__device__ __forceinline__ bool splitk_slices(Slice slice, int part, int parts, int* counter,
                                              bool active, Acc4 acc4, Bar bar, bool leader,
                                              int& is_last) {
  if (active) {
    int4* mine = slice(part);
#pragma unroll
    for (int v = 0; v < NV; ++v) {
      const int32_t* x = acc4(v);
      __stcg(mine + v * STRIDE, make_int4(x[0], x[1], x[2], x[3]));
    }
  }
  __threadfence();
  bar();
  if (leader) is_last = (atomicAdd(counter, 1) == parts - 1);
  bar();
  if (!is_last) return false;
  __threadfence();
  if (active) {
    const int4 zero = make_int4(0, 0, 0, 0);
    for (int p = 0; p < parts; ++p) {
      int4* other = slice(p);
      if (p != part) {
#pragma unroll
        for (int v = 0; v < NV; ++v) {
          const int4 y = __ldcg(other + v * STRIDE);
          int32_t* x = acc4(v);
          x[0] += y.x;
          x[1] += y.y;
          x[2] += y.z;
          x[3] += y.w;
        }
      }
#pragma unroll
      for (int v = 0; v < NV; ++v) __stcg(other + v * STRIDE, zero);
    }
  }
  if (leader) *counter = 0;
  return true;
}

}  // namespace dev
}  // namespace qoq
