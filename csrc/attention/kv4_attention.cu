// Paged attention over the KV4 cache: decode (split-KV), prefill, chunked prefill and
// prefix-cached prefill in one kernel.  Spec: vllm_qoq/reference/kv4.py:kv4_attention.
//
// Work decomposition
//   For sequence b and KV head h the "rows" are the (query token, query head) pairs of
//   the G = Hq/Hkv heads sharing h: row r = token (r / G), head h*G + r % G.  Rows are
//   cut into tiles of 16 (the M of mma.m16n8k16), so GQA heads share every K/V load.
//   grid = (num_splits, Hkv * row_tiles, B); a CTA owns one row tile and one split of
//   the keys; its 4 warps take the 16-key tiles of the split round-robin, each keeping
//   an online softmax, and merge through shared memory at the end.  Each warp streams
//   its tiles through a 5-stage cp.async ring in shared memory and consumes them two at
//   a time (one softmax update per 32 keys) while 3 more are in flight (no registers
//   held by loads); block-table entries are read one iteration ahead.  Decode rows (at
//   most 8: G <= 8, one token) accumulate O^T = V^T P^T (see acc).  With
//   num_splits > 1 (long decode contexts, few rows) CTAs write (o, lse) partials that
//   kv4_combine_kernel merges.  The launch shape depends on host values only
//   (B, max_query_len, num_splits): CUDA-graph safe; lengths come from device memory.
//
// Dequantization without dequantizing.  With x = c*s + m (m = -zero*s) per token:
//   q.k_t  = s_t * (q . c_t) + m_t * sum(q)
//   sum_t p_t v_t = sum_t (p_t s_t) c_t + sum_t p_t m_t
// so the tensor cores multiply raw 4-bit codes and scales enter once per token in
// fp32, never per element.
//
// Biased codes.  A code becomes an fp16/bf16 operand with one LOP3 per two codes,
// (w & mask) | magic, which ORs the nibble into the mantissa of the magic number M
// (fp16 1024.0, bf16 128.0; both have ulp 1 there).  Nothing subtracts M per element:
// the operands stay biased and the bias leaves in fp32 once per row or tile.
//   fp16: every code is taken at bits 4-7 (mask 0x00F000F0; nibbles shifted there by
//     w << 4, w, w >> 4, w >> 8), i.e. as 1024 + 16c (exact: 16*15 < 1024), against a
//     partner pre-divided by 16.  The 16 is for precision, not speed: the bias is then
//     64x, not 1024x, the q.c (or P'c) it rides on, and fp32 sums keep 16x more of it.
//   bf16: bits 4-7 of a bf16 reach the exponent; codes are shifted to bits 0-3 (w, w >>
//     4, w >> 8, w >> 12) and are 128 + c.
//   Either way 3 SHF + 4 LOP3 per 32-bit word of 8 codes (+ 1 PRMT per word for V); it
//   was 3 SHF + 8 LOP3 (nvcc split the AND and the OR) + 4 HSUB2 when every pair of
//   codes was unbiased on the spot.  (Mixing 1024 + c for the low nibbles and 1024 +
//   16c for the high ones would save 2 SHF per word, but tests/test_kv4_bias_fold.py
//   emulates ~80x the score error for a query with a common offset, and for V with
//   codes crowded at one end (an outlier channel) more than the fp16 output tolerance
//   under a truncating accumulator, against 0.1 of it for 1024 + 16c.)
// K (B = K^T).  Q' = fp16(q/16) (exact: a power of two; subnormal below 2^-10, and
//   then B_q below uses the same rounded values), bf16 Q' = q.  With u = 16 / 1:
//     acc = sum_d Q'_d (M + u c_d) = q.c + B_q,   B_q = M * sum_d Q'_d,
//   B_q per row from the packed Q' fragments converted back to fp32, once per CTA; it
//   is the initial value of one S accumulator chain, so S comes out as q.c directly.
// V (B = V, A = P' = fp16/bf16(p * s_v)).
//     acc_i = sum_t P'_t (M + u c_t),   sum_t P'_t c_t = (acc_i - PS) / u,
//   PS = M * sum_t P'_t comes from one more mma per tile, P' times a B of all M: the
//   tensor core sums exactly the rounded P' it multiplied (an fp32 sum of the
//   unrounded p * s_v would be off by M x their rounding: far too much), already
//   reduced over the quad and in the accumulator layout.  The online softmax rescales
//   acc and PS alike; the rescale branch folds PS into acc ((acc - PS) * al, PS = 0),
//   and is forced every kFoldTiles tiles so that acc never carries more than a few
//   tiles of bias: the tensor core's fp32 accumulation truncates (not IEEE), with an
//   error that grows with the accumulator, which the bias inflates (8192 keys without
//   the fold: ~17x the error, emulated).  After the key loop: acc_i = (acc_i - PS) / u.

// Register fragments (PTX mma.m16n8k16, g = lane/4, c = lane%4):
//   A (16x16): {A[g][2c..2c+1]}, {A[g+8][2c..]}, {A[g][2c+8..2c+9]}, {A[g+8][2c+8..]}
//   B (16x8):  {B[2c..2c+1][g]}, {B[2c+8..2c+9][g]};  C: {C[g][2c..2c+1]}, {C[g+8][2c..]}
// S = Q K^T: A = Q rows, B = K^T (k = head dim, n = 8 keys).  A dot product does not
//   care in which order the head dims are summed, so the k index is a permutation of
//   the dims chosen to make the B fragment cheap: thread c reads 16 B (D=128) of codes
//   of key g (and key 8+g), dims [c*D/4, (c+1)*D/4); in k-step j it uses word j/2 of
//   that segment, nibbles (e0,e4 | e1,e5) for even j and (e2,e6 | e3,e7) for odd j
//   (each pair = one LOP3 on the shifted word, see above).  Q' is loaded in the same
//   permuted order once per CTA.
// O = P V: A = P, which is exactly the S accumulators of two key n-tiles (the FA2
//   register reuse); B = V (k = 16 keys, n = 8 dims).  B pairs two keys per register,
//   so the thread reads V codes of keys (2c, 2c+1) and (2c+8, 2c+9), bytes
//   [g*D/16, (g+1)*D/16) (dims [g*D/8, (g+1)*D/8)), and a PRMT interleaves the two
//   keys' bytes before the LOP3s.  n-tile i's column n is dim n*D/8 + i, so the
//   thread's outputs (cols 2c, 2c+1) are dims 2c*D/8 + i and (2c+1)*D/8 + i.
// Keys beyond a row's causal end (and the rest of a partially filled page, whose
// bytes may be stale) are masked with selects, so NaN scales there never leak: their
// P' is 0, so their (finite, biased) codes add nothing to acc or PS.  Only tiles that
// reach the row tile's first causal end (kv_lo) are masked; the tiles below it (for
// decode, all but the sequence's last) take the score function without the selects.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention/kv4.h"
#include "common/device.cuh"
#include "common/launch.h"

