// Compile-time variants of the mma.sync GEMM (path 1, csrc/gemm/w4a8_sm80.cuh) for A/B timing
// on the device; not part of the extension.  benchmarks/device/sm80_variants.py builds this
// file against a (possibly patched) copy of csrc/ and loads it with ctypes.
//   qoq_var_run(cfg, g128, ...) runs tile configuration `cfg` (see the switch below; -DVAR_FEW
//   builds only 0, 1 and 3) with the bf16 epilogue; returns 0, or 1 after printing the error.
#include <cstdio>
#include <exception>

#include "gemm/w4a8_sm80.cuh"

using namespace qoq;

namespace {

template <class C>
void run_cfg(bool g128, const W4A8Args& a, cudaStream_t s) {
  if (g128)
    sm80::launch<C, true, OutKind::BF16>(a, true, s);
  else
    sm80::launch<C, false, OutKind::BF16>(a, true, s);
}

using sm80::TileCfg;

}  // namespace

extern "C" __attribute__((visibility("default"))) int qoq_var_ncfg() {
#ifdef VAR_FEW
  return -1;  // configurations 0, 1 and 3 only
#else
  return 22;
#endif
}

extern "C" __attribute__((visibility("default"))) int qoq_var_run(int cfg, int g128, const void* qx, const void* sx, const void* qsum,
                           const void* qweight, const void* scales, const void* szeros,
                           const void* s2, const void* zneg, void* out, int M, int N, int K,
                           void* workspace, long long workspace_ints, int num_sms, void* stream) {
  W4A8Args a{};
  a.qx = static_cast<const int8_t*>(qx);
  a.sx = static_cast<const float*>(sx);
  a.qsum = static_cast<const int32_t*>(qsum);
  a.qweight = static_cast<const uint8_t*>(qweight);
  a.scales = scales;
  a.szeros = szeros;
  a.s2 = static_cast<const uint8_t*>(s2);
  a.zneg = static_cast<const uint8_t*>(zneg);
  a.bias = nullptr;
  a.bias_kind = BiasKind::None;
  a.out = out;
  a.M = M;
  a.N = N;
  a.Np = (N + 31) / 32 * 32;
  a.K = K;
  a.workspace = static_cast<int32_t*>(workspace);
  a.workspace_ints = workspace_ints;
  a.num_sms = num_sms;
  const auto st = static_cast<cudaStream_t>(stream);
  try {
    switch (cfg) {
      case 0: run_cfg<TileCfg<16, 64, 256, 1, 2, 4, 4>>(g128, a, st); break;  // the default
      case 1: run_cfg<TileCfg<16, 128, 256, 1, 4, 2, 4>>(g128, a, st); break;  // CfgSmallN
      case 3: run_cfg<TileCfg<16, 64, 512, 1, 2, 4, 3>>(g128, a, st); break;   // CfgSmallK
#ifndef VAR_FEW
      case 2: run_cfg<TileCfg<16, 64, 256, 1, 2, 4, 6>>(g128, a, st); break;
      case 4: run_cfg<TileCfg<16, 128, 128, 1, 4, 1, 6>>(g128, a, st); break;
      case 5: run_cfg<TileCfg<16, 64, 256, 1, 2, 2, 4>>(g128, a, st); break;
      case 6: run_cfg<TileCfg<16, 32, 256, 1, 1, 4, 4>>(g128, a, st); break;
      case 7: run_cfg<TileCfg<16, 64, 128, 1, 2, 2, 6>>(g128, a, st); break;
      case 8: run_cfg<TileCfg<16, 128, 256, 1, 2, 4, 4>>(g128, a, st); break;
      case 9: run_cfg<TileCfg<16, 32, 512, 1, 1, 4, 4>>(g128, a, st); break;
      case 10: run_cfg<TileCfg<16, 128, 512, 1, 4, 4, 3>>(g128, a, st); break;
      case 11: run_cfg<TileCfg<16, 64, 512, 1, 2, 4, 4>>(g128, a, st); break;
      case 12: run_cfg<TileCfg<16, 128, 256, 1, 4, 2, 3>>(g128, a, st); break;
      case 13: run_cfg<TileCfg<16, 32, 512, 1, 1, 4, 3>>(g128, a, st); break;
      // 32- and 64-row tiles, for M = 17-96 (where sm_90 runs the wgmma path 3 by default)
      case 14: run_cfg<TileCfg<64, 64, 128, 2, 2, 2, 4>>(g128, a, st); break;  // CfgMid
      case 15: run_cfg<TileCfg<32, 64, 512, 1, 2, 4, 3>>(g128, a, st); break;
      case 16: run_cfg<TileCfg<32, 64, 256, 1, 2, 4, 4>>(g128, a, st); break;
      case 17: run_cfg<TileCfg<32, 128, 256, 1, 4, 2, 4>>(g128, a, st); break;
      case 18: run_cfg<TileCfg<64, 64, 256, 1, 2, 4, 4>>(g128, a, st); break;
      case 19: run_cfg<TileCfg<64, 64, 256, 2, 2, 2, 4>>(g128, a, st); break;
      case 20: run_cfg<TileCfg<64, 128, 256, 1, 4, 2, 4>>(g128, a, st); break;
      case 21: run_cfg<TileCfg<64, 128, 128, 2, 4, 1, 4>>(g128, a, st); break;
#endif
      default: std::fprintf(stderr, "qoq_var_run: no configuration %d\n", cfg); return 1;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "qoq_var_run: %s\n", e.what());
    return 1;
  }
  return 0;
}
