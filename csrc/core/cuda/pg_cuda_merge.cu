// pg_merge_row_stats_ on CUDA: one thread per row folds a part's statistics
// into the running ones with the host's formula (math::merge_part), so the
// fused output layer's merge over class slices is one launch per slice.
#include "pg_cuda.h"

#include "../row_math.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

namespace pgext {
namespace cuda {
namespace {

constexpr int kMergeThreads = 256;

template <typename part_t>
__global__ void merge_row_stats_kernel(
    double* m, double* s, double* u, double* xa, const part_t* pm, const part_t* ps, const part_t* pu,
    const part_t* pxa, int64_t rows) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < rows; r += stride) {
    math::merge_part(m[r], s[r], u[r], xa[r], pm[r], ps[r], pu[r], pxa[r]);
  }
}

}  // namespace

void launch_merge_row_stats(ShardRows& running, const ShardRows& part) {
  const int64_t rows = running.max.numel();
  if (rows == 0) {
    return;
  }
  // a grid-stride loop: the grid stays within CUDA's limit for any row count
  const int64_t blocks = std::min<int64_t>((rows + kMergeThreads - 1) / kMergeThreads, int64_t{1} << 16);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(part.max.scalar_type(), "pg_merge_row_stats_cuda", [&] {
    merge_row_stats_kernel<scalar_t><<<static_cast<unsigned>(blocks), kMergeThreads, 0, stream>>>(
        running.max.mutable_data_ptr<double>(), running.sum_exp.mutable_data_ptr<double>(),
        running.shifted_sum.mutable_data_ptr<double>(), running.action_logit.mutable_data_ptr<double>(),
        part.max.const_data_ptr<scalar_t>(), part.sum_exp.const_data_ptr<scalar_t>(),
        part.shifted_sum.const_data_ptr<scalar_t>(), part.action_logit.const_data_ptr<scalar_t>(), rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace pgext
