// Instantiations of the mma.sync W4A8 GEMM (g128); the kernel and its layouts are
// described in w4a8_sm80.cuh.
#include "gemm/w4a8_sm80.cuh"

namespace qoq {

void w4a8_gemm_sm80_g128(const W4A8Args& a, OutKind out, cudaStream_t stream) {
  switch (out) {
    case OutKind::F16: sm80::dispatch<true, OutKind::F16>(a, stream); break;
    case OutKind::BF16: sm80::dispatch<true, OutKind::BF16>(a, stream); break;
    case OutKind::I32: sm80::dispatch<true, OutKind::I32>(a, stream); break;
  }
}

}  // namespace qoq
