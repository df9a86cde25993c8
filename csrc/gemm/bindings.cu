// (A .cu so that nvcc supplies the CUDA include path; host code only.)
// CUDA implementations of the `qoq` GEMM / activation-quant ops (schemas: vllm_qoq/ops.py)
// and the debug op qoq_debug::w4a8_acc (raw int32 accumulators, for exactness tests);
// qoq_debug::default_path says which path the real ops pick.
//
// The weights arrive in the kernel layout of vllm_qoq/kernel_layout.py (described there
// and in w4a8_sm80.cuh): qweight uint8 [Np, K/2] (Np = N rounded up to 32; == N when
// N % 32 == 0), scales/szeros/s1 fp16 [N], s2_scales/s2_zeros uint8 [K/128, Np] with
// s2_zeros holding the pre-negated (-z*s2) mod 256.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <array>
#include <mutex>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/launch.h"

namespace qoq {

// Persistent wgmma kernels (path 7), csrc/gemm/w4a8_sm90p_{chn,g128}.cu: max_ctas = 0 as the
// real ops run them (path 3 where the tiles fit in one wave), > 0 the persistent kernel with
// at most that many CTAs (tests).
void w4a8_gemm_sm90p_chn(const W4A8Args& a, OutKind out, int max_ctas, cudaStream_t stream);
void w4a8_gemm_sm90p_g128(const W4A8Args& a, OutKind out, int max_ctas, cudaStream_t stream);

namespace {

int num_sms(int device) {
  static std::mutex mu;
  static std::vector<int> cache;
  std::lock_guard<std::mutex> lock(mu);
  if (static_cast<int>(cache.size()) <= device) cache.resize(device + 1, 0);
  if (cache[device] == 0) {
    QOQ_CUDA_CHECK(cudaDeviceGetAttribute(&cache[device], cudaDevAttrMultiProcessorCount, device));
  }
  return cache[device];
}

// Split-K scratch, one per device, allocated (zeroed) on first use and kept: the kernels
// leave it zeroed again after every call, so no per-call memset or allocation happens
// (CUDA-graph safe once the first, eager call has run -- vLLM's profile/warm-up runs do).
// Not safe for two GEMMs running concurrently on different streams of one device.
at::Tensor& workspace(const at::Device& dev) {
  static std::mutex mu;
  // Never destroyed: freeing CUDA memory from a static destructor can run after the driver
  // has shut down at process exit.
  static auto* ws = new std::vector<at::Tensor>();
  std::lock_guard<std::mutex> lock(mu);
  const int idx = dev.index();
  if (static_cast<int>(ws->size()) <= idx) ws->resize(idx + 1);
  if (!(*ws)[idx].defined()) {
    (*ws)[idx] = at::zeros({w4a8_workspace_ints(0)}, at::TensorOptions().dtype(at::kInt).device(dev));
  }
  return (*ws)[idx];
}

// Kernel paths: 1 = mma.sync kernels; 2 = wgmma kernels as configured by default;
// 3 = wgmma without CTA clusters; 4 = wgmma with CTA pairs sharing X by TMA multicast;
// 7 = persistent wgmma (w4a8_sm90_persistent.cuh; the default for M >= 96, below).
// The multicast variant (4) is opt-in until it has passed tests/gpu and been measured on a
// GPU (it was written after the last device run of this work); flip this once it has.
constexpr bool kClusterByDefault = false;

// VLLM_QOQ_GEMM_PATH=sm80|sm90|sm90-nocluster|sm90-cluster|gemv|mmv|sm90-persistent|mmr forces
// a path (A/B runs); read once.  sm90-persistent is the default choice with path 7 in place
// of the wgmma default (the small-M weight-stream paths keep their M ranges).
int forced_path() {
  static const int p = [] {
    const char* e = std::getenv("VLLM_QOQ_GEMM_PATH");
    if (e == nullptr) return 0;
    if (std::strcmp(e, "sm80") == 0) return 1;
    if (std::strcmp(e, "sm90") == 0) return 2;
    if (std::strcmp(e, "sm90-nocluster") == 0) return 3;
    if (std::strcmp(e, "sm90-cluster") == 0) return 4;
    if (std::strcmp(e, "gemv") == 0) return 5;
    if (std::strcmp(e, "mmv") == 0) return 6;
    if (std::strcmp(e, "sm90-persistent") == 0) return 7;
    if (std::strcmp(e, "mmr") == 0) return 8;
    return 0;
  }();
  return p;
}

// Whether the wgmma kernels run on `device` (probed once, outside graph capture; during a
// capture that comes before any eager call the mma.sync path is used: same results).
bool sm90_ok(int device, cudaStream_t stream) {
  static std::mutex mu;
  static std::vector<int> cache;  // -1 unknown, 0 no, 1 yes
  std::lock_guard<std::mutex> lock(mu);
  if (static_cast<int>(cache.size()) <= device) cache.resize(device + 1, -1);
  if (cache[device] < 0) {
    cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
    QOQ_CUDA_CHECK(cudaStreamIsCapturing(stream, &st));
    if (st != cudaStreamCaptureStatusNone) return false;
    cache[device] = w4a8_sm90_available(device) ? 1 : 0;
  }
  return cache[device] == 1;
}

// All paths give identical results (same exact int32 accumulators, same epilogue), so the
// choice is only about speed (docs/kernels.md): the weight-streaming kernels for small M
// (on Hopper the ring MMV, path 8, at M = 2-32 where it fits one wave), then the mma.sync
// tiles up to M = 16, the wgmma kernels above on Hopper.  choose_path
// returns 1, 3, 4, 5, 6, 7 or 8 (2 resolved to its default, 3 or 4).
// The dp4a GEMV (path 5) serves M <= VLLM_QOQ_GEMV_MAX_M (default 2; g128 off sm_90: 4; at
// most 16) and the MMA weight stream (path 6) M <= VLLM_QOQ_MMV_MAX_M (default off; g128 off
// sm_90: 8; at most 32); 0 turns either off.  Defaults from the H100 sweeps in
// benchmarks/results/gemm-notes.md (gemm-h100-{gemv,mmv,mmv2}-sweep.md).  On sm_90, path 1's
// M <= 16 tiles (w4a8_sm80.cuh, CfgSmallK / CfgSmallN) beat the g128 GEMV at M = 4 and the
// MMV at M = 8 on six of the eight 8B/70B shapes, by up to 1.3x (the MMV keeps 7-10% on
// 4096 x 4096 and 57344 x 8192; gemm-h100-sm80-variants.json, gemm-h100-final-check.json), so
// there g128 takes path 1 from M = 3 on, as per-channel does.  Other GPUs run path 1's old
// tiles and keep the old g128 ranges.
int env_int(const char* name, int dflt, int hi) {
  const char* e = std::getenv(name);
  if (e == nullptr || *e == '\0') return dflt;  // unset: the per-variant default
  return std::max(0, std::min(hi, std::atoi(e)));
}
int gemv_max_m(bool g128, int device) {
  static const int v = env_int("VLLM_QOQ_GEMV_MAX_M", -1, 16);
  return v >= 0 ? v : (g128 && !cc9(device) ? 4 : 2);
}
int mmv_max_m(bool g128, int device) {
  static const int v = env_int("VLLM_QOQ_MMV_MAX_M", -1, 32);
  return v >= 0 ? v : (g128 && !cc9(device) ? 8 : 0);
}
// The ring MMV (path 8) serves 2 <= M <= VLLM_QOQ_MMR_MAX_M (at most 32; 0 = off; default 32
// on sm_90, off elsewhere: not timed there), by default only where its grid -- one CTA per
// 32 channels, K split to fill idle slots -- fits one wave (Np / 32 <= resident CTAs: 3 per SM
// at M <= 16, 2 above on the H100; a forced VLLM_QOQ_MMR_MAX_M drops this condition).  It
// comes before the GEMV; M = 1, and M = 2 where it does not fit, stay on the GEMV.  H100,
// bf16 out, the 8B/70B shapes that fit (gemm-h100-mmr-default.json, gemm-notes.md), time of
// the kernel it replaces / its time: M = 2 vs the GEMV 0.87-1.17 (below 1 on 4096 x 4096
// only); M = 3-16 vs path 1 0.89-1.20 (below 1 only at M >= 8 on 6144 x 4096 and g128 4096 x
// 14336); M = 17-32 vs path 3 0.96-1.23.  Where it does not fit it lost: 0.8x against path 1
// on 28672 x 4096 (896 blocks, 2.3 waves), 0.5-0.8x against path 3 at M = 17-32.
int mmr_env() {  // VLLM_QOQ_MMR_MAX_M as set, -1 when unset
  static const int v = env_int("VLLM_QOQ_MMR_MAX_M", -1, 32);
  return v;
}
int mmr_max_m(int device) {
  return mmr_env() >= 0 ? mmr_env() : (cc9(device) ? 32 : 0);
}
bool mmr_fits(const W4A8Args& a, bool g128, int device) {
  if (mmr_env() >= 0) return true;  // forced: M alone decides
  static std::mutex mu;
  static std::vector<std::array<int, 4>> cache;  // per device, [2 * g128 + (M > 16)]; 0 = not asked
  std::lock_guard<std::mutex> lock(mu);
  if (static_cast<int>(cache.size()) <= device) cache.resize(device + 1, std::array<int, 4>{});
  int& c = cache[device][(g128 ? 2 : 0) + (a.M > 16 ? 1 : 0)];
  if (c == 0) c = w4a8_mmr_wave_blocks(g128, a.M, a.num_sms);
  return a.Np / 32 <= c;
}
// The persistent wgmma kernel (path 7) serves M >= VLLM_QOQ_PERSISTENT_MIN_M (default 96;
// 0 = never by default) on sm_90a, path 3 (split-K) the M between 17 and that.  H100, both
// variants, the eight Llama-3-8B/-70B shapes: with its TMA-store epilogue path 7 was
// 1.00-1.59x faster than path 3 at every M in {256, 1024, 4096, 16384}
// (benchmarks/results/gemm-h100-persistent2.md); at M = 96-192 it was 1.09-1.23x faster on
// the widest shapes and within +-5% elsewhere, at M = 64 per-channel path 3's split-K was
// 1.16-1.19x faster on the widest shapes (gemm-h100-crossover.md).  Path 7 hands a grid
// that fits one wave to path 3.
int persistent_min_m() {
  static const int v = env_int("VLLM_QOQ_PERSISTENT_MIN_M", 96, 1 << 30);
  return v;
}

int choose_path(const W4A8Args& a, bool g128, int requested, int device, cudaStream_t stream) {
  bool persistent = false;  // VLLM_QOQ_GEMM_PATH=sm90-persistent: 7 where the default has 2
  if (requested == 0) {
    requested = forced_path();
    if (requested == 7) {
      requested = 0;
      persistent = true;
    }
  }
  // the GEMV serves M <= 16, the MMV M <= 32; a forced path 5/6 beyond that falls back to
  // the default choice
  if (requested == 0 && a.M >= 2 && a.M <= mmr_max_m(device) && mmr_fits(a, g128, device)) return 8;
  if ((requested == 5 || requested == 0) && a.M <= (requested == 5 ? 16 : gemv_max_m(g128, device)))
    return 5;
  if ((requested == 6 || requested == 0) && a.M <= (requested == 6 ? 32 : mmv_max_m(g128, device)))
    return 6;
  if (requested == 8 && a.M <= 32) return 8;
  if (requested == 5 || requested == 6 || requested == 8) requested = 0;
  if (requested == 0) {
    if (a.M > 16 && sm90_ok(device, stream)) {
      const int min_m = persistent_min_m();
      requested = (persistent || (min_m > 0 && a.M >= min_m)) ? 7 : 2;
    } else {
      requested = 1;
    }
  }
  if (requested == 1) return 1;
  TORCH_CHECK((requested >= 2 && requested <= 4) || requested == 7, "qoq GEMM: unknown kernel path ",
              requested);
  TORCH_CHECK(sm90_ok(device, stream),
              "qoq GEMM: the sm_90a (wgmma) kernels are not available on this device/build");
  if (requested == 2) return kClusterByDefault ? 4 : 3;
  return requested;
}

OutKind out_kind(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return OutKind::F16;
    case at::kBFloat16: return OutKind::BF16;
    case at::kInt: return OutKind::I32;
    default: TORCH_CHECK(false, "qoq GEMM: out_dtype must be float16 or bfloat16, got ", t);
  }
}

BiasKind bias_kind(const c10::optional<at::Tensor>& bias) {
  if (!bias.has_value() || !bias->defined()) return BiasKind::None;
  switch (bias->scalar_type()) {
    case at::kHalf: return BiasKind::F16;
    case at::kBFloat16: return BiasKind::BF16;
    case at::kFloat: return BiasKind::F32;
    default: TORCH_CHECK(false, "qoq GEMM: bias must be fp16, bf16 or fp32, got ", bias->scalar_type());
  }
}

void check_cuda(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Device& dev) {
  TORCH_CHECK(t.is_cuda() && t.device() == dev, "qoq GEMM: ", name, " must be on ", dev);
  TORCH_CHECK(t.scalar_type() == dtype, "qoq GEMM: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "qoq GEMM: ", name, " must be contiguous");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "qoq GEMM: ", name,
              " must be 16-byte aligned");
}

// Common argument checks; fills everything but the variant's tensors.
W4A8Args base_args(const at::Tensor& qx, const at::Tensor& sx, const at::Tensor& qweight,
                   int64_t n, const c10::optional<at::Tensor>& bias) {
  const at::Device dev = qx.device();
  TORCH_CHECK(qx.dim() == 2, "qoq GEMM: qx must be 2-D [M, K], got ", qx.sizes());
  check_cuda(qx, "qx", at::kChar, dev);
  const int64_t m = qx.size(0), k = qx.size(1);
  TORCH_CHECK(sx.is_cuda() && sx.scalar_type() == at::kFloat && sx.numel() == m && sx.is_contiguous(),
              "qoq GEMM: sx must be a contiguous fp32 CUDA tensor of M=", m, " elements");
  check_cuda(qweight, "qweight", at::kByte, dev);
  TORCH_CHECK(qweight.dim() == 2 && qweight.size(1) * 2 == k,
              "qoq GEMM: qweight must be [Np, K/2] with K=", k, ", got ", qweight.sizes());
  const int64_t np = qweight.size(0);
  TORCH_CHECK(np % 32 == 0 && np >= n && np < n + 32,
              "qoq GEMM: qweight rows must be N=", n, " rounded up to 32 (kernel layout from "
              "vllm_qoq.kernel_layout.to_kernel_layout), got ", np);
  TORCH_CHECK(k % 32 == 0, "qoq GEMM: K=", k, " must be a multiple of 32");
  TORCH_CHECK(m < (1LL << 31) && k < (1LL << 31) && np < (1LL << 31), "qoq GEMM: sizes too large");
  W4A8Args a{};
  a.qx = qx.data_ptr<int8_t>();
  a.sx = sx.data_ptr<float>();
  a.qweight = qweight.data_ptr<uint8_t>();
  a.M = static_cast<int>(m);
  a.N = static_cast<int>(n);
  a.Np = static_cast<int>(np);
  a.K = static_cast<int>(k);
  a.bias_kind = bias_kind(bias);
  if (a.bias_kind != BiasKind::None) {
    TORCH_CHECK(bias->is_cuda() && bias->device() == dev && bias->is_contiguous() && bias->numel() == n,
                "qoq GEMM: bias must be a contiguous CUDA tensor of N=", n, " elements");
    a.bias = bias->data_ptr();
  }
  a.num_sms = num_sms(dev.index());
  at::Tensor& ws = workspace(dev);
  a.workspace = ws.data_ptr<int32_t>();
  a.workspace_ints = ws.numel();
  return a;
}

at::Tensor run_gemm(W4A8Args& a, bool g128, at::ScalarType out_dtype, const at::Device& dev,
                    int requested_path = 0, int max_ctas = 0) {
  const OutKind ok = out_kind(out_dtype);
  at::Tensor out = at::empty({a.M, a.N}, at::TensorOptions().dtype(out_dtype).device(dev));
  if (a.M == 0 || a.N == 0) return out;
  a.out = out.data_ptr();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  const int path = choose_path(a, g128, requested_path, dev.index(), stream);
  if (path == 5 || path == 6 || path == 8) {
    const int kind = path == 5 ? 0 : path == 6 ? 1 : 2;
    g128 ? w4a8_gemv_g128(a, ok, kind, stream) : w4a8_gemv_chn(a, ok, kind, stream);
  } else if (path == 7) {
    g128 ? w4a8_gemm_sm90p_g128(a, ok, max_ctas, stream) : w4a8_gemm_sm90p_chn(a, ok, max_ctas, stream);
  } else if (path >= 3) {
    const bool cluster = path == 4;
    g128 ? w4a8_gemm_sm90_g128(a, ok, cluster, stream) : w4a8_gemm_sm90_chn(a, ok, cluster, stream);
  } else {
    g128 ? w4a8_gemm_sm80_g128(a, ok, stream) : w4a8_gemm_sm80_chn(a, ok, stream);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_per_token_cuda(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.is_cuda(), "qoq::quantize_per_token: x must be a CUDA tensor");
  TORCH_CHECK(x_in.scalar_type() == at::kHalf || x_in.scalar_type() == at::kBFloat16,
              "qoq::quantize_per_token: x must be float16 or bfloat16, got ", x_in.scalar_type());
  TORCH_CHECK(x_in.dim() >= 1, "qoq::quantize_per_token: x must have at least one dimension");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t k = x.size(-1);
  const int64_t rows = k == 0 ? 0 : x.numel() / k;
  auto opts = at::TensorOptions().device(x.device());
  std::vector<int64_t> row_shape(x.sizes().begin(), x.sizes().end() - 1);
  at::Tensor qx = at::empty(x.sizes(), opts.dtype(at::kChar));
  at::Tensor sx = at::empty(row_shape, opts.dtype(at::kFloat));
  at::Tensor qsum = at::empty(row_shape, opts.dtype(at::kInt));
  if (k == 0) {
    sx.fill_(1.0);
    qsum.zero_();
    return {qx, sx, qsum};
  }
  if (rows > 0) {
    quantize_per_token(x.data_ptr(), x.scalar_type() == at::kBFloat16, qx.data_ptr<int8_t>(),
                       sx.data_ptr<float>(), qsum.data_ptr<int32_t>(), rows, k,
                       c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  }
  return {qx, sx, qsum};
}

at::Tensor w4a8_chn_gemm_cuda(const at::Tensor& qx, const at::Tensor& sx, const at::Tensor& qsum,
                              const at::Tensor& qweight, const at::Tensor& scales,
                              const at::Tensor& szeros, const c10::optional<at::Tensor>& bias,
                              at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(qx.device());
  const at::Device dev = qx.device();
  const int64_t n = scales.numel();
  W4A8Args a = base_args(qx, sx, qweight, n, bias);
  TORCH_CHECK(qsum.is_cuda() && qsum.scalar_type() == at::kInt && qsum.numel() == a.M && qsum.is_contiguous(),
              "qoq::w4a8_chn_gemm: qsum must be a contiguous int32 CUDA tensor of M elements");
  check_cuda(scales, "scales", at::kHalf, dev);
  check_cuda(szeros, "szeros", at::kHalf, dev);
  TORCH_CHECK(szeros.numel() == n, "qoq::w4a8_chn_gemm: szeros must have N=", n, " elements");
  a.qsum = qsum.data_ptr<int32_t>();
  a.scales = scales.data_ptr();
  a.szeros = szeros.data_ptr();
  return run_gemm(a, false, out_dtype, dev);
}

// base_args with the fp16 per-output-channel scales (per-channel `scales` or g128
// `s1_scales`), N = their element count.
W4A8Args scaled_args(const at::Tensor& qx, const at::Tensor& sx, const at::Tensor& qweight,
                     const at::Tensor& scales, const char* scales_name, const c10::optional<at::Tensor>& bias,
                     const at::Device& dev) {
  W4A8Args a = base_args(qx, sx, qweight, scales.numel(), bias);
  check_cuda(scales, scales_name, at::kHalf, dev);
  a.scales = scales.data_ptr();
  return a;
}

void g128_args(W4A8Args& a, const at::Tensor& s2_scales, const at::Tensor& s2_zeros, const at::Device& dev) {
  TORCH_CHECK(a.K % 128 == 0, "qoq::w4a8_g128_gemm: K=", a.K, " must be a multiple of 128");
  check_cuda(s2_scales, "s2_scales", at::kByte, dev);
  check_cuda(s2_zeros, "s2_zeros", at::kByte, dev);
  const int64_t groups = a.K / 128;
  TORCH_CHECK(s2_scales.dim() == 2 && s2_scales.size(0) == groups && s2_scales.size(1) == a.Np &&
                  s2_zeros.sizes() == s2_scales.sizes(),
              "qoq::w4a8_g128_gemm: s2_scales/s2_zeros must be [K/128, Np] = [", groups, ", ", a.Np,
              "] (kernel layout from vllm_qoq.kernel_layout), got ", s2_scales.sizes(), " and ",
              s2_zeros.sizes());
  a.s2 = s2_scales.data_ptr<uint8_t>();
  a.zneg = s2_zeros.data_ptr<uint8_t>();
}

at::Tensor w4a8_g128_gemm_cuda(const at::Tensor& qx, const at::Tensor& sx, const at::Tensor& qweight,
                               const at::Tensor& s1_scales, const at::Tensor& s2_scales,
                               const at::Tensor& s2_zeros, const c10::optional<at::Tensor>& bias,
                               at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(qx.device());
  const at::Device dev = qx.device();
  W4A8Args a = scaled_args(qx, sx, qweight, s1_scales, "s1_scales", bias, dev);
  g128_args(a, s2_scales, s2_zeros, dev);
  return run_gemm(a, true, out_dtype, dev);
}

// Raw int32 accumulators of either variant (g128 when s2 tensors are given), for tests.
// path: 0 = as the real ops choose, 1 = mma.sync kernels, 2 = wgmma kernels (sm_90a) as
// configured, 3 = wgmma without clusters, 4 = wgmma with CTA-pair multicast, 5 = the dp4a
// GEMV (M <= 16), 6 = the mma.sync weight stream (M <= 32), 7 = persistent wgmma (path 3
// where the tiles fit in one wave), 8 = the weight stream through per-warp rings (M <= 32).
// max_ctas > 0 (path 7 only): the persistent kernel with
// at most that many CTAs on any shape, never the path-3 fallback (tests of the cross-tile
// pipeline on small shapes).
at::Tensor w4a8_acc_debug(const at::Tensor& qx, const at::Tensor& qweight,
                          const c10::optional<at::Tensor>& s2_scales,
                          const c10::optional<at::Tensor>& s2_zeros, int64_t n, int64_t path,
                          int64_t max_ctas) {
  const c10::cuda::CUDAGuard guard(qx.device());
  const at::Device dev = qx.device();
  at::Tensor sx = at::empty({qx.size(0)}, at::TensorOptions().dtype(at::kFloat).device(dev));
  W4A8Args a = base_args(qx, sx, qweight, n, c10::nullopt);
  const bool g128 = s2_scales.has_value() && s2_scales->defined();
  if (g128) g128_args(a, *s2_scales, *s2_zeros, dev);
  TORCH_CHECK(max_ctas >= 0 && max_ctas < (1LL << 31), "qoq_debug: max_ctas must be >= 0");
  return run_gemm(a, g128, at::kInt, dev, static_cast<int>(path), static_cast<int>(max_ctas));
}

// The real ops' full computation (float epilogue, fp16/bf16 out) through one forced path,
// for tests and A/B timings: per-channel when s2_scales is absent (qsum, szeros needed),
// g128 otherwise.  path and max_ctas as in w4a8_acc.
at::Tensor w4a8_gemm_debug(const at::Tensor& qx, const at::Tensor& sx,
                           const c10::optional<at::Tensor>& qsum, const at::Tensor& qweight,
                           const at::Tensor& scales, const c10::optional<at::Tensor>& szeros,
                           const c10::optional<at::Tensor>& s2_scales,
                           const c10::optional<at::Tensor>& s2_zeros,
                           const c10::optional<at::Tensor>& bias, at::ScalarType out_dtype,
                           int64_t path, int64_t max_ctas) {
  const c10::cuda::CUDAGuard guard(qx.device());
  const at::Device dev = qx.device();
  const int64_t n = scales.numel();
  W4A8Args a = scaled_args(qx, sx, qweight, scales, "scales", bias, dev);
  const bool g128 = s2_scales.has_value() && s2_scales->defined();
  if (g128) {
    TORCH_CHECK(s2_zeros.has_value() && s2_zeros->defined(), "qoq_debug::w4a8_gemm: s2_zeros missing");
    g128_args(a, *s2_scales, *s2_zeros, dev);
  } else {
    TORCH_CHECK(qsum.has_value() && qsum->defined() && szeros.has_value() && szeros->defined(),
                "qoq_debug::w4a8_gemm: per-channel needs qsum and szeros");
    TORCH_CHECK(qsum->is_cuda() && qsum->scalar_type() == at::kInt && qsum->numel() == a.M &&
                    qsum->is_contiguous(),
                "qoq_debug::w4a8_gemm: qsum must be a contiguous int32 CUDA tensor of M elements");
    check_cuda(*szeros, "szeros", at::kHalf, dev);
    TORCH_CHECK(szeros->numel() == n, "qoq_debug::w4a8_gemm: szeros must have N=", n, " elements");
    a.qsum = qsum->data_ptr<int32_t>();
    a.szeros = szeros->data_ptr();
  }
  TORCH_CHECK(out_dtype == at::kHalf || out_dtype == at::kBFloat16,
              "qoq_debug::w4a8_gemm: out_dtype must be float16 or bfloat16");
  TORCH_CHECK(max_ctas >= 0 && max_ctas < (1LL << 31), "qoq_debug: max_ctas must be >= 0");
  return run_gemm(a, g128, out_dtype, dev, static_cast<int>(path), static_cast<int>(max_ctas));
}

bool sm90_available_op() {
  const int device = c10::cuda::current_device();
  return sm90_ok(device, c10::cuda::getCurrentCUDAStream(device).stream());
}

// The path the real ops take for an M x N x K GEMM on the current device (1, 3-8), under
// this process's environment knobs: tests of the dispatch rule (docs/kernels.md).
int64_t default_path_op(int64_t m, int64_t n, int64_t k, bool g128) {
  TORCH_CHECK(m > 0 && n > 0 && k > 0 && m < (1LL << 31) && n < (1LL << 30) && k < (1LL << 31),
              "qoq_debug::default_path: M, N, K must be positive int32, got ", m, ", ", n, ", ", k);
  const int device = c10::cuda::current_device();
  W4A8Args a{};
  a.M = static_cast<int>(m);
  a.N = static_cast<int>(n);
  a.Np = static_cast<int>((n + 31) / 32 * 32);
  a.K = static_cast<int>(k);
  a.num_sms = num_sms(device);
  return choose_path(a, g128, 0, device, c10::cuda::getCurrentCUDAStream(device).stream());
}

}  // namespace
}  // namespace qoq

TORCH_LIBRARY_IMPL(qoq, CUDA, m) {
  m.impl("quantize_per_token", &qoq::quantize_per_token_cuda);
  m.impl("w4a8_chn_gemm", &qoq::w4a8_chn_gemm_cuda);
  m.impl("w4a8_g128_gemm", &qoq::w4a8_g128_gemm_cuda);
}

TORCH_LIBRARY(qoq_debug, m) {
  m.def(
      "w4a8_acc(Tensor qx, Tensor qweight, Tensor? s2_scales, Tensor? s2_zeros, int n, int path=0, "
      "int max_ctas=0) -> Tensor");
  m.def(
      "w4a8_gemm(Tensor qx, Tensor sx, Tensor? qsum, Tensor qweight, Tensor scales, Tensor? szeros, "
      "Tensor? s2_scales, Tensor? s2_zeros, Tensor? bias, ScalarType out_dtype, int path=0, "
      "int max_ctas=0) -> Tensor");
  m.def("sm90_available() -> bool", &qoq::sm90_available_op);
  m.def("default_path(int m, int n, int k, bool g128) -> int", &qoq::default_path_op);
}

TORCH_LIBRARY_IMPL(qoq_debug, CUDA, m) {
  m.impl("w4a8_acc", &qoq::w4a8_acc_debug);
  m.impl("w4a8_gemm", &qoq::w4a8_gemm_debug);
}