namespace qoq {
namespace kv4 {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
// CTAs per SM the register budget aims at (3 x 4 warps; D=64 fits 4)
#ifndef QOQ_KV4_MIN_BLOCKS_128
#define QOQ_KV4_MIN_BLOCKS_128 3
#endif
#ifndef QOQ_KV4_MIN_BLOCKS_64
#define QOQ_KV4_MIN_BLOCKS_64 4
#endif
template <int D>
constexpr int min_blocks() { return D == 64 ? QOQ_KV4_MIN_BLOCKS_64 : QOQ_KV4_MIN_BLOCKS_128; }
// A denser head_dim-128 build (4 CTAs per SM: 128 registers, a few bytes spilled, ~5% slower
// per CTA), launched only where it turns 1-2 partial waves into one: unsplit launches of
// 3 x SMs < CTAs <= 4 x SMs (batch 64 x 8 KV heads on 132 SMs: 512 CTAs, 1.3 waves of 396
// slots at 3 per SM, one of 528 at 4).  H100 A/B, each build in its own process
// (benchmarks/results/attention-h100-decode-dense*.json, docs/kv4.md): batch 64 x 1k 1.09x,
// 64 x 4k 1.10x faster; forced onto every unsplit launch (VLLM_QOQ_KV4_DENSE=on) it is
// 0.95-1.05x elsewhere, so only this rule turns it on.
constexpr int kDenseBlocks128 = 4;
// 1: mask every tile, as before the unmasked fast path (an A/B switch: -DQOQ_KV4_MASK_EVERY_TILE=1)
#ifndef QOQ_KV4_MASK_EVERY_TILE
#define QOQ_KV4_MASK_EVERY_TILE 0
#endif
constexpr bool kMaskEveryTile = QOQ_KV4_MASK_EVERY_TILE != 0;
constexpr float kLog2e = 1.4426950408889634f;
// the V bias is folded into the accumulators at least every kFoldTiles tiles of a warp
constexpr int kFoldTiles = 8;
static_assert((kFoldTiles & (kFoldTiles - 1)) == 0 && kFoldTiles >= 2, "the key loop folds on tile pairs");

// ---- element-type traits ------------------------------------------------------------
// (w & MASK) | MAGIC: two codes as biased 16-bit operands (see the header comment).  One
// lop3 (LUT 0xEA = a & b | c); written as C++, the compiler emits an AND and an OR.
template <uint32_t MASK, uint32_t MAGIC>
__device__ __forceinline__ uint32_t lop_or(uint32_t w) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(w), "n"(MASK), "n"(MAGIC));
  return r;
}

template <typename T>
struct Traits;

template <>
struct Traits<half> {
  static constexpr uint32_t kMagic = 0x64006400u;  // half2(1024, 1024)
  static constexpr float kBias = 1024.f;           // M
  static constexpr float kQScale = 0.0625f;        // Q' = q / 16 against 1024 + 16c
  static constexpr float kVScale = 0.0625f;        // sum P'c = (acc - PS) / 16
  // word -> B registers of nibble pairs {(e0,e4), (e1,e5), (e2,e6), (e3,e7)} (a PRMT'd
  // V word: {e0, e1, e2, e3} of its two keys), each code as 1024 + 16c
  __device__ static __forceinline__ void codes(uint32_t w, uint32_t (&b)[4]) {
    b[0] = lop_or<0x00F000F0u, kMagic>(w << 4);
    b[1] = lop_or<0x00F000F0u, kMagic>(w);
    b[2] = lop_or<0x00F000F0u, kMagic>(w >> 4);
    b[3] = lop_or<0x00F000F0u, kMagic>(w >> 8);
  }
  __device__ static __forceinline__ uint32_t pack(float lo, float hi) {
    half2 r = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static __forceinline__ float sum2(uint32_t x) {  // lo + hi of a packed pair
    const float2 f = __half22float2(*reinterpret_cast<half2*>(&x));
    return f.x + f.y;
  }
  __device__ static __forceinline__ float to_f32(half x) { return __half2float(x); }
  __device__ static __forceinline__ half from_f32(float x) { return __float2half_rn(x); }
  __device__ static __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Traits<__nv_bfloat16> {
  static constexpr uint32_t kMagic = 0x43004300u;  // bfloat162(128, 128)
  static constexpr float kBias = 128.f;
  static constexpr float kQScale = 1.f;
  static constexpr float kVScale = 1.f;
  // as Traits<half>::codes, every nibble shifted to bits 0-3: 128 + c
  __device__ static __forceinline__ void codes(uint32_t w, uint32_t (&b)[4]) {
    b[0] = lop_or<0x000F000Fu, kMagic>(w);
    b[1] = lop_or<0x000F000Fu, kMagic>(w >> 4);
    b[2] = lop_or<0x000F000Fu, kMagic>(w >> 8);
    b[3] = lop_or<0x000F000Fu, kMagic>(w >> 12);
  }
  __device__ static __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 r = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&r);
  }
  __device__ static __forceinline__ float sum2(uint32_t x) {
    const float2 f = __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&x));
    return f.x + f.y;
  }
  __device__ static __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __forceinline__ __nv_bfloat16 from_f32(float x) { return __float2bfloat16_rn(x); }
  __device__ static __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}

// ---- cp.async staging.  A warp streams its 16-key tiles through a ring of kStages
// shared-memory stages (loads in flight without registers); stage layout:
//   [K codes 16 x D/2][V codes 16 x D/2][K (scale, zero) 16 x 4][V (scale, zero) 16 x 4]
// The key loop consumes two tiles per iteration while kAhead more are in flight.
// Stages per warp (kAhead = stages - 2 in flight), per head_dim; -DQOQ_KV4_STAGES_64=N /
// _128=N override them for A/B builds (benchmarks/device/build_kv4_lib.py).
#ifndef QOQ_KV4_STAGES_64
#define QOQ_KV4_STAGES_64 5
#endif
#ifndef QOQ_KV4_STAGES_128
#define QOQ_KV4_STAGES_128 5
#endif
template <int D>
constexpr int stages() { return D == 64 ? QOQ_KV4_STAGES_64 : QOQ_KV4_STAGES_128; }
template <int D>
constexpr int stage_bytes() { return 32 * (D / 2) + 128; }
// the kernel's dynamic shared memory: the cp.async ring during the key loop, the merge
// buffers after it (same bytes): each warp's O fragments (D/8 x 32 float4), then the 16
// merged rows (D + 1 floats each)
template <int D>
constexpr int frag_bytes() { return kWarps * (D / 8) * 32 * 16; }
template <int D>
constexpr int smem_bytes() {
  constexpr int ring = kWarps * stages<D>() * stage_bytes<D>();
  constexpr int merge = frag_bytes<D>() + 16 * (D + 1) * 4;
  return ring > merge ? ring : merge;
}

