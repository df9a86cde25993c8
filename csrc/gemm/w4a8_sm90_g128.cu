// Instantiations of the Hopper wgmma W4A8 GEMM (g128); the kernel is described in
// w4a8_sm90.cuh.  Compiled for every arch; the kernel bodies exist only for sm_90a.
#include "gemm/w4a8_sm90.cuh"

namespace qoq {

// The CTA-pair (multicast) instantiations live in w4a8_sm90_g128_cluster.cu (compile time).
void w4a8_gemm_sm90_g128_cluster(const W4A8Args& a, OutKind out, cudaStream_t stream);

void w4a8_gemm_sm90_g128(const W4A8Args& a, OutKind out, bool cluster, cudaStream_t stream) {
  if (cluster) {
    w4a8_gemm_sm90_g128_cluster(a, out, stream);
    return;
  }
  switch (out) {
    case OutKind::F16: sm90::dispatch_bmt<true, OutKind::F16, false>(a, stream); break;
    case OutKind::BF16: sm90::dispatch_bmt<true, OutKind::BF16, false>(a, stream); break;
    case OutKind::I32: sm90::dispatch_bmt<true, OutKind::I32, false>(a, stream); break;
  }
}

}  // namespace qoq
