// Instantiations of the Hopper wgmma W4A8 GEMM (chn); the kernel is described in
// w4a8_sm90.cuh.  Compiled for every arch; the kernel bodies exist only for sm_90a.
#include "gemm/w4a8_sm90.cuh"

namespace qoq {

// The CTA-pair (multicast) instantiations live in w4a8_sm90_chn_cluster.cu (compile time).
void w4a8_gemm_sm90_chn_cluster(const W4A8Args& a, OutKind out, cudaStream_t stream);

void w4a8_gemm_sm90_chn(const W4A8Args& a, OutKind out, bool cluster, cudaStream_t stream) {
  if (cluster) {
    w4a8_gemm_sm90_chn_cluster(a, out, stream);
    return;
  }
  switch (out) {
    case OutKind::F16: sm90::dispatch_bmt<false, OutKind::F16, false>(a, stream); break;
    case OutKind::BF16: sm90::dispatch_bmt<false, OutKind::BF16, false>(a, stream); break;
    case OutKind::I32: sm90::dispatch_bmt<false, OutKind::I32, false>(a, stream); break;
  }
}

namespace sm90 {
__device__ int probe_result;
__global__ void probe_kernel(int* out) { *out = QOQ_HAS_WGMMA; }
}  // namespace sm90

bool w4a8_sm90_available(int device) {
  // A build without sm_90a machine code (e.g. TORCH_CUDA_ARCH_LIST=8.0 run through PTX JIT
  // on an H100) has empty sm90 kernels: ask the device which code it actually runs.
  int major = 0, minor = 0;
  QOQ_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  QOQ_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  if (major != 9 || minor != 0) return false;
  int* dptr = nullptr;
  QOQ_CUDA_CHECK(cudaGetSymbolAddress(reinterpret_cast<void**>(&dptr), sm90::probe_result));
  cudaStream_t s;
  QOQ_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  sm90::probe_kernel<<<1, 1, 0, s>>>(dptr);
  int host = 0;
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) err = cudaMemcpyAsync(&host, dptr, sizeof(int), cudaMemcpyDeviceToHost, s);
  if (err == cudaSuccess) err = cudaStreamSynchronize(s);
  cudaStreamDestroy(s);
  if (err == cudaErrorNoKernelImageForDevice) {
    cudaGetLastError();
    return false;
  }
  QOQ_CUDA_CHECK(err);
  return host == 1;
}

}  // namespace qoq