// 16 bytes global -> shared; the constant offsets ride in the instruction's immediates
template <int SOFF, int GOFF>
__device__ __forceinline__ void cp_async16(uint32_t smem, const uint8_t* gmem) {
  asm volatile("cp.async.cg.shared.global [%0+%2], [%1+%3], 16;\n" ::"r"(smem), "l"(gmem), "n"(SOFF),
               "n"(GOFF));
}

// Copy one tile into a stage.  st: the stage's shared address + 16 * lane; kc / vc: the
// tile's first K / V code byte + 16 * lane (a side's 16 keys are D/2 16-byte chunks, lane
// takes chunks lane and lane + 32); sz: this lane's 16 bytes of (scale, zero) pairs
// (lanes 0-3 K, 4-7 V: the stage's last 128 bytes in lane order).
template <int D>
__device__ __forceinline__ void stage_tile(uint32_t st, const uint8_t* kc, const uint8_t* vc,
                                           const uint8_t* sz, int lane) {
  constexpr int CB = D / 2;
  static_assert(CB == 32 || CB == 64, "one or two chunks per lane and side");
  cp_async16<0, 0>(st, kc);
  cp_async16<16 * CB, 0>(st, vc);
  if constexpr (CB == 64) {
    cp_async16<512, 512>(st, kc);
    cp_async16<16 * CB + 512, 512>(st, vc);
  }
  if (lane < 8) cp_async16<32 * CB, 0>(st, sz);
}

template <int BYTES>
__device__ __forceinline__ void lds_words(uint32_t* dst, const uint8_t* src) {
  if constexpr (BYTES == 16) {
    const uint4 v = *reinterpret_cast<const uint4*>(src);
    dst[0] = v.x; dst[1] = v.y; dst[2] = v.z; dst[3] = v.w;
  } else if constexpr (BYTES == 8) {
    const uint2 v = *reinterpret_cast<const uint2*>(src);
    dst[0] = v.x; dst[1] = v.y;
  } else {
    static_assert(BYTES == 4, "unsupported vector width");
    dst[0] = *reinterpret_cast<const uint32_t*>(src);
  }
}

__device__ __forceinline__ float2 scale_min(uint32_t sz) {  // (scale, zero) -> (s, -zero*s)
  const float2 f = __half22float2(*reinterpret_cast<half2*>(&sz));
  return make_float2(f.x, -f.y * f.x);
}

