// The batch reduction of pg_error on CUDA: both losses in one launch of one
// block. Thread t sums the rows t, t + 512, ... in float64, then a fixed
// shared-memory tree adds the 512 partial sums. The order depends on the
// number of rows only: the result is bitwise reproducible run to run, and no
// float atomics are involved. One block suffices: it reads 2 x rows values,
// next to the rows x N logits that the forward kernel reads.
#include "pg_cuda.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <type_traits>

namespace pgext {
namespace cuda {
namespace {

constexpr int kReduceThreads = 512;

template <typename out_t>
__device__ __forceinline__ out_t from_double(double v) {
  if constexpr (std::is_same_v<out_t, double>) {
    return v;
  } else {
    return static_cast<out_t>(static_cast<float>(v));
  }
}

// Writes sum (or mean, for mean != 0) of policy[0, rows) and of
// entropy_weighted[0, rows). With rows == 0: 0 for the sum, 0 / 0 = NaN for
// the mean, as on CPU.
template <typename acc_t, typename out_t>
__global__ void __launch_bounds__(kReduceThreads) reduce_losses_kernel(
    const acc_t* __restrict__ policy,
    const acc_t* __restrict__ entropy_weighted,
    int64_t rows,
    bool mean,
    out_t* __restrict__ policy_out,
    out_t* __restrict__ entropy_out) {
  __shared__ double partial[2][kReduceThreads];
  const int t = static_cast<int>(threadIdx.x);
  double sp = 0;
  double se = 0;
  for (int64_t i = t; i < rows; i += kReduceThreads) {
    sp += static_cast<double>(policy[i]);
    se += static_cast<double>(entropy_weighted[i]);
  }
  partial[0][t] = sp;
  partial[1][t] = se;
  __syncthreads();
  for (int half = kReduceThreads / 2; half > 0; half /= 2) {
    if (t < half) {
      partial[0][t] += partial[0][t + half];
      partial[1][t] += partial[1][t + half];
    }
    __syncthreads();
  }
  if (t == 0) {
    double p = partial[0][0];
    double e = partial[1][0];
    if (mean) {
      const auto count = static_cast<double>(rows);
      p /= count;
      e /= count;
    }
    *policy_out = from_double<out_t>(p);
    *entropy_out = from_double<out_t>(e);
  }
}

template <typename acc_t>
void reduce_typed(
    const at::Tensor& policy,
    const at::Tensor& entropy_weighted,
    bool mean,
    at::Tensor& policy_out,
    at::Tensor& entropy_out) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, policy_out.scalar_type(), "pg_error_reduce_cuda", [&] {
        reduce_losses_kernel<acc_t, scalar_t><<<1, kReduceThreads, 0, stream>>>(
            policy.const_data_ptr<acc_t>(), entropy_weighted.const_data_ptr<acc_t>(), policy.numel(), mean,
            policy_out.mutable_data_ptr<scalar_t>(), entropy_out.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace

std::pair<at::Tensor, at::Tensor> reduce_losses(
    const at::Tensor& policy,
    const at::Tensor& entropy_weighted,
    Reduction reduction,
    at::IntArrayRef shape,
    at::ScalarType dtype) {
  if (reduction == Reduction::None) {
    return {policy.view(shape).to(dtype), entropy_weighted.view(shape).to(dtype)};
  }
  // Two separate 0-d tensors: the op's outputs must not share storage.
  const auto options = policy.options().dtype(dtype);
  at::Tensor policy_out = at::empty({}, options);
  at::Tensor entropy_out = at::empty({}, options);
  const bool mean = reduction == Reduction::Mean;
  if (policy.scalar_type() == at::kDouble) {
    reduce_typed<double>(policy, entropy_weighted, mean, policy_out, entropy_out);
  } else {
    reduce_typed<float>(policy, entropy_weighted, mean, policy_out, entropy_out);
  }
  return {policy_out, entropy_out};
}

}  // namespace cuda
}  // namespace pgext
