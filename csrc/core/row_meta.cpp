// Meta kernels: output shapes and dtypes without data, on symbolic shapes, so
// that FakeTensor, torch.compile and torch.export trace pg_error. They run the
// same input checks as the real kernels.
#include "core/checks.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace pgext {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pg_error_forward_meta(
    const at::Tensor& logit,
    const at::Tensor& action,
    const at::Tensor& ret,
    const std::optional<at::Tensor>& weight,
    c10::string_view reduction,
    double temperature) {
  check_inputs(logit, action, ret, weight);
  const auto red = parse_reduction(reduction);
  check_temperature(temperature);
  const auto stats = logit.options().dtype(acc_type(logit.scalar_type()));
  const auto loss = logit.options().dtype(loss_type(logit, ret, weight));
  const auto loss_shape = red == Reduction::None ? action.sym_sizes() : c10::SymIntArrayRef{};
  return {
      at::empty_symint(loss_shape, loss),
      at::empty_symint(loss_shape, loss),
      at::empty_symint(action.sym_sizes(), logit.options().dtype(at::kDouble)),
      at::empty_symint(action.sym_sizes(), stats)};
}

at::Tensor pg_error_backward_meta(
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
  check_inputs(logit, action, ret, weight);
  check_backward_inputs(grad_policy, grad_entropy, lse, entropy, action, parse_reduction(reduction));
  check_temperature(temperature);
  return at::empty_symint(logit.sym_sizes(), logit.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pg_row_stats_meta(
    const at::Tensor& logit,
    const at::Tensor& action,
    int64_t vocab_start,
    double temperature) {
  check_vocab_start(vocab_start);
  check_logit_and_action(logit, action);
  check_temperature(temperature);
  const auto stats = logit.options().dtype(acc_type(logit.scalar_type()));
  const auto shape = action.sym_sizes();
  return {
      at::empty_symint(shape, stats), at::empty_symint(shape, stats),
      at::empty_symint(shape, stats), at::empty_symint(shape, stats)};
}

at::Tensor pg_grad_from_stats_meta(
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
  return pg_error_backward_meta(
      grad_policy, grad_entropy, logit, action, ret, weight, lse, entropy, reduction, temperature);
}

// The checks alone: the running statistics are updated in place.
void pg_merge_row_stats_meta(
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
}

}  // namespace

TORCH_LIBRARY_IMPL(pgext, Meta, m) {
  m.impl("pg_error_forward", &pg_error_forward_meta);
  m.impl("pg_error_backward", &pg_error_backward_meta);
  m.impl("pg_row_stats", &pg_row_stats_meta);
  m.impl("pg_grad_from_stats", &pg_grad_from_stats_meta);
  m.impl("pg_merge_row_stats_", &pg_merge_row_stats_meta);
}

}  // namespace pgext
