// CUDA backend of pgext's ops: the host side shared with the CPU backend
// (backend_ops.h) around the launchers of pg_cuda_forward.cu,
// pg_cuda_backward.cu, pg_cuda_reduce.cu and pg_cuda_merge.cu. Same
// semantics, output dtypes and shapes as on CPU.
//
// Nothing here synchronizes with the device or depends on tensor data, so
// forward and backward can be captured in a CUDA graph. Out-of-range actions
// are caught by a device-side assert in the kernels (as nll_loss does), not by
// a host-side check that would need a synchronization.
#include "pg_cuda.h"

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace pgext {
namespace cuda {
namespace {

struct CudaBackend {
  using Guard = c10::cuda::CUDAGuard;

  static void check_actions(const RowInputs&) {}  // on the device, in the kernels

  static void forward(const RowInputs& in, ForwardRows& out) {
    launch_forward(in, out);
  }

  static void row_stats(const RowInputs& in, int64_t vocab_start, ShardRows& out) {
    launch_row_stats(in, vocab_start, out);
  }

  static void backward(const RowInputs& in, const BackwardRows& rows, at::Tensor& grad_logit) {
    launch_backward(in, rows, grad_logit);
  }

  static void merge_row_stats(ShardRows& running, const ShardRows& part) {
    launch_merge_row_stats(running, part);
  }

  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return at::empty(sizes, options);
  }

  static at::Tensor empty_logit_sized(int64_t rows, int64_t n, const at::TensorOptions& options) {
    return at::empty({rows, n}, options);
  }

  static at::Tensor upstream_grad(const at::Tensor& grad, int64_t rows, at::ScalarType acc) {
    return rows_of_grad(grad, rows, acc);
  }

  static std::pair<at::Tensor, at::Tensor> reduce(
      const at::Tensor& policy,
      const at::Tensor& entropy_weighted,
      Reduction red,
      at::IntArrayRef shape,
      at::ScalarType dtype) {
    return reduce_losses(policy, entropy_weighted, red, shape, dtype);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(pgext, CUDA, m) {
  PGEXT_REGISTER_BACKEND_OPS(m, CudaBackend);
}

}  // namespace cuda
}  // namespace pgext
