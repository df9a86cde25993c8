// Instantiations of the mma.sync W4A8 GEMM (chn); the kernel and its layouts are
// described in w4a8_sm80.cuh.
#include "gemm/w4a8_sm80.cuh"

namespace qoq {

void w4a8_gemm_sm80_chn(const W4A8Args& a, OutKind out, cudaStream_t stream) {
  switch (out) {
    case OutKind::F16: sm80::dispatch<false, OutKind::F16>(a, stream); break;
    case OutKind::BF16: sm80::dispatch<false, OutKind::BF16>(a, stream); break;
    case OutKind::I32: sm80::dispatch<false, OutKind::I32>(a, stream); break;
  }
}

// Split-K scratch: 16 MiB of int32, enough for every split configuration used.
int64_t w4a8_workspace_ints(int /*N*/) { return int64_t(1) << 22; }

}  // namespace qoq
