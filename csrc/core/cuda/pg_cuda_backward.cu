// Backward kernel of pg_error on CUDA: grad_logit from the logits and the
// per-row lse and entropy saved by forward (math::grad_coef per row,
// math::grad_elem per element, the action's entry less c_policy). Memory
// traffic: one read of the logits, one write of the gradient.
//
// Launch configuration (rows of n logits, V = 16 / sizeof(logit) per pack),
// blocks of 256 threads:
//   n <= kShortRow: a group of 4..32 lanes per row, as in forward;
//   n >  kShortRow: a row is split into parts of about 8 packs per thread,
//     one block (256 threads) per part, so that a few long rows still fill
//     the GPU. There is no reduction, so the split changes no result.
// Each element's gradient depends on that element and the row's scalars only:
// the result is bitwise independent of the launch configuration.
#include "pg_cuda.h"
#include "pg_cuda_rows.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

namespace pgext {
namespace cuda {
namespace {

constexpr int kBackwardThreads = 256;
constexpr int64_t kPacksPerThread = 8;

template <typename scalar_t, typename acc_t>
struct BackwardArgs {
  const scalar_t* logit;
  int64_t row_stride;
  int64_t n;
  int64_t rows;
  const int64_t* action;
  const acc_t* ret;
  int64_t ret_stride;  // 0: one return for every row
  const acc_t* weight;  // nullptr: weight 1
  const acc_t* grad_policy;
  int64_t grad_policy_stride;  // 0 for a reduced loss's scalar gradient
  const acc_t* grad_entropy;
  int64_t grad_entropy_stride;
  const double* lse;  // math::saved_lse, split per row
  const acc_t* entropy;
  acc_t inv_count;      // 1 / C and 1 / temperature (math::grad_scale)
  acc_t inv_t;          // 1 / temperature: each logit is read as x * inv_t
  int64_t vocab_start;  // first class of the row (0 unless a shard)
  bool shard;           // actions outside the row are legal (no one-hot term)
  scalar_t* grad;  // (rows, n) contiguous
  int group;       // threads per row part, a power of two dividing the block
  int64_t splits;  // parts per row
};

// The gradient of elements t, t + nt, ... of row r. `reports` picks the one
// thread per row that checks the action. An out-of-range action trips a
// device-side assert (unless the sample's weight is 0); where asserts are
// compiled out, the row's gradient is NaN and no element outside the row is
// touched.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void backward_row(
    const BackwardArgs<scalar_t, acc_t>& p, int64_t r, int64_t t, int64_t nt, bool reports) {
  using P = Pack<scalar_t>;
  constexpr int V = P::kVec;
  const int64_t n = p.n;
  const int64_t a = math::shard_column(p.action[r], p.vocab_start, n);
  const acc_t w = p.weight != nullptr ? p.weight[r] : acc_t(1);
  // outside the row: another shard's action, or a sample of weight 0 (padding, any action)
  const bool in_range = a >= 0 || p.shard || w == acc_t(0);
  if (reports) {
    CUDA_KERNEL_ASSERT_MSG(in_range, "pgext: action out of range: expected 0 <= action < N");
  }
  auto c = math::grad_coef(
      p.grad_policy[r * p.grad_policy_stride], p.grad_entropy[r * p.grad_entropy_stride],
      p.ret[r * p.ret_stride], w, p.entropy[r], p.inv_count);
  if (!in_range) {
    c.k = std::numeric_limits<acc_t>::quiet_NaN();
    c.c_entropy = c.k;
  }
  const auto lse = math::split_lse<acc_t>(p.lse[r]);
  // the same for every thread of the row: no divergence
  const bool policy_only = c.c_entropy == acc_t(0);
  const auto grad_at = [&](scalar_t x, int64_t j) {
    const acc_t z = math::scaled_logit(static_cast<acc_t>(x), p.inv_t);
    acc_t g = policy_only ? math::grad_elem_policy_only(z, lse, c) : math::grad_elem(z, lse, c);
    if (j == a) {
      g -= c.c_policy;
    }
    return static_cast<scalar_t>(g);
  };

  const scalar_t* __restrict__ x = p.logit + r * p.row_stride;
  scalar_t* __restrict__ g = p.grad + r * n;
  const int64_t head = head_len(x, n);
  if (head != head_len(g, n)) {
    // The logits' row and the gradient's row are aligned differently (a row
    // stride that is not a multiple of 16 bytes / n): element by element,
    // still coalesced.
    for (int64_t j = t; j < n; j += nt) {
      g[j] = grad_at(x[j], j);
    }
    return;
  }
  for (int64_t j = t; j < head; j += nt) {
    g[j] = grad_at(x[j], j);
  }
  const int64_t nvec = (n - head) / V;
  const P* __restrict__ xv = reinterpret_cast<const P*>(x + head);
  P* __restrict__ gv = reinterpret_cast<P*>(g + head);
  const auto grad_pack = [&](const P& in, int64_t i) {
    P out;
    const int64_t j0 = head + i * V;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      out.v[k] = grad_at(in.v[k], j0 + k);
    }
    return out;
  };
  int64_t i = t;
  for (; i + nt < nvec; i += 2 * nt) {
    const P in0 = xv[i];
    const P in1 = xv[i + nt];
    gv[i] = grad_pack(in0, i);
    gv[i + nt] = grad_pack(in1, i + nt);
  }
  if (i < nvec) {
    gv[i] = grad_pack(xv[i], i);
  }
  for (int64_t j = head + nvec * V + t; j < n; j += nt) {
    g[j] = grad_at(x[j], j);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBackwardThreads) backward_rows(const BackwardArgs<scalar_t, acc_t> p) {
  const int lane = static_cast<int>(threadIdx.x) % p.group;
  const int64_t items = p.rows * p.splits;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x / p.group;
  for (int64_t item = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / p.group; item < items;
       item += stride) {
    const int64_t r = item / p.splits;
    const int64_t part = item - r * p.splits;
    backward_row(p, r, part * p.group + lane, p.splits * p.group, part == 0 && lane == 0);
  }
}

template <typename scalar_t>
void backward_typed(const RowInputs& in, const BackwardRows& rows, at::Tensor& grad_logit) {
  using acc_t = at::opmath_type<scalar_t>;
  BackwardArgs<scalar_t, acc_t> p;
  p.logit = in.logit.const_data_ptr<scalar_t>();
  p.row_stride = in.logit.stride(0);
  p.n = in.n;
  p.rows = in.rows;
  p.action = in.action.const_data_ptr<int64_t>();
  p.ret = in.ret.const_data_ptr<acc_t>();
  p.ret_stride = in.ret_stride;
  p.weight = in.weight.defined() ? in.weight.const_data_ptr<acc_t>() : nullptr;
  p.grad_policy = rows.grad_policy.const_data_ptr<acc_t>();
  p.grad_policy_stride = grad_row_stride(rows.grad_policy);
  p.grad_entropy = rows.grad_entropy.const_data_ptr<acc_t>();
  p.grad_entropy_stride = grad_row_stride(rows.grad_entropy);
  p.lse = rows.lse.const_data_ptr<double>();
  p.entropy = rows.entropy.const_data_ptr<acc_t>();
  p.inv_count = math::grad_scale<acc_t>(rows.inv_count, in.inv_temperature);
  p.inv_t = static_cast<acc_t>(in.inv_temperature);
  p.vocab_start = rows.shard_vocab_start.value_or(0);
  p.shard = rows.shard_vocab_start.has_value();
  p.grad = grad_logit.mutable_data_ptr<scalar_t>();

  constexpr int V = Pack<scalar_t>::kVec;
  if (p.n <= kShortRow) {
    p.group = short_row_group(p.n, V);
    p.splits = 1;
  } else {
    p.group = kBackwardThreads;
    const int64_t packs = (p.n + V - 1) / V;
    const int64_t per_part = kBackwardThreads * kPacksPerThread;
    p.splits = (packs + per_part - 1) / per_part;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  backward_rows<scalar_t, acc_t>
      <<<grid_size(p.rows * p.splits * p.group, kBackwardThreads), kBackwardThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_backward(const RowInputs& in, const BackwardRows& rows, at::Tensor& grad_logit) {
  if (in.rows == 0) {
    return;  // nothing to write; no zero-size grid
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in.logit.scalar_type(), "pg_error_backward_cuda", [&] {
        backward_typed<scalar_t>(in, rows, grad_logit);
      });
}

}  // namespace cuda
}  // namespace pgext
