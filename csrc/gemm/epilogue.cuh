// The float epilogue shared by the W4A8 GEMM kernels (spec: vllm_qoq/reference/gemm.py).
//   per-channel: y = sx[m] * (s[n]*acc - szeros[n]*qsum[m]);   g128: y = (acc*sx[m]) * s1[n]
//   then + bias[n], rounded once to the output type.  Every fp32 operation is rounded
// separately (no FMA contraction) in the reference's order, so a kernel's output equals the
// reference evaluated in fp32 on the same int32 accumulator.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/device.cuh"

namespace qoq {
namespace epi {

__device__ __forceinline__ float ld_bias(const void* b, BiasKind kind, int n) {
  switch (kind) {
    case BiasKind::F16: return __half2float(static_cast<const __half*>(b)[n]);
    case BiasKind::BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(b)[n]);
    case BiasKind::F32: return static_cast<const float*>(b)[n];
    default: return 0.f;
  }
}

// Per-channel constants of one output column n: s (or s1), szeros, bias.
struct ColParams {
  float s, sz, b;
};

template <bool G128>
__device__ __forceinline__ ColParams col_params(const W4A8Args& a, int n) {
  ColParams c;
  c.s = __half2float(static_cast<const __half*>(a.scales)[n]);
  c.sz = G128 ? 0.f : __half2float(static_cast<const __half*>(a.szeros)[n]);
  c.b = a.bias_kind != BiasKind::None ? ld_bias(a.bias, a.bias_kind, n) : 0.f;
  return c;
}

// The epilogue arithmetic, in the reference's order, each operation rounded once.
template <bool G128>
__device__ __forceinline__ float epi_math(int32_t acc, const ColParams& c, float sxm, float qsm,
                                          bool has_bias) {
  const float accf = static_cast<float>(acc);
  float y;
  if constexpr (G128) {
    y = __fmul_rn(__fmul_rn(accf, sxm), c.s);
  } else {
    y = __fmul_rn(__fsub_rn(__fmul_rn(accf, c.s), __fmul_rn(qsm, c.sz)), sxm);
  }
  return has_bias ? __fadd_rn(y, c.b) : y;
}

template <bool G128>
__device__ __forceinline__ float epilogue1(const W4A8Args& a, int m, int n, int32_t acc,
                                           float sxm, float qsm) {
  return epi_math<G128>(acc, col_params<G128>(a, n), sxm, qsm, a.bias_kind != BiasKind::None);
}

template <typename T>
__device__ __forceinline__ T to_out(float y);
template <>
__device__ __forceinline__ __half to_out<__half>(float y) {
  return __float2half_rn(y);
}
template <>
__device__ __forceinline__ __nv_bfloat16 to_out<__nv_bfloat16>(float y) {
  return __float2bfloat16_rn(y);
}

// Write two adjacent outputs (m, n) and (m, n+1); n+1 may be out of range.
template <bool G128, OutKind OUT>
__device__ __forceinline__ void store2(const W4A8Args& a, int m, int n, int32_t v0, int32_t v1) {
  if (n >= a.N) return;
  const bool pair = (n + 1 < a.N) && ((a.N & 1) == 0);
  const int64_t off = static_cast<int64_t>(m) * a.N + n;
  if constexpr (OUT == OutKind::I32) {
    int32_t* o = static_cast<int32_t*>(a.out) + off;
    if (pair) {
      *reinterpret_cast<int2*>(o) = make_int2(v0, v1);
    } else {
      o[0] = v0;
      if (n + 1 < a.N) o[1] = v1;
    }
  } else {
    const float sxm = a.sx[m];
    const float qsm = G128 ? 0.f : static_cast<float>(a.qsum[m]);
    const float y0 = epilogue1<G128>(a, m, n, v0, sxm, qsm);
    const float y1 = (n + 1 < a.N) ? epilogue1<G128>(a, m, n + 1, v1, sxm, qsm) : 0.f;
    if constexpr (OUT == OutKind::F16) {
      __half* o = static_cast<__half*>(a.out) + off;
      if (pair) {
        *reinterpret_cast<__half2*>(o) = __halves2half2(__float2half_rn(y0), __float2half_rn(y1));
      } else {
        o[0] = __float2half_rn(y0);
        if (n + 1 < a.N) o[1] = __float2half_rn(y1);
      }
    } else {
      __nv_bfloat16* o = static_cast<__nv_bfloat16*>(a.out) + off;
      if (pair) {
        *reinterpret_cast<__nv_bfloat162*>(o) =
            __halves2bfloat162(__float2bfloat16_rn(y0), __float2bfloat16_rn(y1));
      } else {
        o[0] = __float2bfloat16_rn(y0);
        if (n + 1 < a.N) o[1] = __float2bfloat16_rn(y1);
      }
    }
  }
}


// One output (m, n), n < N checked by the caller.
template <bool G128, OutKind OUT>
__device__ __forceinline__ void store1(const W4A8Args& a, int m, int n, int32_t v) {
  const int64_t off = static_cast<int64_t>(m) * a.N + n;
  if constexpr (OUT == OutKind::I32) {
    static_cast<int32_t*>(a.out)[off] = v;
  } else {
    const float qsm = G128 ? 0.f : static_cast<float>(a.qsum[m]);
    const float y = epilogue1<G128>(a, m, n, v, a.sx[m], qsm);
    if constexpr (OUT == OutKind::F16) {
      static_cast<__half*>(a.out)[off] = __float2half_rn(y);
    } else {
      static_cast<__nv_bfloat16*>(a.out)[off] = __float2bfloat16_rn(y);
    }
  }
}

}  // namespace epi
}  // namespace qoq
