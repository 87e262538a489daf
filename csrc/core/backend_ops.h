#pragma once
// The host side of pgext's kernel ops, shared by the CPU and CUDA backends:
// checks, flattening to rows, output allocation and the output shapes, around
// a backend's kernels. A backend is a struct providing
//
//   Guard                       constructed from the logits' device (a
//                               CUDAGuard on CUDA, nothing on CPU)
//   check_actions(in)           on the host where that costs no device sync
//                               (CPU); the CUDA kernels assert on the device
//   forward(in, ForwardRows&)
//   row_stats(in, vocab_start, ShardRows&)
//   backward(in, BackwardRows, grad_logit)
//   reduce(policy, entropy_weighted, reduction, shape, dtype)
//                               -> the two losses, in a fixed order
//   empty(sizes, options)       -> an uninitialized tensor (per-row outputs)
//   empty_logit_sized(rows, n, options)
//                               -> the uninitialized (rows, n) gradient
//   merge_row_stats(running, part)
//                               folds a part's row statistics into running
//                               float64 ones (pg_merge_row_stats_)
//   upstream_grad(grad, rows, acc)
//                               -> a loss's gradient as BackwardRows holds it
//
// so that both backends have the very same semantics, shapes and dtypes.
#include "core/checks.h"

#include <ATen/ops/empty.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>
#include <utility>

namespace pgext {

// Per-row outputs of a forward kernel, all (rows,) in the accumulation dtype
// but lse.
struct ForwardRows {
  at::Tensor lse;               // log-sum-exp, float64 (math::saved_lse): saved for backward
  at::Tensor entropy;           // entropy: saved for backward
  at::Tensor policy;            // -w * R * log_prob, before reduction
  at::Tensor entropy_weighted;  // w * H, before reduction
};

// Backward's inputs besides the logits, actions, returns and weights.
struct BackwardRows {
  // Backend::upstream_grad: rows_of_grad's result (0-d or (rows,), in the
  // accumulation dtype, read with grad_row_stride), or on CPU the 0-d
  // gradient as given, of any floating dtype.
  at::Tensor grad_policy;
  at::Tensor grad_entropy;
  at::Tensor lse;           // (rows,) contiguous, float64
  at::Tensor entropy;       // (rows,) contiguous, accumulation dtype
  double inv_count;         // 1 / rows for reduction 'mean', else 1
  // pg_grad_from_stats: the row holds classes [vocab_start, vocab_start + n)
  // and an action outside them adds no one-hot term. pg_error: none, and
  // every action lies in [0, n).
  std::optional<int64_t> shard_vocab_start;
};

// Per-row statistics of a shard of classes (pg_row_stats), all (rows,) in the
// accumulation dtype.
struct ShardRows {
  at::Tensor max;
  at::Tensor sum_exp;
  at::Tensor shifted_sum;
  at::Tensor action_logit;
};

template <typename Backend>
struct BackendOps {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
      const at::Tensor& logit,
      const at::Tensor& action,
      const at::Tensor& ret,
      const std::optional<at::Tensor>& weight,
      c10::string_view reduction,
      double temperature) {
    check_inputs(logit, action, ret, weight);
    const auto red = parse_reduction(reduction);
    check_temperature(temperature);
    const typename Backend::Guard guard(logit.device());
    const RowInputs in = flatten_rows(logit, action, ret, weight, temperature);
    Backend::check_actions(in);

    const auto stats = stats_options(logit);
    ForwardRows out{
        Backend::empty({in.rows}, logit.options().dtype(at::kDouble)), Backend::empty({in.rows}, stats),
        Backend::empty({in.rows}, stats), Backend::empty({in.rows}, stats)};
    Backend::forward(in, out);
    auto [policy, entropy] = Backend::reduce(
        out.policy, out.entropy_weighted, red, action.sizes(), loss_type(logit, ret, weight));
    if (action.dim() == 1) {
      return {policy, entropy, out.lse, out.entropy};  // (rows,) already
    }
    return {policy, entropy, out.lse.view(action.sizes()), out.entropy.view(action.sizes())};
  }

  static at::Tensor backward(
      const at::Tensor& grad_policy,
      const at::Tensor& grad_entropy,
      const at::Tensor& logit,
      const at::Tensor& action,
      const at::Tensor& ret,
      const std::optional<at::Tensor>& weight,
      const at::Tensor& lse,
      const at::Tensor& entropy,
      c10::string_view reduction,
      double temperature) {
    return backward_rows(
        grad_policy, grad_entropy, logit, action, ret, weight, lse, entropy, reduction, temperature, std::nullopt);
  }

