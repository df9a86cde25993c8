// Host-side interface between the torch bindings (.cpp) and the kernels (.cu).
// Plain C++ (no torch, no device code), so both sides include it.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace qoq {

// Output element types the kernels write.  I32 is the raw accumulator (tests).
enum class OutKind : int { F16 = 0, BF16 = 1, I32 = 2 };
// Optional bias element type (the bias may come in any float dtype).
enum class BiasKind : int { None = 0, F16 = 1, BF16 = 2, F32 = 3 };

#define QOQ_CUDA_CHECK(expr)                                                   \
  do {                                                                         \
    cudaError_t qoq_err_ = (expr);                                             \
    if (qoq_err_ != cudaSuccess) {                                             \
      qoq::throw_cuda_error(qoq_err_, #expr, __FILE__, __LINE__);              \
    }                                                                          \
  } while (0)

// Defined in csrc/common/errors.cu (throws std::runtime_error).
[[noreturn]] void throw_cuda_error(cudaError_t err, const char* what, const char* file,
                                   int line);

// One bit per device (current device), for the kernels' one-time per-device setup
// (cudaFuncSetAttribute, occupancy queries): `if (!(done & bit)) { setup; done |= bit; }`.
inline unsigned long long current_device_bit() {
  int dev = 0;
  QOQ_CUDA_CHECK(cudaGetDevice(&dev));
  return 1ull << (dev & 63);
}

// Compute capability 9.x? `device` < 0: the current device.  Queried once per device (a plain
// attribute query: fine during CUDA-graph capture).  For the kernel choices tuned on sm_90.
inline bool cc9(int device = -1) {
  static int known[64] = {};  // 0: not asked yet, 1: no, 2: yes
  if (device < 0) QOQ_CUDA_CHECK(cudaGetDevice(&device));
  int& k = known[device & 63];
  if (k == 0) {
    int major = 0;
    QOQ_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    k = major == 9 ? 2 : 1;
  }
  return k == 2;
}

// ---- Per-token INT8 activation quantization (csrc/quant/quant_per_token.cu).
// x [rows, K] (fp16 if !is_bf16, else bf16, row stride K) -> qx int8 [rows, K],
// sx fp32 [rows], qsum int32 [rows].  Bit-exact with reference.quantize_activation.
void quantize_per_token(const void* x, bool is_bf16, int8_t* qx, float* sx, int32_t* qsum,
                        int64_t rows, int64_t K, cudaStream_t stream);

// ---- W4A8 GEMM (csrc/gemm/).  Pointers to kernel-layout weights (kernel_layout.py).
struct W4A8Args {
  const int8_t* qx;        // [M, K] int8, row-major
  const float* sx;         // [M] fp32
  const int32_t* qsum;     // [M] int32 (per-channel only)
  const uint8_t* qweight;  // kernel layout, Np*K/2 bytes (Np = N rounded up to 32)
  const void* scales;      // fp16 [N]: s (per-channel) or s1 (g128)
  const void* szeros;      // fp16 [N] (per-channel only)
  const uint8_t* s2;       // g128: uint8 [K/128, Np], kernel column order
  const uint8_t* zneg;     // g128: uint8 [K/128, Np], (-z*s2) mod 256, same order
  const void* bias;        // [N] or nullptr
  BiasKind bias_kind;
  void* out;               // [M, N] (row stride N)
  int M, N, Np, K;
  int32_t* workspace;      // split-K: zeroed int32 scratch (self-cleaning), may be null
  int64_t workspace_ints;  // its size
  int num_sms;
};

// Returns the number of int32 the split-K workspace must hold for any M <= max_m.
int64_t w4a8_workspace_ints(int N);
// mma.sync path (sm_80+), csrc/gemm/w4a8_sm80_{chn,g128}.cu
void w4a8_gemm_sm80_chn(const W4A8Args& a, OutKind out, cudaStream_t stream);
void w4a8_gemm_sm80_g128(const W4A8Args& a, OutKind out, cudaStream_t stream);
// wgmma path (sm_90a only), csrc/gemm/w4a8_sm90_{chn,g128}.cu; cluster: CTA pairs share
// the activation tile through TMA multicast.
void w4a8_gemm_sm90_chn(const W4A8Args& a, OutKind out, bool cluster, cudaStream_t stream);
void w4a8_gemm_sm90_g128(const W4A8Args& a, OutKind out, bool cluster, cudaStream_t stream);
// Weight-streaming kernels for small M, csrc/gemm/w4a8_gemv.cu (sm_80+): kind 0: dp4a on
// CUDA cores (M <= 16); 1: mma.sync m16n8k32 (the MMV, M <= 32); 2: the MMV through a
// per-warp cp.async ring (M <= 32).
void w4a8_gemv_chn(const W4A8Args& a, OutKind out, int kind, cudaStream_t stream);
void w4a8_gemv_g128(const W4A8Args& a, OutKind out, int kind, cudaStream_t stream);
// 32-channel blocks in one wave of the ring MMV's CTAs for M rows (M <= 32).
int w4a8_mmr_wave_blocks(bool g128, int M, int num_sms);
// True when `device` is sm_90 and this build runs the sm_90a kernels on it (one device
// round trip; call outside CUDA-graph capture and cache the answer).
bool w4a8_sm90_available(int device);

}  // namespace qoq