// R2: the row tile may use rows g+8 (more than 8 rows: G > 8 or several query tokens);
// decode with G <= 8 skips their softmax work (their Q and P fragments stay zero) and
// accumulates O transposed (see acc below).
template <typename T, int D, bool R2, int MINB>
__global__ void __launch_bounds__(kThreads, MINB) kv4_attention_kernel(AttnArgs a) {
  using Tr = Traits<T>;
  constexpr int KSTEPS = D / 16;
  constexpr int NT = D / 8;  // output n-tiles
  constexpr int KW = D / 32;

  constexpr int kStages = stages<D>();
  constexpr int kAhead = kStages - 2;
  static_assert(kAhead >= 1, "at least 3 stages");
  // merge buffers: each warp's O fragments (lane-major float4: conflict-free), per-warp
  // row stats, and the merged, normalized rows (padded against bank conflicts);
  // smem_raw (dynamic, smem_bytes<D>()) holds the cp.async ring during the key loop and
  // the merge buffers after it
  extern __shared__ __align__(16) uint8_t smem_raw[];
  auto frag_s = reinterpret_cast<float4 (*)[NT][32]>(smem_raw);
  auto o_s = reinterpret_cast<float (*)[D + 1]>(smem_raw + frag_bytes<D>());
  __shared__ float m_s[kWarps][16], lw_s[kWarps][16], mvw_s[kWarps][16];
  __shared__ float l_s[16], mx_s[16], mvs_s[16];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4;
  const int b = blockIdx.z;
  const int G = a.num_q_heads / a.num_kv_heads;
  const int row_tiles = (a.max_query_len * G + 15) / 16;
  const int kvh = blockIdx.y / row_tiles, rt = blockIdx.y % row_tiles;
  const int q0 = a.query_start_loc[b];
  const int qlen = a.query_start_loc[b + 1] - q0;
  const int rows = qlen * G;
  if (rt * 16 >= rows) return;
  const int ctx = a.seq_lens[b];
  const int first_pos = ctx - qlen;  // position of query token 0

  // ---- this thread's two rows: Q fragments (permuted dims), sum(q), causal end
  const int r0 = rt * 16 + g, r1 = r0 + 8;
  const bool ok0 = r0 < rows, ok1 = r1 < rows;
  const int end0 = ok0 ? first_pos + r0 / G + 1 : 0;  // keys [0, end) visible
  const int end1 = ok1 ? first_pos + r1 / G + 1 : 0;
  uint32_t qa[KSTEPS][4];          // Q' = q * kQScale (see the header comment)
  float qsum0 = 0.f, qsum1 = 0.f;  // sum(q)
  float bq0 = 0.f, bq1 = 0.f;      // sum(Q'), then B_q = M * sum(Q')
  {
    const T* qp0 = static_cast<const T*>(a.q) + (int64_t)(q0 + r0 / G) * a.q_stride_t +
                   (int64_t)(kvh * G + r0 % G) * a.q_stride_h;
    const T* qp1 = static_cast<const T*>(a.q) + (int64_t)(q0 + r1 / G) * a.q_stride_t +
                   (int64_t)(kvh * G + r1 % G) * a.q_stride_h;
#pragma unroll
    for (int wi = 0; wi < KW; ++wi) {
      const int base = c * (D / 4) + 8 * wi;
      float x0[8], x1[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        x0[e] = ok0 ? Tr::to_f32(qp0[base + e]) : 0.f;
        x1[e] = ok1 ? Tr::to_f32(qp1[base + e]) : 0.f;
        qsum0 += x0[e];
        qsum1 += x1[e];
      }
#pragma unroll
      for (int half_ = 0; half_ < 2; ++half_) {  // k-step 2*wi + half_, nibbles p = 0 or 2
        const int p = 2 * half_;
        constexpr float k = Tr::kQScale;
        uint32_t* f = qa[2 * wi + half_];
        f[0] = Tr::pack(x0[p] * k, x0[p + 4] * k);
        f[1] = Tr::pack(x1[p] * k, x1[p + 4] * k);
        f[2] = Tr::pack(x0[p + 1] * k, x0[p + 5] * k);
        f[3] = Tr::pack(x1[p + 1] * k, x1[p + 5] * k);
        // B_q from the rounded operands the mma multiplies, so that it cancels there
        bq0 += Tr::sum2(f[0]) + Tr::sum2(f[2]);
        bq1 += Tr::sum2(f[1]) + Tr::sum2(f[3]);
      }
    }
    qsum0 += __shfl_xor_sync(0xffffffffu, qsum0, 1);
    qsum0 += __shfl_xor_sync(0xffffffffu, qsum0, 2);
    qsum1 += __shfl_xor_sync(0xffffffffu, qsum1, 1);
    qsum1 += __shfl_xor_sync(0xffffffffu, qsum1, 2);
    bq0 += __shfl_xor_sync(0xffffffffu, bq0, 1);
    bq0 += __shfl_xor_sync(0xffffffffu, bq0, 2);
    bq1 += __shfl_xor_sync(0xffffffffu, bq1, 1);
    bq1 += __shfl_xor_sync(0xffffffffu, bq1, 2);
    bq0 *= Tr::kBias;
    bq1 *= Tr::kBias;
  }

  // ---- key range of this CTA: the tile's causal span, cut into splits
  const int last_row = min(rt * 16 + 15, rows - 1);
  const int kv_hi = first_pos + last_row / G + 1;
  // every valid row of the tile sees keys [0, kv_lo) (its first row's causal end): tiles
  // below it skip the masking (for decode, every tile but the last of the sequence)
  const int kv_lo = first_pos + (rt * 16) / G + 1;
  const int ntiles = (kv_hi + 15) / 16;
  const int per_split = (ntiles + a.num_splits - 1) / a.num_splits;
  const int t_begin = blockIdx.x * per_split;
  const int t_end = min(ntiles, t_begin + per_split);

  const int bs = a.block_size;
  constexpr int CB = D / 2;  // code bytes per key
  const int region = bs * (CB + 4);  // bytes of one (block, K|V, head); fits: host checks
  const int page_stride = 2 * a.num_kv_heads * region;  // bytes of one block (host: < 2^31)
  const int v_off = a.num_kv_heads * region;            // K region -> V region of a block
  const uint8_t* head_k = a.cache + (int64_t)kvh * region;  // K region of block 0, this head
  const int lane_sz = bs * CB + 16 * (lane & 3) + (lane < 4 ? 0 : v_off);  // this lane's pairs
  const int32_t* btab = a.block_table + (int64_t)b * a.bt_stride;
  const float qk_scale = a.scale * kLog2e;

  // O accumulators.  R2: O = P V, n-tile i = dims n * D/8 + i; acc[i] = rows g (0, 1) and
  // g+8 (2, 3), columns 2c, 2c+1.  Otherwise (<= 8 rows) O^T = V^T P^T, so that the mma's
  // 16 M rows are 16 dims instead of 8 live query rows: half the mmas and half the
  // accumulator registers.  m-tile j = dims g*D/8 + 2j (its row g) and g*D/8 + 2j + 1 (row
  // g+8); acc[j] = query rows 2c, 2c+1 of the first dim (0, 1) and of the second (2, 3).
  // The V fragment registers are the same either way (bl/bh in pv), and P' from the S
  // accumulators is the B operand (P^T) as it was the A operand (P).
  constexpr int NA = R2 ? NT : NT / 2;
  float acc[NA][4];
#pragma unroll
  for (int i = 0; i < NA; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f, mv0 = 0.f, mv1 = 0.f;
  // PS: M * sum of the P' whose bias is still in acc, in acc's layout: R2 rows g ([0], [1])
  // and g+8 ([2], [3]); otherwise rows 2c ([0], [2]) and 2c+1 ([1], [3])
  float ps[4] = {0.f, 0.f, 0.f, 0.f};

  // Logits of one tile (log2 domain, masked) and its keys' V (scale, min).  Keys of this
  // thread: 2c, 2c+1 (n-tile 0) and 8+2c, 9+2c (n-tile 1); rows r0 (x[.][0..1]) and r1
  // (x[.][2..3]).
  struct Scores {
    float x[2][4];
    float vs[2][2], vm[2][2];
  };
  // S = Q K^T of a staged tile (keys [0, 8) and [8, 16)); even and odd k-steps go to
  // separate accumulators so four independent mma chains overlap their latency.  One chain
  // starts at -B_q: s + s2 = q . c.  MASK (a std::bool_constant): apply the causal end of
  // each row and zero V's (scale, min) past kv_hi; without it (tiles wholly below kv_lo, see
  // the key loop) every key is visible to every valid row and its page bytes are written.
  auto score = [&](auto masktag, const uint8_t* st, const int t, Scores& o) {
    constexpr bool MASK = decltype(masktag)::value;
    uint32_t kw[2][KW];
    lds_words<D / 8>(kw[0], st + g * CB + c * (D / 8));
    lds_words<D / 8>(kw[1], st + (8 + g) * CB + c * (D / 8));
    float s[2][4], s2[2][4];
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      s[n][0] = s[n][1] = -bq0;
      s[n][2] = s[n][3] = -bq1;
      s2[n][0] = s2[n][1] = s2[n][2] = s2[n][3] = 0.f;
    }
#pragma unroll
    for (int j = 0; j < KSTEPS; j += 2) {
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        uint32_t bk[4];
        Tr::codes(kw[n][j / 2], bk);
        Tr::mma(s[n], qa[j], bk[0], bk[1]);
        Tr::mma(s2[n], qa[j + 1], bk[2], bk[3]);
      }
    }
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      // (scale, zero) of keys (8n + 2c, 8n + 2c + 1), K and V
      const uint2 ksz = *reinterpret_cast<const uint2*>(st + 32 * CB + 32 * n + 8 * c);
      const uint2 vsz = *reinterpret_cast<const uint2*>(st + 32 * CB + 64 + 32 * n + 8 * c);
      const float2 ka = scale_min(ksz.x), kb = scale_min(ksz.y);
      const float2 va = scale_min(vsz.x), vb = scale_min(vsz.y);
      o.x[n][0] = (ka.x * (s[n][0] + s2[n][0]) + ka.y * qsum0) * qk_scale;
      o.x[n][1] = (kb.x * (s[n][1] + s2[n][1]) + kb.y * qsum0) * qk_scale;
      if constexpr (R2) {
        o.x[n][2] = (ka.x * (s[n][2] + s2[n][2]) + ka.y * qsum1) * qk_scale;
        o.x[n][3] = (kb.x * (s[n][3] + s2[n][3]) + kb.y * qsum1) * qk_scale;
      }
      o.vs[n][0] = va.x;
      o.vm[n][0] = va.y;
      o.vs[n][1] = vb.x;
      o.vm[n][1] = vb.y;
      if constexpr (MASK) {
        const int key0 = t * 16 + 8 * n + 2 * c, key1 = key0 + 1;
        if (!(key0 < end0)) o.x[n][0] = -INFINITY;
        if (!(key1 < end0)) o.x[n][1] = -INFINITY;
        if constexpr (R2) {
          if (!(key0 < end1)) o.x[n][2] = -INFINITY;
          if (!(key1 < end1)) o.x[n][3] = -INFINITY;
        }
        if (!(key0 < kv_hi)) o.vs[n][0] = o.vm[n][0] = 0.f;  // stale page bytes beyond: zero
        if (!(key1 < kv_hi)) o.vs[n][1] = o.vm[n][1] = 0.f;
      }
    }
  };

  // O += P' V of a staged tile, PS += its bias.  p: the tile's probabilities.
  auto pv = [&](const uint8_t* st, const float (&p)[2][4], const Scores& sc) {
    // P' = p * s_v as the A fragment (keys 2c,2c+1 | 2c+8,2c+9)
    uint32_t pa[4] = {0u, 0u, 0u, 0u};
    pa[0] = Tr::pack(p[0][0] * sc.vs[0][0], p[0][1] * sc.vs[0][1]);
    pa[2] = Tr::pack(p[1][0] * sc.vs[1][0], p[1][1] * sc.vs[1][1]);
    if constexpr (R2) {
      pa[1] = Tr::pack(p[0][2] * sc.vs[0][0], p[0][3] * sc.vs[0][1]);
      pa[3] = Tr::pack(p[1][2] * sc.vs[1][0], p[1][3] * sc.vs[1][1]);
    }
    // PS += M * sum_k P' (in every column / row): the bias this tile's mmas add to acc
    if constexpr (R2) {
      Tr::mma(ps, pa, Tr::kMagic, Tr::kMagic);
    } else {
      const uint32_t mg[4] = {Tr::kMagic, Tr::kMagic, Tr::kMagic, Tr::kMagic};
      Tr::mma(ps, mg, pa[0], pa[2]);
    }
    // O += P' (M + u C_v): V codes of keys 2c, 2c+1, 2c+8, 2c+9, bytes [g*D/16, (g+1)*D/16),
    // key pairs interleaved per byte by PRMT
    constexpr int VW = D / 64;
    uint32_t v[4][VW];
    const int keys[4] = {2 * c, 2 * c + 1, 2 * c + 8, 2 * c + 9};
#pragma unroll
    for (int k = 0; k < 4; ++k) lds_words<D / 16>(v[k], st + 16 * CB + keys[k] * CB + g * (D / 16));
#pragma unroll
    for (int wi = 0; wi < VW; ++wi) {
#pragma unroll
      for (int hb = 0; hb < 2; ++hb) {  // bytes 0-1 (nibbles e0..e3) or 2-3 (e4..e7)
        const uint32_t sel = hb ? 0x7632u : 0x5410u;
        const uint32_t lo = prmt(v[0][wi], v[1][wi], sel);  // keys 2c | 2c+1
        const uint32_t hi = prmt(v[2][wi], v[3][wi], sel);  // keys 2c+8 | 2c+9
        uint32_t bl[4], bh[4];
        Tr::codes(lo, bl);
        Tr::codes(hi, bh);
        // bl[e] / bh[e]: keys (2c, 2c+1) / (2c+8, 2c+9) of dim g*D/8 + wi*8 + hb*4 + e
        if constexpr (R2) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = wi * 8 + hb * 4 + e;  // n-tile
            Tr::mma(acc[i], pa, bl[e], bh[e]);
          }
        } else {
#pragma unroll
          for (int e = 0; e < 4; e += 2) {
            const int j = wi * 4 + hb * 2 + e / 2;  // m-tile
            const uint32_t av[4] = {bl[e], bl[e + 1], bh[e], bh[e + 1]};
            Tr::mma(acc[j], av, pa[0], pa[2]);
          }
        }
      }
    }
  };

  // N (1 or 2) staged tiles t[0..N) of stages st[0..N): scores, one online-softmax update
  // over all N x 16 keys (one running-max step, one rescale branch), then P V.  fold: fold
  // the V bias now.  Two tiles per step halve the softmax bookkeeping per key and give the
  // warp two independent S chains to interleave.
  auto step = [&](auto ntag, auto masktag, const uint8_t* const (&st)[2], const int (&t)[2],
                  const bool fold) {
    constexpr int N = decltype(ntag)::value;
    Scores sc[N];
#pragma unroll
    for (int u = 0; u < N; ++u) score(masktag, st[u], t[u], sc[u]);
    float p[N][2][4];
    // Online-softmax update of one of the thread's rows, whose logits are x[n][K], x[n][K + 1]
    // (K = 0: row r0, K = 2: row r1): running max m, sum l and sum p * min_v mv; fills
    // p[.][.][K..K+1] and returns the factor al = 2^(m_old - m_new) (m = -inf -> 0).
    auto row_update = [&](auto ktag, float& m, float& l, float& mv) -> float {
      constexpr int K = decltype(ktag)::value;
      float tm = -INFINITY;
#pragma unroll
      for (int u = 0; u < N; ++u)
        tm = fmaxf(tm, fmaxf(fmaxf(sc[u].x[0][K], sc[u].x[0][K + 1]), fmaxf(sc[u].x[1][K], sc[u].x[1][K + 1])));
      tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, 1));
      tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, 2));
      const float mn = fmaxf(m, tm);
      const float base = mn == -INFINITY ? 0.f : mn;
      const float al = exp2f(m - base);
      m = mn;
      float ls = 0.f, ms = 0.f;