  static at::Tensor grad_from_stats(
      const at::Tensor& grad_policy,
      const at::Tensor& grad_entropy,
      const at::Tensor& logit,
      const at::Tensor& action,
      const at::Tensor& ret,
      const std::optional<at::Tensor>& weight,
      const at::Tensor& lse,
      const at::Tensor& entropy,
      c10::string_view reduction,
      int64_t vocab_start,
      double temperature) {
    check_vocab_start(vocab_start);
    return backward_rows(
        grad_policy, grad_entropy, logit, action, ret, weight, lse, entropy, reduction, temperature, vocab_start);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> row_stats(
      const at::Tensor& logit,
      const at::Tensor& action,
      int64_t vocab_start,
      double temperature) {
    check_logit_and_action(logit, action);
    check_vocab_start(vocab_start);
    check_temperature(temperature);
    const typename Backend::Guard guard(logit.device());
    const RowInputs in = flatten_logit_and_action(logit, action, temperature);
    const auto stats = stats_options(logit);
    ShardRows out{
        Backend::empty({in.rows}, stats), Backend::empty({in.rows}, stats),
        Backend::empty({in.rows}, stats), Backend::empty({in.rows}, stats)};
    Backend::row_stats(in, vocab_start, out);
    const auto shape = action.sizes();
    return {out.max.view(shape), out.sum_exp.view(shape), out.shifted_sum.view(shape),
            out.action_logit.view(shape)};
  }

  static void merge_row_stats(
      const at::Tensor& max,
      const at::Tensor& sum_exp,
      const at::Tensor& shifted_sum,
      const at::Tensor& action_logit,
      const at::Tensor& part_max,
      const at::Tensor& part_sum_exp,
      const at::Tensor& part_shifted_sum,
      const at::Tensor& part_action_logit) {
    check_merge_row_stats(
        {max, sum_exp, shifted_sum, action_logit}, {part_max, part_sum_exp, part_shifted_sum, part_action_logit});
    const typename Backend::Guard guard(max.device());
    ShardRows running{max, sum_exp, shifted_sum, action_logit};
    Backend::merge_row_stats(running, ShardRows{part_max, part_sum_exp, part_shifted_sum, part_action_logit});
  }

 private:
  static at::TensorOptions stats_options(const at::Tensor& logit) {
    return logit.options().dtype(acc_type(logit.scalar_type()));
  }

  // The backward of pg_error (no shard: every action in range) and of a class
  // shard (pg_grad_from_stats: an action of another shard gets no one-hot
  // term and never addresses memory).
  static at::Tensor backward_rows(
      const at::Tensor& grad_policy,
      const at::Tensor& grad_entropy,
      const at::Tensor& logit,
      const at::Tensor& action,
      const at::Tensor& ret,
      const std::optional<at::Tensor>& weight,
      const at::Tensor& lse,
      const at::Tensor& entropy,
      c10::string_view reduction,
      double temperature,
      std::optional<int64_t> shard_vocab_start) {
    check_inputs(logit, action, ret, weight);
    const auto red = parse_reduction(reduction);
    check_backward_inputs(grad_policy, grad_entropy, lse, entropy, action, red);
    check_temperature(temperature);
    const typename Backend::Guard guard(logit.device());
    const RowInputs in = flatten_rows(logit, action, ret, weight, temperature);
    if (!shard_vocab_start.has_value()) {
      Backend::check_actions(in);
    }

    const auto acc = acc_type(logit.scalar_type());
    const double inv_count =
        red == Reduction::Mean && in.rows > 0 ? 1.0 / static_cast<double>(in.rows) : 1.0;
    const BackwardRows rows{
        Backend::upstream_grad(grad_policy, in.rows, acc),
        Backend::upstream_grad(grad_entropy, in.rows, acc),
        as_rows(lse, in.rows, at::kDouble),
        as_rows(entropy, in.rows, acc),
        inv_count,
        shard_vocab_start};
    at::Tensor grad_logit = Backend::empty_logit_sized(in.rows, in.n, logit.options());
    Backend::backward(in, rows, grad_logit);
    return logit.dim() == 2 ? grad_logit : grad_logit.view(logit.sizes());
  }
};

// Registers a backend's kernels for every kernel op of the library.
// (pg_merge_row_stats_ has no logits: BackendOps::merge_row_stats.)
#define PGEXT_REGISTER_BACKEND_OPS(m, Backend)                                  \
  do {                                                                        \
    (m).impl("pg_error_forward", &::pgext::BackendOps<Backend>::forward);      \
    (m).impl("pg_error_backward", &::pgext::BackendOps<Backend>::backward);    \
    (m).impl("pg_row_stats", &::pgext::BackendOps<Backend>::row_stats);        \
    (m).impl("pg_grad_from_stats", &::pgext::BackendOps<Backend>::grad_from_stats); \
    (m).impl("pg_merge_row_stats_", &::pgext::BackendOps<Backend>::merge_row_stats); \
  } while (0)

}  // namespace pgext
