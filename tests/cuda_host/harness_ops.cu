// Test ops of the host build of pgext's CUDA kernels (namespace
// pgext_cuda_host): the schedule, the batch reduction called directly (the
// real one and the test-only variant without its tree barrier), and small
// kernels that check the emulation itself: shuffle and vote semantics, and
// that barriers or shuffles in divergent code and missing barriers are caught.
// Written in CUDA, built through the same rewrite as csrc/core/cuda/*.cu.
#include "pg_cuda.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

namespace pgext {
namespace cuda_missing_barrier {
// build.py's missing_barrier_variant of pg_cuda_reduce.cu.
std::pair<at::Tensor, at::Tensor> reduce_losses(
    const at::Tensor& policy,
    const at::Tensor& entropy_weighted,
    Reduction reduction,
    at::IntArrayRef shape,
    at::ScalarType dtype);
}  // namespace cuda_missing_barrier
}  // namespace pgext

namespace {

// Each thread's view of a warp: indexed results per thread in out[t][k].
constexpr int kResults = 9;

__global__ void warp_ops_kernel(int64_t* out, int width) {
  const int t = static_cast<int>(threadIdx.x);
  const int lane = t % warpSize;
  const int v = t * 1000 + 7;
  int64_t* o = out + static_cast<int64_t>(t) * kResults;
  o[0] = __shfl_sync(0xffffffffu, v, (lane * 7 + 3) % 32, width);
  o[1] = __shfl_up_sync(0xffffffffu, v, 3, width);
  o[2] = __shfl_down_sync(0xffffffffu, v, 5, width);
  o[3] = __shfl_xor_sync(0xffffffffu, v, 5, width);
  o[4] = __ballot_sync(0xffffffffu, lane % 3 == 0);
  // Two halves of a warp in different branches, each shuffling on its own.
  if (lane < 16) {
    o[5] = __shfl_xor_sync(0x0000ffffu, v, 1);
  } else {
    o[5] = __shfl_xor_sync(0xffff0000u, v, 2);
  }
  // 8-byte values
  const double d = __shfl_xor_sync(0xffffffffu, static_cast<double>(v) + 0.5, 1);
  o[6] = static_cast<int64_t>(d * 2);
  o[7] = __syncthreads_count(t % 5 == 0);
  o[8] = __all_sync(0xffffffffu, t < 40) * 2 + __any_sync(0xffffffffu, t == 33);
}

// lanes 0-15 of every warp shuffle with lanes 16-31, which never come.
__global__ void divergent_shuffle_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x % 32 < 16) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  }
  out[threadIdx.x] = v;
}

// Half of the block waits at a barrier the other half never reaches.
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < blockDim.x / 2) {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

// Odd and even lanes call different shuffles with the same mask.
__global__ void mismatched_shuffle_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x % 2 == 0) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    v = __shfl_down_sync(0xffffffffu, v, 1);
  }
  out[threadIdx.x] = v;
}

// Thread t reads what thread t - 1 wrote to shared memory. Without the
// barrier this is a race that running the threads in order hides.
constexpr int kNeighbours = 256;
__global__ void neighbour_kernel(int64_t* out, int64_t salt, bool barrier) {
  __shared__ int64_t s[kNeighbours];
  const int t = static_cast<int>(threadIdx.x);
  s[t] = salt + t;
  if (barrier) {
    __syncthreads();
  }
  out[t] = s[t > 0 ? t - 1 : 0];
}

// Dynamic shared memory: written by thread t, read reversed after a barrier;
// out[threads] sums what was read (atomicAdd).
__global__ void dynamic_shared_kernel(int64_t* out) {
  extern __shared__ int64_t buf[];
  const int t = static_cast<int>(threadIdx.x);
  buf[t] = 100 + t + blockIdx.x;
  __syncthreads();
  atomicAdd(out + blockDim.x, buf[blockDim.x - 1 - t]);
  out[t] = buf[blockDim.x - 1 - t];
}

at::Tensor warp_ops(int64_t block, int64_t width) {
  at::Tensor out = at::zeros({block, kResults}, at::kLong);
  warp_ops_kernel<<<1, static_cast<unsigned int>(block), 0, c10::cuda::getCurrentCUDAStream()>>>(
      out.mutable_data_ptr<int64_t>(), static_cast<int>(width));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void launch_broken(c10::string_view which) {
  at::Tensor out = at::zeros({64}, at::kFloat);
  float* p = out.mutable_data_ptr<float>();
  if (which == "divergent_shuffle") {
    divergent_shuffle_kernel<<<2, 64>>>(p);
  } else if (which == "divergent_barrier") {
    divergent_barrier_kernel<<<1, 64>>>(p);
  } else if (which == "mismatched_shuffle") {
    mismatched_shuffle_kernel<<<1, 64>>>(p);
  } else if (which == "invalid_config") {
    divergent_barrier_kernel<<<1, 2048>>>(p);
  } else {
    TORCH_CHECK(false, "unknown broken kernel ", which);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor neighbours(int64_t salt, bool barrier) {
  at::Tensor out = at::empty({kNeighbours}, at::kLong);
  neighbour_kernel<<<1, kNeighbours>>>(out.mutable_data_ptr<int64_t>(), salt, barrier);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor dynamic_shared(int64_t threads) {
  at::Tensor out = at::zeros({threads + 1}, at::kLong);
  dynamic_shared_kernel<<<1, static_cast<unsigned int>(threads), threads * sizeof(int64_t)>>>(
      out.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> reduce(
    const at::Tensor& policy, const at::Tensor& entropy_weighted, c10::string_view reduction,
    at::ScalarType dtype, bool missing_barrier) {
  const auto red = pgext::parse_reduction(reduction);
  const auto shape = policy.sizes();
  auto result = missing_barrier
      ? pgext::cuda_missing_barrier::reduce_losses(policy, entropy_weighted, red, shape, dtype)
      : pgext::cuda::reduce_losses(policy, entropy_weighted, red, shape, dtype);
  return {result.first, result.second};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pgext_cuda_host, m) {
  m.def("set_schedule(int seed) -> ()", [](int64_t seed) { cuda_host::set_schedule(static_cast<uint64_t>(seed)); });
  m.def("launch_count() -> int", [] { return cuda_host::launch_count(); });
  m.def("reduce_losses(Tensor policy, Tensor entropy_weighted, str reduction, ScalarType dtype, "
        "bool missing_barrier=False) -> (Tensor, Tensor)", &reduce);
  m.def("warp_ops(int block, int width) -> Tensor", &warp_ops);
  m.def("launch_broken(str which) -> ()", &launch_broken);
  m.def("neighbours(int salt, bool barrier) -> Tensor", &neighbours);
  m.def("dynamic_shared(int threads) -> Tensor", &dynamic_shared);
}
