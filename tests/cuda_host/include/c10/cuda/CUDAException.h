#pragma once
// Stand-in for c10/cuda/CUDAException.h in the host build of pgext's CUDA
// kernels (tests/cuda_host): the launch check throws the error of the last
// launch, a device-side assert included, as the c10::Error (RuntimeError in
// Python) that users of the GPU build see.
#include "../../../cuda_host.h"

#include <c10/util/Exception.h>

#include <string>

#define C10_CUDA_KERNEL_LAUNCH_CHECK()                          \
  do {                                                          \
    const std::string pgext_cuda_host_error_ = ::cuda_host::take_last_error(); \
    TORCH_CHECK(pgext_cuda_host_error_.empty(), pgext_cuda_host_error_); \
  } while (0)