#pragma unroll
      for (int u = 0; u < N; ++u) {
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          p[u][n][K] = exp2f(sc[u].x[n][K] - base);
          p[u][n][K + 1] = exp2f(sc[u].x[n][K + 1] - base);
          ls += p[u][n][K] + p[u][n][K + 1];
          ms += p[u][n][K] * sc[u].vm[n][0] + p[u][n][K + 1] * sc[u].vm[n][1];
        }
      }
      l = l * al + ls;
      mv = mv * al + ms;
      return al;
    };
    const float al0 = row_update(std::integral_constant<int, 0>{}, m0, l0, mv0);
    [[maybe_unused]] float al1 = 1.f;
    if constexpr (R2) al1 = row_update(std::integral_constant<int, 2>{}, m1, l1, mv1);
    // the running max moved (rare after the first tiles), or the V bias is due: fold the
    // bias out of acc while rescaling, acc = (acc - PS) * al, PS = 0.  f[k] / nb[k]: factor
    // al and bias -PS * al of accumulator element k's row.
    auto rescale = [&](const float (&f)[4], const float (&nb)[4]) {
#pragma unroll
      for (int i = 0; i < NA; ++i) {
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[i][k] = fmaf(acc[i][k], f[k], nb[k]);
      }
      ps[0] = ps[1] = ps[2] = ps[3] = 0.f;
    };
    if constexpr (R2) {  // elements 0, 1: row g; 2, 3: row g+8
      if (al0 != 1.f || al1 != 1.f || fold) {
        const float nb0 = -ps[0] * al0, nb1 = -ps[2] * al1;
        rescale({al0, al0, al1, al1}, {nb0, nb0, nb1, nb1});
      }
    } else if (__any_sync(0xffffffffu, al0 != 1.f) || fold) {  // warp-uniform: shuffles inside
      // elements 0, 2: row 2c; 1, 3: row 2c+1, whose factors live in lanes 4 * row
      const float alA = __shfl_sync(0xffffffffu, al0, 8 * c);
      const float alB = __shfl_sync(0xffffffffu, al0, 8 * c + 4);
      const float nbA = -ps[0] * alA, nbB = -ps[1] * alB;
      rescale({alA, alB, alA, alB}, {nbA, nbB, nbA, nbB});
    }
