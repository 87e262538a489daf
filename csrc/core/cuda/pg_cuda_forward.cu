// Forward kernels of pg_error (and pg_row_stats) on CUDA: one online pass over
// each row of logits (math::online_update per thread, math::combine across
// threads), then the per-row outputs of pg_math.md (or the raw statistics).
// Memory traffic: the logits are read once; 4 accumulation-type values per row
// are written.
//
// Launch configurations (rows of n logits, V = 16 / sizeof(logit) per pack):
//   n <= kShortRow: blocks of 256 threads; a group of 4..32 lanes of one warp
//     per row (about two packs per lane), so a warp does 1..8 rows at a time.
//   n >  kShortRow: one block per row, 128..1024 threads (about eight packs
//     per thread); warps combine through shared memory.
// Both loop over rows with a grid stride, so any number of rows fits the grid.
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

constexpr int kShortRowThreads = 256;
constexpr int kMaxRowThreads = 1024;

// The rows of logits a forward kernel reads.
template <typename scalar_t>
struct RowsArgs {
  const scalar_t* logit;
  int64_t row_stride;
  int64_t n;
  int64_t rows;
  at::opmath_type<scalar_t> inv_t;  // 1 / temperature: each logit is read as x * inv_t
};

// What a forward kernel writes for a row, from the row's complete statistics
// (called by one thread per row).
//
// LossFinish (pg_error_forward): the per-row outputs of pg_math.md. An
// out-of-range action trips a device-side assert (unless the sample's weight
// is 0); where asserts are compiled out, the row's logit is not read and its
// policy term is NaN.
template <typename scalar_t, typename acc_t>
struct LossFinish {
  const int64_t* action;
  const acc_t* ret;
  int64_t ret_stride;  // 0: one return for every row
  const acc_t* weight;  // nullptr: weight 1
  double* lse;          // math::saved_lse
  acc_t* entropy;
  acc_t* policy;
  acc_t* entropy_weighted;
  acc_t inv_t;  // 1 / temperature

  __device__ void operator()(int64_t r, const scalar_t* x, int64_t n, math::RowStats<acc_t> st) const {
    const auto res = math::finish_row(st);
    const int64_t a = action[r];
    const bool in_range = a >= 0 && a < n;
    const acc_t w = weight != nullptr ? weight[r] : acc_t(1);
    // a sample of weight 0 (padding) may carry any action: neither checked nor read
    const bool ignored = w == acc_t(0);
    CUDA_KERNEL_ASSERT_MSG(in_range || ignored, "pgext: action out of range: expected 0 <= action < N");
    const acc_t x_a = in_range ? math::scaled_logit(static_cast<acc_t>(x[a]), inv_t)
        : ignored              ? acc_t(0)
                               : std::numeric_limits<acc_t>::quiet_NaN();
    lse[r] = math::saved_lse(st.m, res.log_s);
    entropy[r] = res.entropy;
    policy[r] = math::policy_term(math::log_prob(x_a, st.m, res.log_s), ret[r * ret_stride], w);
    entropy_weighted[r] = math::entropy_term(res.entropy, w);
  }
};

// StatsFinish (pg_row_stats): the raw statistics of a shard of classes
// [vocab_start, vocab_start + n) and the action's logit where it lies in the
// shard (0 elsewhere; an action of another shard reads nothing).
template <typename scalar_t, typename acc_t>
struct StatsFinish {
  const int64_t* action;
  int64_t vocab_start;
  acc_t* max;
  acc_t* sum_exp;
  acc_t* shifted_sum;
  acc_t* action_logit;
  acc_t inv_t;  // 1 / temperature

  __device__ void operator()(int64_t r, const scalar_t* x, int64_t n, math::RowStats<acc_t> st) const {
    const int64_t a = math::shard_column(action[r], vocab_start, n);
    max[r] = math::reported_max(st.m, st.s);
    sum_exp[r] = st.s;
    shifted_sum[r] = st.u;
    action_logit[r] = a >= 0 ? math::scaled_logit(static_cast<acc_t>(x[a]), inv_t) : acc_t(0);
  }
};

// Statistics of the logits of row x that belong to thread t of nt.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ math::RowStats<acc_t> thread_stats(
    const scalar_t* x, int64_t n, int64_t t, int64_t nt, acc_t inv_t) {
  math::RowStats<acc_t> st = math::empty_stats<acc_t>();
  for_each_logit<acc_t>(x, n, t, nt, [&](acc_t v) { math::online_update(st, math::scaled_logit(v, inv_t)); });
  return st;
}

// Short rows: `group` lanes per row. The loop bound is uniform over the warp
// (every lane takes part in the shuffles); lanes past the last row carry empty
// statistics.
template <typename scalar_t, typename acc_t, typename Finish>
__global__ void __launch_bounds__(kShortRowThreads)
    forward_short_rows(const RowsArgs<scalar_t> p, const Finish finish, const int group) {
  const int lane = static_cast<int>(threadIdx.x) % group;
  const int sub = static_cast<int>(threadIdx.x) % kWarpSize / group;
  const int rows_per_warp = kWarpSize / group;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarpSize;
  for (int64_t first = warp * rows_per_warp; first < p.rows; first += warps * rows_per_warp) {
    const int64_t r = first + sub;
    const bool active = r < p.rows;
    const scalar_t* x = p.logit + (active ? r : 0) * p.row_stride;
    math::RowStats<acc_t> st = math::empty_stats<acc_t>();
    if (active) {
      st = thread_stats<scalar_t, acc_t>(x, p.n, lane, group, p.inv_t);
    }
    st = group_combine(st, group);
    if (active && lane == 0) {
      finish(r, x, p.n, st);
    }
  }
}

