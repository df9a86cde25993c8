// Per-token symmetric INT8 activation quantization (qoq.md §2), with the row sum.
//
// Spec: vllm_qoq/reference/quantize.py:quantize_activation, bit-exact:
//   amax = max_k |x[m,k]| (in fp32), sx = amax / 127 (IEEE division; 1.0 when amax == 0),
//   qx = clamp(round_half_even(x / sx), -127, 127) (IEEE division, no reciprocal),
//   qsum = sum_k qx (int32).
//
// One CTA per row.  When K is a multiple of 8 the row is read with 16-byte loads and,
// if it fits (K <= THREADS * 8 * VPT), kept in registers between the max pass and the
// quantize pass, so x is read from memory once.  Other rows re-read (from L1/L2).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/device.cuh"

namespace qoq {
namespace {

template <typename T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

__device__ __forceinline__ int quant1(float v, float s) {
  int q = __float2int_rn(__fdiv_rn(v, s));
  return max(-127, min(127, q));
}

template <int THREADS, typename Op>
__device__ __forceinline__ float block_reduce_f(float v, float* red, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = red[0];
#pragma unroll
  for (int w = 1; w < THREADS / 32; ++w) v = op(v, red[w]);
  return v;
}

__device__ __forceinline__ int warp_sum_i(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// VPT > 0: vectorized path holding up to VPT 16-byte vectors per thread in registers.
// VPT == 0: generic path (any K; scalar loads, two passes over the row).
template <typename T, int THREADS, int VPT>
__global__ void __launch_bounds__(THREADS)
    quant_per_token_kernel(const T* __restrict__ x, int8_t* __restrict__ qx,
                           float* __restrict__ sx, int32_t* __restrict__ qsum, int64_t K) {
  __shared__ float red_f[THREADS / 32];
  __shared__ int red_i[THREADS / 32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * K;
  int8_t* qr = qx + row * K;
  float amax = 0.f;
  int sum = 0;
  float s;

  if constexpr (VPT > 0) {
    // 8 elements = 16 bytes per vector.
    const int nvec = static_cast<int>(K / 8);
    uint4 v[VPT];
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int idx = threadIdx.x + i * THREADS;
      if (idx < nvec) {
        v[i] = __ldg(reinterpret_cast<const uint4*>(xr) + idx);
        const T* e = reinterpret_cast<const T*>(&v[i]);
#pragma unroll
        for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(to_f32(e[j])));
      }
    }
    amax = block_reduce_f<THREADS>(amax, red_f, MaxOp());
    s = amax > 0.f ? __fdiv_rn(amax, 127.f) : 1.f;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int idx = threadIdx.x + i * THREADS;
      if (idx < nvec) {
        const T* e = reinterpret_cast<const T*>(&v[i]);
        uint32_t packed[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          uint32_t w = 0;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int q = quant1(to_f32(e[4 * h + j]), s);
            sum += q;
            w |= (static_cast<uint32_t>(q) & 0xffu) << (8 * j);
          }
          packed[h] = w;
        }
        reinterpret_cast<uint2*>(qr)[idx] = make_uint2(packed[0], packed[1]);
      }
    }
  } else {
    for (int64_t k = threadIdx.x; k < K; k += THREADS) amax = fmaxf(amax, fabsf(to_f32(xr[k])));
    amax = block_reduce_f<THREADS>(amax, red_f, MaxOp());
    s = amax > 0.f ? __fdiv_rn(amax, 127.f) : 1.f;
    for (int64_t k = threadIdx.x; k < K; k += THREADS) {
      const int q = quant1(to_f32(xr[k]), s);
      sum += q;
      qr[k] = static_cast<int8_t>(q);
    }
  }

  sum = warp_sum_i(sum);
  if (threadIdx.x % 32 == 0) red_i[threadIdx.x / 32] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    int total = 0;
#pragma unroll
    for (int w = 0; w < THREADS / 32; ++w) total += red_i[w];
    sx[row] = s;
    qsum[row] = total;
  }
}

template <typename T>
void launch_quant(const T* x, int8_t* qx, float* sx, int32_t* qsum, int64_t rows, int64_t K,
                  cudaStream_t stream) {
  if (rows == 0) return;
  const bool vec = (K % 8 == 0) && (reinterpret_cast<uintptr_t>(x) % 16 == 0) &&
                   (reinterpret_cast<uintptr_t>(qx) % 8 == 0);
  const dim3 grid(static_cast<unsigned>(rows));
  if (vec && K <= 128 * 8 * 2) {
    quant_per_token_kernel<T, 128, 2><<<grid, 128, 0, stream>>>(x, qx, sx, qsum, K);
  } else if (vec && K <= 256 * 8 * 4) {
    quant_per_token_kernel<T, 256, 4><<<grid, 256, 0, stream>>>(x, qx, sx, qsum, K);
  } else if (vec && K <= 512 * 8 * 8) {
    quant_per_token_kernel<T, 512, 8><<<grid, 512, 0, stream>>>(x, qx, sx, qsum, K);
  } else {
    quant_per_token_kernel<T, 512, 0><<<grid, 512, 0, stream>>>(x, qx, sx, qsum, K);
  }
  QOQ_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void quantize_per_token(const void* x, bool is_bf16, int8_t* qx, float* sx, int32_t* qsum,
                        int64_t rows, int64_t K, cudaStream_t stream) {
  if (is_bf16) {
    launch_quant(static_cast<const __nv_bfloat16*>(x), qx, sx, qsum, rows, K, stream);
  } else {
    launch_quant(static_cast<const __half*>(x), qx, sx, qsum, rows, K, stream);
  }
}

}  // namespace qoq