#pragma unroll
    for (int u = 0; u < N; ++u) pv(st[u], p[u], sc[u]);
  };

  // The warp's tiles t0, t0 + kWarps, ... stream through its ring (tile i in stage
  // i % kStages); each iteration issues two, then consumes two while kAhead are in flight.
  const uint32_t ring = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) +
                        warp * kStages * stage_bytes<D>();
  const uint8_t* ring_p = smem_raw + warp * kStages * stage_bytes<D>();
  const int t0 = t_begin + warp;
  const int n_mine = t0 < t_end ? (t_end - t0 + kWarps - 1) / kWarps : 0;
  // block-table entry of the warp's i-th tile, read an iteration before it is needed
  // (block sizes are powers of two in practice: shifts instead of divisions)
  const int bs_log2 = a.block_size_log2;
  auto page_of = [&](int i) -> int {
    const int tok = (t0 + i * kWarps) * 16;
    return i < n_mine ? btab[bs_log2 >= 0 ? tok >> bs_log2 : tok / bs] : 0;
  };
  auto issue = [&](int i, int page, int stage) {
    if (i < n_mine) {
      const int tok = (t0 + i * kWarps) * 16;
      const int off = bs_log2 >= 0 ? tok & (bs - 1) : tok % bs;
      const uint8_t* kreg = head_k + (int64_t)page * page_stride;  // one wide multiply-add
      const uint8_t* kc = kreg + (off * CB + 16 * lane);
      stage_tile<D>(ring + stage * stage_bytes<D>() + 16 * lane, kc, kc + v_off, kreg + (4 * off + lane_sz),
                    lane);
    }
    dev::cp_async_commit();  // possibly empty: keeps the group count uniform
  };
  auto next = [](int s) { return s + 1 == kStages ? 0 : s + 1; };
#pragma unroll
  for (int i = 0; i < kAhead; ++i) issue(i, page_of(i), i);
  int pg0 = page_of(kAhead), pg1 = page_of(kAhead + 1);
  int wr = kAhead, rd = 0;  // stage of the next tile to issue / to consume
  for (int i = 0; i < n_mine; i += 2) {
    issue(i + kAhead, pg0, wr);
    wr = next(wr);
    issue(i + kAhead + 1, pg1, wr);
    wr = next(wr);
    pg0 = page_of(i + kAhead + 2);  // consumed next iteration: latency hidden behind this one
    pg1 = page_of(i + kAhead + 3);
    dev::cp_async_wait<kAhead>();  // tiles i and i + 1 have landed
    __syncwarp();
    const int rd1 = next(rd);
    const uint8_t* const st[2] = {ring_p + rd * stage_bytes<D>(), ring_p + rd1 * stage_bytes<D>()};
    const int t[2] = {t0 + i * kWarps, t0 + (i + 1) * kWarps};
    const bool fold = (i & (kFoldTiles - 1)) == kFoldTiles - 2;  // every kFoldTiles tiles
    if (i + 1 < n_mine) {
      if (kMaskEveryTile || (t[1] + 1) * 16 > kv_lo) {  // warp-uniform
        step(std::integral_constant<int, 2>{}, std::true_type{}, st, t, fold);
      } else {
        step(std::integral_constant<int, 2>{}, std::false_type{}, st, t, fold);
      }
    } else {
      step(std::integral_constant<int, 1>{}, std::true_type{}, st, t, fold);
    }
    rd = next(rd1);
    __syncwarp();  // every lane is done with these stages before they are refilled
  }
  dev::cp_async_wait<0>();
  // the rest of the V bias out: sum P'c = (acc - PS) / u
  // (ps[1] = ps[0], ps[3] = ps[2] with R2; ps[2] = ps[0], ps[3] = ps[1] without)
#pragma unroll
  for (int i = 0; i < NA; ++i) {
#pragma unroll
    for (int k = 0; k < 4; ++k) acc[i][k] = (acc[i][k] - ps[k]) * Tr::kVScale;
  }

  // ---- merge the warps: quad sums, per-warp stats, fragments through shared memory
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  mv0 += __shfl_xor_sync(0xffffffffu, mv0, 1);
  mv0 += __shfl_xor_sync(0xffffffffu, mv0, 2);
  mv1 += __shfl_xor_sync(0xffffffffu, mv1, 1);
  mv1 += __shfl_xor_sync(0xffffffffu, mv1, 2);
  if (c == 0) {
    m_s[warp][g] = m0;
    m_s[warp][g + 8] = m1;
    lw_s[warp][g] = l0;
    lw_s[warp][g + 8] = l1;
    mvw_s[warp][g] = mv0;
    mvw_s[warp][g + 8] = mv1;
  }
  __syncthreads();
  // CTA row max, each warp's factor 2^(m_w - M), merged l and mv (every thread, its 2 rows)
  float M0 = -INFINITY, M1 = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    M0 = fmaxf(M0, m_s[w][g]);
    M1 = fmaxf(M1, m_s[w][g + 8]);
  }
  float L0 = 0.f, L1 = 0.f, MV0 = 0.f, MV1 = 0.f, f0 = 0.f, f1 = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const float a0 = m_s[w][g] == -INFINITY ? 0.f : exp2f(m_s[w][g] - M0);
    const float a1 = m_s[w][g + 8] == -INFINITY ? 0.f : exp2f(m_s[w][g + 8] - M1);
    L0 += lw_s[w][g] * a0;
    L1 += lw_s[w][g + 8] * a1;
    MV0 += mvw_s[w][g] * a0;
    MV1 += mvw_s[w][g + 8] * a1;
    if (w == warp) {
      f0 = a0;
      f1 = a1;
    }
  }
  if constexpr (R2) {
#pragma unroll
    for (int i = 0; i < NA; ++i)
      frag_s[warp][i][lane] = make_float4(acc[i][0] * f0, acc[i][1] * f0, acc[i][2] * f1, acc[i][3] * f1);
  } else {  // this thread's acc rows are 2c, 2c+1: their factors from the per-warp maxima
    float MA = -INFINITY, MB = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      MA = fmaxf(MA, m_s[w][2 * c]);
      MB = fmaxf(MB, m_s[w][2 * c + 1]);
    }
    const float fA = m_s[warp][2 * c] == -INFINITY ? 0.f : exp2f(m_s[warp][2 * c] - MA);
    const float fB = m_s[warp][2 * c + 1] == -INFINITY ? 0.f : exp2f(m_s[warp][2 * c + 1] - MB);
