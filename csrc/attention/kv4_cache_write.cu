// KV4 cache write: quantize K (post-RoPE) and V per token and KV head, store into pages.
//
// One warp per (token, K|V, head); lane l owns the D/32 contiguous values
// [l*D/32, (l+1)*D/32).  min/max by warp shuffles, then exactly the arithmetic of
// vllm_qoq/reference/kv4.py:quantize_kv4 (IEEE fp32 division and rounding, so codes,
// scale and zero are bit-identical to the reference):
//   s32 = clamp(max((mx - mn) / 15, max(|mn|, |mx|) * 2^-10), 2^-14, 65504)
//   scale = fp16(s32); zero = fp16(-mn / scale); code = clamp(rint(x / scale + zero), 0, 15)
// Codes go to region + off * D/2 (lane's D/64 bytes), (scale, zero) to
// region + bs * D/2 + 4 * off, region = cache + ((block * 2 + side) * Hkv + head) * bs * (D/2+4).
#include <stdexcept>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention/kv4.h"
#include "common/launch.h"

namespace qoq {
namespace kv4 {
namespace {

constexpr int kWarps = 4;

template <typename T>
__device__ __forceinline__ float to_f32(T x);
template <>
__device__ __forceinline__ float to_f32<half>(half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T, int D>
__global__ void __launch_bounds__(32 * kWarps) cache_write_kernel(CacheWriteArgs a) {
  constexpr int E = D / 32;  // values per lane
  const int t = blockIdx.x;
  const int w = blockIdx.y * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int H = a.num_kv_heads;
  if (w >= 2 * H) return;
  const int64_t slot = a.slot_mapping[t];
  if (slot < 0) return;
  const int side = w / H, head = w % H;
  const T* src = static_cast<const T*>(side ? a.value : a.key) +
                 t * (side ? a.value_stride_t : a.key_stride_t) +
                 head * (side ? a.value_stride_h : a.key_stride_h) + lane * E;
  float x[E];
  float mn = INFINITY, mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < E; ++i) {
    x[i] = to_f32(src[i]);
    mn = fminf(mn, x[i]);
    mx = fmaxf(mx, x[i]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, o));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  }
  float s32 = fmaxf(__fdiv_rn(__fsub_rn(mx, mn), 15.0f), fmaxf(fabsf(mn), fabsf(mx)) * 0.0009765625f);
  s32 = fminf(fmaxf(s32, 6.103515625e-05f), 65504.0f);
  const half scale_h = __float2half_rn(s32);
  const float sf = __half2float(scale_h);
  const half zero_h = __float2half_rn(__fdiv_rn(-mn, sf));
  const float zf = __half2float(zero_h);

  const int bs = a.block_size;
  const int64_t block = slot / bs;
  const int off = static_cast<int>(slot % bs);
  const int64_t region_bytes = static_cast<int64_t>(bs) * (D / 2 + 4);
  uint8_t* region = a.cache + ((block * 2 + side) * H + head) * region_bytes;

  uint32_t packed = 0;  // E/2 bytes, little-endian: value 2j in the low nibble of byte j
#pragma unroll
  for (int i = 0; i < E; ++i) {
    float q = rintf(__fadd_rn(__fdiv_rn(x[i], sf), zf));
    q = fminf(fmaxf(q, 0.0f), 15.0f);
    packed |= static_cast<uint32_t>(q) << (4 * i);
  }
  uint8_t* dst = region + off * (D / 2) + lane * (E / 2);
  if constexpr (E == 2) {
    *dst = static_cast<uint8_t>(packed);
  } else if constexpr (E == 4) {
    *reinterpret_cast<uint16_t*>(dst) = static_cast<uint16_t>(packed);
  } else {
    *reinterpret_cast<uint32_t*>(dst) = packed;
  }
  if (lane == 0) {
    *reinterpret_cast<half2*>(region + static_cast<int64_t>(bs) * (D / 2) + 4 * off) =
        __halves2half2(scale_h, zero_h);
  }
}

template <typename T>
void launch_write(const CacheWriteArgs& a, cudaStream_t stream) {
  dim3 grid(a.num_tokens, (2 * a.num_kv_heads + kWarps - 1) / kWarps);
  dim3 block(32 * kWarps);
  switch (a.head_size) {
    case 64: cache_write_kernel<T, 64><<<grid, block, 0, stream>>>(a); break;
    case 128: cache_write_kernel<T, 128><<<grid, block, 0, stream>>>(a); break;
    case 256: cache_write_kernel<T, 256><<<grid, block, 0, stream>>>(a); break;
    default: throw std::runtime_error("kv4 cache write: head_size must be 64, 128 or 256");
  }
  QOQ_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void cache_write(const CacheWriteArgs& a, DType dt, void* stream_ptr) {
  if (a.num_tokens == 0) return;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (dt == DType::F16) {
    launch_write<half>(a, stream);
  } else {
    launch_write<__nv_bfloat16>(a, stream);
  }
}

}  // namespace kv4
}  // namespace qoq
