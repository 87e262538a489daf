// CUDA kernels of pgext's ops: input preparation (the checks and flattening
// shared with the CPU backend), output allocation and the launches. Same
// semantics, output dtypes and shapes as cpu/pg_cpu.cpp; the kernels live in
// pg_cuda_forward.cu, pg_cuda_backward.cu and pg_cuda_reduce.cu.
//
// Nothing here synchronizes with the device or depends on tensor data, so
// forward and backward can be captured in a CUDA graph. Out-of-range actions
// are caught by a device-side assert in the kernels (as nll_loss does), not by
// a host-side check that would need a synchronization.
#include "pg_cuda.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace pgext {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pg_error_forward_cuda(
    const at::Tensor& logit,
    const at::Tensor& action,
    const at::Tensor& ret,
    const std::optional<at::Tensor>& weight,
    c10::string_view reduction) {
  check_inputs(logit, action, ret, weight);
  const auto red = parse_reduction(reduction);
  const c10::cuda::CUDAGuard device_guard(logit.device());
  const RowInputs in = flatten_rows(logit, action, ret, weight);

  const auto stats = logit.options().dtype(acc_type(logit.scalar_type()));
  ForwardRows out{
      at::empty({in.rows}, stats), at::empty({in.rows}, stats),
      at::empty({in.rows}, stats), at::empty({in.rows}, stats)};
  launch_forward(in, out);

  auto [policy, entropy] =
      reduce_losses(out.policy, out.entropy_weighted, red, action.sizes(), loss_type(logit, ret, weight));
  return {policy, entropy, out.lse.view(action.sizes()), out.entropy.view(action.sizes())};
}

at::Tensor pg_error_backward_cuda(
    const at::Tensor& grad_policy,
    const at::Tensor& grad_entropy,
    const at::Tensor& logit,
    const at::Tensor& action,
    const at::Tensor& ret,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& lse,
    const at::Tensor& entropy,
    c10::string_view reduction) {
  check_inputs(logit, action, ret, weight);
  const auto red = parse_reduction(reduction);
  check_backward_inputs(grad_policy, grad_entropy, lse, entropy, action, red);
  const c10::cuda::CUDAGuard device_guard(logit.device());
  const RowInputs in = flatten_rows(logit, action, ret, weight);

  const auto acc = acc_type(logit.scalar_type());
  const double inv_count =
      red == Reduction::Mean && in.rows > 0 ? 1.0 / static_cast<double>(in.rows) : 1.0;
  at::Tensor grad_logit = at::empty({in.rows, in.n}, logit.options());
  launch_backward(
      in,
      rows_of_grad(grad_policy, in.rows, acc),
      rows_of_grad(grad_entropy, in.rows, acc),
      lse.reshape({in.rows}).to(acc).contiguous(),
      entropy.reshape({in.rows}).to(acc).contiguous(),
      inv_count,
      grad_logit);
  return grad_logit.view(logit.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(pgext, CUDA, m) {
  m.impl("pg_error_forward", &pg_error_forward_cuda);
  m.impl("pg_error_backward", &pg_error_backward_cuda);
}

}  // namespace cuda
}  // namespace pgext
