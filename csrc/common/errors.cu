// Error reporting for the kernel launchers (plain C++, no torch headers).
#include <stdexcept>
#include <string>

#include <cuda_runtime.h>

#include "common/launch.h"

namespace qoq {

void throw_cuda_error(cudaError_t err, const char* what, const char* file, int line) {
  throw std::runtime_error(std::string("vllm_qoq CUDA error: ") + cudaGetErrorString(err) +
                           " in " + what + " at " + file + ":" + std::to_string(line));
}

}  // namespace qoq
