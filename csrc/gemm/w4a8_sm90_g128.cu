// Instantiations of the Hopper wgmma W4A8 GEMM (g128); the kernel is described in
// w4a8_sm90.cuh.  Compiled for every arch; the kernel bodies exist only for sm_90a.
#include "gemm/w4a8_sm90.cuh"

namespace qoq {

void w4a8_gemm_sm90_g128(const W4A8Args& a, OutKind out, cudaStream_t stream) {
  switch (out) {
    case OutKind::F16: sm90::dispatch<true, OutKind::F16>(a, stream); break;
    case OutKind::BF16: sm90::dispatch<true, OutKind::BF16>(a, stream); break;
    case OutKind::I32: sm90::dispatch<true, OutKind::I32>(a, stream); break;
  }
}

}  // namespace qoq