#pragma unroll
    for (int j = 0; j < NA; ++j)
      frag_s[warp][j][lane] = make_float4(acc[j][0] * fA, acc[j][1] * fB, acc[j][2] * fA, acc[j][3] * fB);
  }
  if (warp == 0 && c == 0) {
    mx_s[g] = M0;
    mx_s[g + 8] = M1;
    l_s[g] = L0;
    l_s[g + 8] = L1;
    mvs_s[g] = MV0;
    mvs_s[g + 8] = MV1;
  }
  __syncthreads();
  auto warp_sum = [&](int i) {  // fragment i of every warp, summed
    float4 r = frag_s[0][i][lane];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) {
      const float4 x = frag_s[w][i][lane];
      r.x += x.x;
      r.y += x.y;
      r.z += x.z;
      r.w += x.w;
    }
    return r;
  };
  if constexpr (R2) {
    // warp w sums n-tiles w, w+4, ... over the warps and normalizes: O = (sum + mv) / l
    const float inv0 = L0 > 0.f ? 1.f / L0 : 0.f, inv1 = L1 > 0.f ? 1.f / L1 : 0.f;
#pragma unroll
    for (int i = warp; i < NT; i += kWarps) {
      const float4 r = warp_sum(i);
      const int d0 = (2 * c) * (D / 8) + i, d1 = (2 * c + 1) * (D / 8) + i;
      o_s[g][d0] = (r.x + MV0) * inv0;
      o_s[g][d1] = (r.y + MV0) * inv0;
      o_s[g + 8][d0] = (r.z + MV1) * inv1;
      o_s[g + 8][d1] = (r.w + MV1) * inv1;
    }
  } else {
    // warp w sums m-tiles w, w+4, ... over the warps and normalizes rows 2c, 2c+1 of dims
    // g*D/8 + 2j, + 1: O = (sum + mv) / l
    const int rA = 2 * c, rB = 2 * c + 1;
    const float invA = l_s[rA] > 0.f ? 1.f / l_s[rA] : 0.f, invB = l_s[rB] > 0.f ? 1.f / l_s[rB] : 0.f;
    const float mvA = mvs_s[rA], mvB = mvs_s[rB];
#pragma unroll
    for (int j = warp; j < NA; j += kWarps) {
      const float4 r = warp_sum(j);
      const int d0 = g * (D / 8) + 2 * j;
      o_s[rA][d0] = (r.x + mvA) * invA;
      o_s[rB][d0] = (r.y + mvB) * invB;
      o_s[rA][d0 + 1] = (r.z + mvA) * invA;
      o_s[rB][d0 + 1] = (r.w + mvB) * invB;
    }
  }
  __syncthreads();

  // ---- write: final rows (one split) or normalized partials + lse (split-KV)
  for (int i = threadIdx.x; i < 16 * D; i += kThreads) {
    const int r = i / D, d = i % D;
    const int row = rt * 16 + r;
    if (row >= rows) continue;
    const int tok = q0 + row / G, head = kvh * G + row % G;
    const float o = o_s[r][d];
    if (a.num_splits == 1) {
      static_cast<T*>(a.out)[(int64_t)tok * a.out_stride_t + (int64_t)head * a.out_stride_h + d] =
          Tr::from_f32(o);
    } else {
      const int64_t idx = ((int64_t)blockIdx.x * a.num_tokens + tok) * a.num_q_heads + head;
      a.ws_out[idx * D + d] = o;
      if (d == 0) a.ws_lse[idx] = l_s[r] > 0.f ? mx_s[r] + log2f(l_s[r]) : -INFINITY;
    }
  }
}

// Merge split-KV partials: out = sum_s 2^(lse_s - max) o_s / sum_s 2^(lse_s - max).
template <typename T, int D>
__global__ void __launch_bounds__(D) kv4_combine_kernel(AttnArgs a) {
  const int tok = blockIdx.x, head = blockIdx.y, d = threadIdx.x;
  if (tok >= a.query_start_loc[a.num_seqs]) return;  // padding tokens
  const int64_t stride = (int64_t)a.num_tokens * a.num_q_heads;
  const int64_t idx = (int64_t)tok * a.num_q_heads + head;
  float mx = -INFINITY;
  for (int s = 0; s < a.num_splits; ++s) mx = fmaxf(mx, a.ws_lse[s * stride + idx]);
  float num = 0.f, den = 0.f;
  if (mx != -INFINITY) {
    for (int s = 0; s < a.num_splits; ++s) {
      const float w = exp2f(a.ws_lse[s * stride + idx] - mx);
      den += w;
      num += w * a.ws_out[(s * stride + idx) * D + d];
    }
  }
  static_cast<T*>(a.out)[(int64_t)tok * a.out_stride_t + (int64_t)head * a.out_stride_h + d] =
      Traits<T>::from_f32(den > 0.f ? num / den : 0.f);
}

// An environment switch with two named settings: 1 for `first`, 2 for `second`, else 0.
int env_choice(const char* name, const char* first, const char* second) {
  const char* e = std::getenv(name);
  if (e == nullptr) return 0;
  if (std::string(e) == first) return 1;
  if (std::string(e) == second) return 2;
  return 0;
}

// VLLM_QOQ_KV4_DENSE=on|off forces the dense head_dim-128 build for every unsplit launch, or
// never (read once; for A/B timings); default: the rule in launch().
int dense_policy() {  // 0 default, 1 off, 2 on
  static const int p = env_choice("VLLM_QOQ_KV4_DENSE", "off", "on");
  return p;
}