// Long rows: one block per row; each warp combines its lanes by shuffles, the
// first warp combines the warps in warp order.
template <typename scalar_t, typename acc_t, typename Finish>
__global__ void __launch_bounds__(kMaxRowThreads)
    forward_long_rows(const RowsArgs<scalar_t> p, const Finish finish) {
  __shared__ math::RowStats<acc_t> warp_stats[kMaxRowThreads / kWarpSize];
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warps = static_cast<int>(blockDim.x) / kWarpSize;
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const scalar_t* x = p.logit + r * p.row_stride;
    math::RowStats<acc_t> st = thread_stats<scalar_t, acc_t>(x, p.n, threadIdx.x, blockDim.x, p.inv_t);
    st = group_combine(st, kWarpSize);
    if (lane == 0) {
      warp_stats[warp] = st;
    }
    __syncthreads();
    if (warp == 0) {
      st = lane < warps ? warp_stats[lane] : math::empty_stats<acc_t>();
      st = group_combine(st, kWarpSize);
      if (lane == 0) {
        finish(r, x, p.n, st);
      }
    }
    __syncthreads();  // warp_stats is reused by the next row
  }
}

// Threads per block for a long row: about eight packs per thread.
int long_row_threads(int64_t n, int vec) {
  const int64_t want = (n + 8 * vec - 1) / (8 * vec);
  int threads = 128;
  while (threads < kMaxRowThreads && threads < want) {
    threads *= 2;
  }
  return threads;
}

template <typename scalar_t, typename acc_t, typename Finish>
void launch_rows(const RowInputs& in, const Finish& finish) {
  RowsArgs<scalar_t> p;
  p.logit = in.logit.const_data_ptr<scalar_t>();
  p.row_stride = in.logit.stride(0);
  p.n = in.n;
  p.rows = in.rows;
  p.inv_t = static_cast<acc_t>(in.inv_temperature);
  constexpr int V = Pack<scalar_t>::kVec;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (p.n <= kShortRow) {
    const int group = short_row_group(p.n, V);
    forward_short_rows<scalar_t, acc_t, Finish>
        <<<grid_size(p.rows, kShortRowThreads / group), kShortRowThreads, 0, stream>>>(p, finish, group);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    forward_long_rows<scalar_t, acc_t, Finish>
        <<<grid_size(p.rows, 1), long_row_threads(p.n, V), 0, stream>>>(p, finish);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t>
void forward_typed(const RowInputs& in, ForwardRows& out) {
  using acc_t = at::opmath_type<scalar_t>;
  LossFinish<scalar_t, acc_t> f;
  f.action = in.action.const_data_ptr<int64_t>();
  f.ret = in.ret.const_data_ptr<acc_t>();
  f.ret_stride = in.ret_stride;
  f.weight = in.weight.defined() ? in.weight.const_data_ptr<acc_t>() : nullptr;
  f.lse = out.lse.mutable_data_ptr<double>();
  f.entropy = out.entropy.mutable_data_ptr<acc_t>();
  f.policy = out.policy.mutable_data_ptr<acc_t>();
  f.entropy_weighted = out.entropy_weighted.mutable_data_ptr<acc_t>();
  f.inv_t = static_cast<acc_t>(in.inv_temperature);
  launch_rows<scalar_t, acc_t>(in, f);
}

template <typename scalar_t>
void row_stats_typed(const RowInputs& in, int64_t vocab_start, ShardRows& out) {
  using acc_t = at::opmath_type<scalar_t>;
  StatsFinish<scalar_t, acc_t> f;
  f.action = in.action.const_data_ptr<int64_t>();
  f.vocab_start = vocab_start;
  f.max = out.max.mutable_data_ptr<acc_t>();
  f.sum_exp = out.sum_exp.mutable_data_ptr<acc_t>();
  f.shifted_sum = out.shifted_sum.mutable_data_ptr<acc_t>();
  f.action_logit = out.action_logit.mutable_data_ptr<acc_t>();
  f.inv_t = static_cast<acc_t>(in.inv_temperature);
  launch_rows<scalar_t, acc_t>(in, f);
}

}  // namespace

void launch_forward(const RowInputs& in, ForwardRows& out) {
  if (in.rows == 0) {
    return;  // no zero-size grid; n >= 1 is checked
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in.logit.scalar_type(), "pg_error_forward_cuda",
      [&] { forward_typed<scalar_t>(in, out); });
}

void launch_row_stats(const RowInputs& in, int64_t vocab_start, ShardRows& out) {
  if (in.rows == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, in.logit.scalar_type(), "pg_row_stats_cuda",
      [&] { row_stats_typed<scalar_t>(in, vocab_start, out); });
}

}  // namespace cuda
}  // namespace pgext
