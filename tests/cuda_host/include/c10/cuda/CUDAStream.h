#pragma once
// Stand-in for c10/cuda/CUDAStream.h in the host build of pgext's CUDA
// kernels (tests/cuda_host): there is one stream, and launches complete
// before they return.
#include "../../../cuda_host.h"

namespace c10 {
namespace cuda {

struct CUDAStream {
  cudaStream_t stream() const {
    return nullptr;
  }
  operator cudaStream_t() const {
    return nullptr;
  }
};

inline CUDAStream getCurrentCUDAStream(signed char /*device_index*/ = -1) {
  return {};
}

}  // namespace cuda
}  // namespace c10
