// Instantiations of the persistent Hopper wgmma W4A8 GEMM (chn, path 7); the kernels are
// described in w4a8_sm90_persistent.cuh (cooperative schedule, the default) and
// w4a8_sm90_pingpong.cuh (VLLM_QOQ_GEMM_P7_SCHEDULE=pingpong).  Compiled for every arch;
// the kernel bodies exist only for sm_90a.
#include "gemm/w4a8_sm90_pingpong.cuh"

namespace qoq {

// max_ctas: 0 = as the real ops run it (path 3 where the tiles fit in one wave), > 0 = the
// persistent kernel with at most that many CTAs (tests).
void w4a8_gemm_sm90p_chn(const W4A8Args& a, OutKind out, int max_ctas, cudaStream_t stream) {
  bool done = false;
  switch (out) {
    case OutKind::F16: done = sm90::dispatch_p7<false, OutKind::F16>(a, max_ctas, stream); break;
    case OutKind::BF16: done = sm90::dispatch_p7<false, OutKind::BF16>(a, max_ctas, stream); break;
    case OutKind::I32: done = sm90::dispatch_p7<false, OutKind::I32>(a, max_ctas, stream); break;
  }
  if (!done) w4a8_gemm_sm90_chn(a, out, /*cluster=*/false, stream);
}

}  // namespace qoq
