// CPU kernels of pgext's ops: input preparation, the run-time choice of the
// kernel build for this CPU, and the deterministic batch reduction.
#include "pg_cpu_kernel.h"

#include <ATen/Dispatch.h>
#include <ATen/Version.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

namespace pgext {
namespace cpu {

namespace {

struct KernelSet {
  ForwardFn forward;
  RowStatsFn row_stats;
  BackwardFn backward;
  const char* (*name)();
};

// ATen's own choice (CPU features, capped by ATEN_CPU_CAPABILITY), as the
// string torch.backends.cpu.get_cpu_capability() reports; the enum-valued
// at::native::get_cpu_capability() is not exported from libtorch_cpu.
KernelSet select_kernels() {
#if defined(__x86_64__) || defined(_M_X64)
  const std::string cap = at::get_cpu_capability();
  if (cap.rfind("AVX512", 0) == 0) {
    return {&AVX512::forward, &AVX512::row_stats, &AVX512::backward, &AVX512::name};
  }
  if (cap.rfind("AVX2", 0) == 0) {
    return {&AVX2::forward, &AVX2::row_stats, &AVX2::backward, &AVX2::name};
  }
#endif
  return {&DEFAULT::forward, &DEFAULT::row_stats, &DEFAULT::backward, &DEFAULT::name};
}

// ATen reads the capability (and ATEN_CPU_CAPABILITY) once per process too.
const KernelSet& kernels() {
  static const KernelSet set = select_kernels();
  return set;
}

// Checked before any kernel reads a logit, so an out-of-range action can never
// address memory outside its row.
void check_actions(const RowInputs& in) {
  const int64_t* a = in.action.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < in.rows; ++r) {
    TORCH_CHECK_INDEX(
        a[r] >= 0 && a[r] < in.n,
        "pg_error: action ", a[r], " (sample ", r, ") is out of range for N = ", in.n,
        " classes; expected 0 <= action < ", in.n);
  }
}

// Sums per-sample terms in sample order in float64: the result depends neither
// on the thread count nor on how rows were split.
double ordered_sum(const at::Tensor& rows) {
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "pg_error_sum", [&] {
    const scalar_t* p = rows.const_data_ptr<scalar_t>();
    for (int64_t i = 0, n = rows.numel(); i < n; ++i) {
      total += static_cast<double>(p[i]);
    }
  });
  return total;
}

at::Tensor reduce(const at::Tensor& rows, Reduction red, at::IntArrayRef shape, at::ScalarType dtype) {
  if (red == Reduction::None) {
    return rows.view(shape).to(dtype);
  }
  double total = ordered_sum(rows);
  if (red == Reduction::Mean) {
    total /= static_cast<double>(rows.numel());  // 0 / 0 = NaN: the mean of an empty batch
  }
  return at::scalar_tensor(total, rows.options().dtype(dtype));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pg_error_forward_cpu(
    const at::Tensor& logit,
    const at::Tensor& action,
    const at::Tensor& ret,
    const std::optional<at::Tensor>& weight,
    c10::string_view reduction) {
  check_inputs(logit, action, ret, weight);
  const auto red = parse_reduction(reduction);
  const RowInputs in = flatten_rows(logit, action, ret, weight);
  check_actions(in);

  const auto stats = logit.options().dtype(acc_type(logit.scalar_type()));
  ForwardRows out{
      at::empty({in.rows}, stats), at::empty({in.rows}, stats),
      at::empty({in.rows}, stats), at::empty({in.rows}, stats)};
  kernels().forward(in, out);

  const auto dtype = loss_type(logit, ret, weight);
  return {
      reduce(out.policy, red, action.sizes(), dtype),
      reduce(out.entropy_weighted, red, action.sizes(), dtype),
      out.lse.view(action.sizes()),
      out.entropy.view(action.sizes())};
}

// The backward of pg_error (vocab_start = 0, every action in range) and of a
// class shard (pg_grad_from_stats: actions of other shards get no one-hot term
// and are never used to address memory).
at::Tensor backward_rows(
    const at::Tensor& grad_policy,
    const at::Tensor& grad_entropy,
    const at::Tensor& logit,
    const at::Tensor& action,
    const at::Tensor& ret,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& lse,
    const at::Tensor& entropy,
    c10::string_view reduction,
    std::optional<int64_t> shard_vocab_start) {
  check_inputs(logit, action, ret, weight);
  const auto red = parse_reduction(reduction);
  check_backward_inputs(grad_policy, grad_entropy, lse, entropy, action, red);
  const RowInputs in = flatten_rows(logit, action, ret, weight);
  if (!shard_vocab_start.has_value()) {
    check_actions(in);
  }

  const auto acc = acc_type(logit.scalar_type());
  const double inv_count =
      red == Reduction::Mean && in.rows > 0 ? 1.0 / static_cast<double>(in.rows) : 1.0;
  at::Tensor grad_logit = at::empty({in.rows, in.n}, logit.options());
  kernels().backward(
      in,
      rows_of_grad(grad_policy, in.rows, acc),
      rows_of_grad(grad_entropy, in.rows, acc),
      lse.reshape({in.rows}).to(acc).contiguous(),
      entropy.reshape({in.rows}).to(acc).contiguous(),
      inv_count,
      shard_vocab_start.value_or(0),
      grad_logit);
  return grad_logit.view(logit.sizes());
}

at::Tensor pg_error_backward_cpu(
    const at::Tensor& grad_policy,
    const at::Tensor& grad_entropy,
    const at::Tensor& logit,
    const at::Tensor& action,
    const at::Tensor& ret,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& lse,
    const at::Tensor& entropy,
    c10::string_view reduction) {
  return backward_rows(
      grad_policy, grad_entropy, logit, action, ret, weight, lse, entropy, reduction, std::nullopt);
}

at::Tensor pg_grad_from_stats_cpu(
    const at::Tensor& grad_policy,
    const at::Tensor& grad_entropy,
    const at::Tensor& logit,
    const at::Tensor& action,
    const at::Tensor& ret,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& lse,
    const at::Tensor& entropy,
    c10::string_view reduction,
    int64_t vocab_start) {
  return backward_rows(
      grad_policy, grad_entropy, logit, action, ret, weight, lse, entropy, reduction, vocab_start);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pg_row_stats_cpu(
    const at::Tensor& logit,
    const at::Tensor& action,
    int64_t vocab_start) {
  check_logit_and_action(logit, action);
  const RowInputs in = flatten_logit_and_action(logit, action);
  const auto stats = logit.options().dtype(acc_type(logit.scalar_type()));
  ShardRows out{
      at::empty({in.rows}, stats), at::empty({in.rows}, stats),
      at::empty({in.rows}, stats), at::empty({in.rows}, stats)};
  kernels().row_stats(in, vocab_start, out);
  const auto shape = action.sizes();
  return {out.max.view(shape), out.sum_exp.view(shape), out.shifted_sum.view(shape), out.action_logit.view(shape)};
}

}  // namespace

const char* active_capability() {
  return kernels().name();
}

TORCH_LIBRARY_IMPL(pgext, CPU, m) {
  m.impl("pg_error_forward", &pg_error_forward_cpu);
  m.impl("pg_error_backward", &pg_error_backward_cpu);
  m.impl("pg_row_stats", &pg_row_stats_cpu);
  m.impl("pg_grad_from_stats", &pg_grad_from_stats_cpu);
}

}  // namespace cpu
}  // namespace pgext
