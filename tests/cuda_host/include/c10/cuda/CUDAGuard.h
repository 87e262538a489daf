#pragma once
// Stand-in for c10/cuda/CUDAGuard.h in the host build of pgext's CUDA kernels
// (tests/cuda_host): the emulated device is the CPU, so there is no current
// device to set.
#include "../../../cuda_host.h"

#include <c10/core/Device.h>

namespace c10 {
namespace cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device /*device*/) {}
  explicit CUDAGuard(c10::DeviceIndex /*index*/) {}
};

struct OptionalCUDAGuard {
  OptionalCUDAGuard() = default;
  explicit OptionalCUDAGuard(std::optional<c10::Device> /*device*/) {}
};

}  // namespace cuda
}  // namespace c10