// One build, with its dynamic shared memory (the ring / merge buffers, smem_bytes<D>()).
template <typename T, int D, bool R2, int MINB>
void launch_kernel(const AttnArgs& a, dim3 grid, cudaStream_t stream) {
  constexpr int bytes = smem_bytes<D>();
  auto kern = kv4_attention_kernel<T, D, R2, MINB>;
  if constexpr (bytes > 48 * 1024) {  // opt in to more than 48 KB, once per device
    static unsigned long long done = 0;
    const unsigned long long bit = current_device_bit();
    if (!(done & bit)) {
      QOQ_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
      done |= bit;
    }
  }
  kern<<<grid, kThreads, bytes, stream>>>(a);
}

// r2: a row tile may hold more than 8 rows (max_query_len * G > 8)
template <typename T, int D, int MINB>
void launch_kernel(const AttnArgs& a, dim3 grid, bool r2, cudaStream_t stream) {
  if (r2) {
    launch_kernel<T, D, true, MINB>(a, grid, stream);
  } else {
    launch_kernel<T, D, false, MINB>(a, grid, stream);
  }
}

template <typename T, int D>
void launch(const AttnArgs& a, cudaStream_t stream) {
  const int G = a.num_q_heads / a.num_kv_heads;
  const int row_tiles = (a.max_query_len * G + 15) / 16;
  const bool r2 = a.max_query_len * G > 8;
  dim3 grid(a.num_splits, a.num_kv_heads * row_tiles, a.num_seqs);
  bool dense = false;
  if constexpr (D == 128) {
    const int policy = dense_policy();
    // decode rows only (R2 = false): the R2 build spills far more at 128 registers
    if (a.num_splits == 1 && policy != 1 && !r2) {
      int dev = 0;
      QOQ_CUDA_CHECK(cudaGetDevice(&dev));
      const int64_t sms = num_sms(dev);
      const int64_t ctas = (int64_t)grid.y * grid.z;
      dense = policy == 2 || (ctas > min_blocks<D>() * sms && ctas <= kDenseBlocks128 * sms);
    }
  }
  if (dense) {
    launch_kernel<T, D, kDenseBlocks128>(a, grid, r2, stream);
  } else {
    launch_kernel<T, D, min_blocks<D>()>(a, grid, r2, stream);
  }
  QOQ_CUDA_CHECK(cudaGetLastError());
  if (a.num_splits > 1) {
    kv4_combine_kernel<T, D><<<dim3(a.num_tokens, a.num_q_heads), D, 0, stream>>>(a);
    QOQ_CUDA_CHECK(cudaGetLastError());
  }
}

template <typename T>
void dispatch(const AttnArgs& a, cudaStream_t stream) {
  switch (a.head_size) {
    case 64: launch<T, 64>(a, stream); break;
    case 128: launch<T, 128>(a, stream); break;
    default: throw std::runtime_error("kv4 attention: head_size must be 64 or 128");
  }
}

}  // namespace

bool head_size_supported(int head_size) { return head_size == 64 || head_size == 128; }

// Split-KV count.  Two candidates:
//  * "wave": about one wave of 3 CTAs per SM, each split >= 128 keys, at most 64;
//  * "fill": the SMALLEST split count whose CTAs keep >= 90% of the wave slots busy over all
//    waves (512 CTAs = batch 64 x 8 KV heads on 396 slots: 1.3 waves, 65% busy unsplit;
//    3 splits: 3.9 waves, 97%).
// Default: "fill" where it means fewer splits than "wave", or where each of its splits
// still gets >= 4096 keys; "wave" otherwise.  From the H100 A/B of the two
// (benchmarks/results/attention-h100-decode-splits2-*.json, docs/kv4.md): "fill" was
// 1.12-1.23x faster at batch 16 (3 splits instead of 4), at batch 64 x 16k-32k and batch
// 1 x 32k (head_dim 128), and 0.76-0.94x where it split short contexts (batch 64-256,
// 1k-4k); head_dim 64 within noise.  VLLM_QOQ_KV4_SPLITS=wave|fill forces one (read once).
// (A first "fill" took the highest busy fraction up to 64 splits and over-split: 0.37-0.66x.)
static int split_policy() {  // 0 default, 1 wave, 2 fill
  static const int p = env_choice("VLLM_QOQ_KV4_SPLITS", "wave", "fill");
  return p;
}

int attention_num_splits(int num_seqs, int num_kv_heads, int num_q_heads, int head_size,
                         int max_query_len, int max_seq_len, int num_tokens, int num_sms) {
  const int G = num_q_heads / num_kv_heads;
  const int64_t ctas = (int64_t)num_seqs * num_kv_heads * ((max_query_len * G + 15) / 16);
  if (ctas <= 0) return 1;
  const int64_t max_splits = std::min<int64_t>(64, std::max(1, (max_seq_len + 127) / 128));  // >= 128 keys
  int64_t splits = std::min<int64_t>((3LL * num_sms + ctas - 1) / ctas, max_splits);  // "wave"
  const int policy = split_policy();
  if (policy != 1) {
    const int64_t slots =
        (int64_t)(head_size == 64 ? QOQ_KV4_MIN_BLOCKS_64 : QOQ_KV4_MIN_BLOCKS_128) * num_sms;
    for (int64_t s = 1; s <= max_splits; ++s) {
      const int64_t n = ctas * s;
      if (n >= 0.9 * (double)(((n + slots - 1) / slots) * slots)) {
        if (policy == 2 || s < splits || max_seq_len / s >= 4096) splits = s;
        break;
      }
    }
  }
  // workspace: splits x [T, Hq, D + 1] fp32; keep it under 256 MiB (prefill has rows enough)
  const int64_t per_split = (int64_t)num_tokens * num_q_heads * (head_size + 1) * 4;
  while (splits > 1 && splits * per_split > (256LL << 20)) splits /= 2;
  return static_cast<int>(std::max<int64_t>(splits, 1));
}

int num_sms(int device) {
  static int cache[64] = {0};  // SM counts per device (benign race: same value)
  if (device < 0 || device >= 64) device = 0;
  if (cache[device] == 0) {
    int n = 0;
    QOQ_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device] = n;
  }
  return cache[device];
}

void attention(const AttnArgs& a, DType dt, void* stream_ptr) {
  if (a.num_seqs == 0 || a.num_tokens == 0) return;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (dt == DType::F16) {
    dispatch<half>(a, stream);
  } else {
    dispatch<__nv_bfloat16>(a, stream);
  }
}

}  // namespace kv4
}  // namespace qoq
