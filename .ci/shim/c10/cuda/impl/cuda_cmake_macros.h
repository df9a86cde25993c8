#pragma once
// Build-check shim: the CPU torch wheel ships c10/cuda headers but not this
// generated one.  CUDA builds of torch have the real file; this is only on the
// include path of .ci/cuda_build_check.py.
#define C10_CUDA_BUILD_SHARED_LIBS
