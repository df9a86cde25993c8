// KV4 gather + dequantize: the dense K/V workspace of the prefill path.
//
// Spec: vllm_qoq/reference/kv4.py:kv4_gather_dequant.  For sequence b, tokens
// [0, len_b) with len_b = cu_seqlens_k[b+1] - cu_seqlens_k[b] are read from the pages
// block_table[b, :] of the KV4 cache and written, dequantized, to rows
// cu_seqlens_k[b] + t of k_out / v_out ([total, Hkv, D], contiguous, fp16/bf16):
//   x_hat = fp16|bf16( (float(code) - float(zero)) * float(scale) )
// two IEEE fp32 operations (RN, no FMA contraction: explicit __fsub_rn/__fmul_rn),
// then one round-to-nearest-even conversion: bit-identical to the reference.
//
// Memory-bound.  One thread per (token, KV head, 8-byte code word) and both sides
// (K and V): it reads 8 code bytes (16 codes) per side and writes 2 x 16 B per side.
// Word index is fastest, then head, then token, so a warp's stores cover
// consecutive rows of the output.  (scale, zero) of a token-head are read once, by
// the lane holding word 0, and broadcast to the D/16 lanes of the token-head with a
// shuffle.  grid = (ceil(max_seqlen_k * Hkv * D/16 / 256), B): launch shape from
// host values only.
#include <stdexcept>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention/kv4.h"
#include "common/launch.h"

namespace qoq {
namespace kv4 {
namespace {

constexpr int kThreads = 256;

template <typename T>
struct Pack;

template <>
struct Pack<half> {
  __device__ static __forceinline__ uint32_t two(float a, float b) {
    half2 h = __floats2half2_rn(a, b);  // a -> low half (lower address)
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <>
struct Pack<__nv_bfloat16> {
  __device__ static __forceinline__ uint32_t two(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

__device__ __forceinline__ float dq(uint32_t word, int nib, float zero, float scale) {
  const float c = static_cast<float>((word >> (4 * nib)) & 15u);
  return __fmul_rn(__fsub_rn(c, zero), scale);
}

// 16 codes (8 bytes: dims 16w .. 16w+15, even dim in the low nibble of each byte,
// so nibble j of a 32-bit word is dim j of its 8) -> 16 values -> two 16-byte stores.
template <typename T>
__device__ __forceinline__ void dequant_store(uint2 codes, uint32_t sz, T* dst) {
  half2 h = *reinterpret_cast<half2*>(&sz);  // (scale, zero): scale at the lower address
  const float scale = __low2float(h), zero = __high2float(h);
  uint4 lo, hi;
  lo.x = Pack<T>::two(dq(codes.x, 0, zero, scale), dq(codes.x, 1, zero, scale));
  lo.y = Pack<T>::two(dq(codes.x, 2, zero, scale), dq(codes.x, 3, zero, scale));
  lo.z = Pack<T>::two(dq(codes.x, 4, zero, scale), dq(codes.x, 5, zero, scale));
  lo.w = Pack<T>::two(dq(codes.x, 6, zero, scale), dq(codes.x, 7, zero, scale));
  hi.x = Pack<T>::two(dq(codes.y, 0, zero, scale), dq(codes.y, 1, zero, scale));
  hi.y = Pack<T>::two(dq(codes.y, 2, zero, scale), dq(codes.y, 3, zero, scale));
  hi.z = Pack<T>::two(dq(codes.y, 4, zero, scale), dq(codes.y, 5, zero, scale));
  hi.w = Pack<T>::two(dq(codes.y, 6, zero, scale), dq(codes.y, 7, zero, scale));
  reinterpret_cast<uint4*>(dst)[0] = lo;
  reinterpret_cast<uint4*>(dst)[1] = hi;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) kv4_gather_dequant_kernel(GatherArgs a) {
  constexpr int C = D / 16;  // 8-byte code words per token-head; divides 32
  const int b = blockIdx.y;
  const int64_t row0 = a.cu_seqlens_k[b];
  const int64_t len = a.cu_seqlens_k[b + 1] - row0;
  const int H = a.num_kv_heads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads;
  if (first >= len * H * C) return;  // CTA-uniform: no shuffle partner is lost
  const int64_t i = first + threadIdx.x;
  const int w = static_cast<int>(i % C);
  const int head = static_cast<int>((i / C) % H);
  const int64_t tok = i / (static_cast<int64_t>(C) * H);
  const bool valid = tok < len;

  const int bs = a.block_size;
  const int64_t region = static_cast<int64_t>(bs) * (D / 2 + 4);
  uint2 ck = make_uint2(0u, 0u), cv = make_uint2(0u, 0u);
  uint32_t szk = 0u, szv = 0u;
  if (valid) {
    const int64_t blk = a.block_table[b * a.bt_stride + tok / bs];
    const int off = static_cast<int>(tok % bs);
    const uint8_t* rk = a.cache + ((blk * 2) * H + head) * region;  // K region of this head
    const uint8_t* rv = rk + H * region;                            // V region
    ck = *reinterpret_cast<const uint2*>(rk + off * (D / 2) + w * 8);
    cv = *reinterpret_cast<const uint2*>(rv + off * (D / 2) + w * 8);
    if (w == 0) {
      szk = *reinterpret_cast<const uint32_t*>(rk + static_cast<int64_t>(bs) * (D / 2) + 4 * off);
      szv = *reinterpret_cast<const uint32_t*>(rv + static_cast<int64_t>(bs) * (D / 2) + 4 * off);
    }
  }
  const int leader = (threadIdx.x % 32) & ~(C - 1);
  szk = __shfl_sync(0xffffffffu, szk, leader);
  szv = __shfl_sync(0xffffffffu, szv, leader);
  if (!valid) return;
  const int64_t dst = ((row0 + tok) * H + head) * D + w * 16;
  dequant_store<T>(ck, szk, static_cast<T*>(a.k_out) + dst);
  dequant_store<T>(cv, szv, static_cast<T*>(a.v_out) + dst);
}

template <typename T>
void launch_gather(const GatherArgs& a, cudaStream_t stream) {
  const int64_t words = static_cast<int64_t>(a.max_seqlen_k) * a.num_kv_heads * (a.head_size / 16);
  const dim3 grid(static_cast<unsigned>((words + kThreads - 1) / kThreads), a.num_seqs);
  switch (a.head_size) {
    case 64: kv4_gather_dequant_kernel<T, 64><<<grid, kThreads, 0, stream>>>(a); break;
    case 128: kv4_gather_dequant_kernel<T, 128><<<grid, kThreads, 0, stream>>>(a); break;
    case 256: kv4_gather_dequant_kernel<T, 256><<<grid, kThreads, 0, stream>>>(a); break;
    default: throw std::runtime_error("kv4 gather_dequant: head_size must be 64, 128 or 256");
  }
  QOQ_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void gather_dequant(const GatherArgs& a, DType dt, void* stream_ptr) {
  if (a.num_seqs == 0 || a.max_seqlen_k <= 0) return;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (dt == DType::F16) {
    launch_gather<half>(a, stream);
  } else {
    launch_gather<__nv_bfloat16>(a, stream);
  }
}

}  // namespace kv4
}  // namespace qoq
