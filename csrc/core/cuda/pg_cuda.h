#pragma once
// Host-side interface between the CUDA files of pg_error: pg_cuda.cu prepares
// the inputs (the checks and flattening shared with the CPU backend) and calls
// these launchers, each defined next to its kernels.
//
// Every launcher enqueues on the current stream of the current device (the
// caller holds a CUDAGuard on the logits' device), never synchronizes and
// launches nothing when there is nothing to do.
#include "../backend_ops.h"

#include <ATen/core/Tensor.h>

namespace pgext {
namespace cuda {

// pg_cuda_forward.cu: one pass over the logits, one warp (or part of one) per
// row of N <= kShortRow logits, one block per longer row.
void launch_forward(const RowInputs& in, ForwardRows& out);

// pg_cuda_forward.cu: the forward pass of launch_forward, writing the raw
// statistics of classes [vocab_start, vocab_start + n) instead of the losses.
void launch_row_stats(const RowInputs& in, int64_t vocab_start, ShardRows& out);

// pg_cuda_backward.cu: one read of the logits and one write of grad_logit,
// (rows, n) contiguous in the logits' dtype. Without a shard (pg_error) every
// action must lie in [0, n): a device-side assert checks it.
void launch_backward(const RowInputs& in, const BackwardRows& rows, at::Tensor& grad_logit);

// pg_cuda_merge.cu: running float64 row statistics updated in place with a
// part's (float32 or float64), one thread per row.
void launch_merge_row_stats(ShardRows& running, const ShardRows& part);

// pg_cuda_reduce.cu: the two losses from the per-row terms: 'none' casts them
// to `dtype` in the shape of action; 'mean' and 'sum' reduce them in a fixed
// order (one block, float64 partial sums, no atomics) into 0-d tensors.
std::pair<at::Tensor, at::Tensor> reduce_losses(
    const at::Tensor& policy,
    const at::Tensor& entropy_weighted,
    Reduction reduction,
    at::IntArrayRef shape,
    at::ScalarType dtype);

}  // namespace cuda
}  // namespace pgext
