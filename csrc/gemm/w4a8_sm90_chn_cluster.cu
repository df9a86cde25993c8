// Instantiations of the Hopper wgmma W4A8 GEMM (chn) with CTA pairs sharing the activation
// tile through TMA multicast; see w4a8_sm90.cuh.
#include "gemm/w4a8_sm90.cuh"

namespace qoq {

void w4a8_gemm_sm90_chn_cluster(const W4A8Args& a, OutKind out, cudaStream_t stream) {
  switch (out) {
    case OutKind::F16: sm90::dispatch_bmt<false, OutKind::F16, true>(a, stream); break;
    case OutKind::BF16: sm90::dispatch_bmt<false, OutKind::BF16, true>(a, stream); break;
    case OutKind::I32: sm90::dispatch_bmt<false, OutKind::I32, true>(a, stream); break;
  }
}

}  // namespace qoq
