#include "core/ops.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace pgext {
namespace ops {

std::tuple<at::Tensor, at::Tensor> pg_error(
    const at::Tensor& logit,
    const at::Tensor& action,
    const at::Tensor& ret,
    const std::optional<at::Tensor>& weight,
    c10::string_view reduction,
    double temperature) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pgext::pg_error", "")
                       .typed<decltype(pg_error)>();
  return op.call(logit, action, ret, weight, reduction, temperature);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pg_error_forward(
    const at::Tensor& logit,
    const at::Tensor& action,
    const at::Tensor& ret,
    const std::optional<at::Tensor>& weight,
    c10::string_view reduction,
    double temperature) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pgext::pg_error_forward", "")
                       .typed<decltype(pg_error_forward)>();
  return op.call(logit, action, ret, weight, reduction, temperature);
}

at::Tensor pg_error_backward(
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
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pgext::pg_error_backward", "")
                       .typed<decltype(pg_error_backward)>();
  return op.call(grad_policy, grad_entropy, logit, action, ret, weight, lse, entropy, reduction, temperature);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pg_row_stats(
    const at::Tensor& logit,
    const at::Tensor& action,
    int64_t vocab_start,
    double temperature) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pgext::pg_row_stats", "")
                       .typed<decltype(pg_row_stats)>();
  return op.call(logit, action, vocab_start, temperature);
}

void pg_merge_row_stats_(
    const at::Tensor& max,
    const at::Tensor& sum_exp,
    const at::Tensor& shifted_sum,
    const at::Tensor& action_logit,
    const at::Tensor& part_max,
    const at::Tensor& part_sum_exp,
    const at::Tensor& part_shifted_sum,
    const at::Tensor& part_action_logit) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pgext::pg_merge_row_stats_", "")
                       .typed<decltype(pg_merge_row_stats_)>();
  op.call(max, sum_exp, shifted_sum, action_logit, part_max, part_sum_exp, part_shifted_sum, part_action_logit);
}

at::Tensor pg_grad_from_stats(
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
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pgext::pg_grad_from_stats", "")
                       .typed<decltype(pg_grad_from_stats)>();
  return op.call(
      grad_policy, grad_entropy, logit, action, ret, weight, lse, entropy, reduction, vocab_start, temperature);
}

std::tuple<at::Tensor, at::Tensor> log_prob_entropy(
    const at::Tensor& logit,
    const at::Tensor& action,
    std::optional<int64_t> ignore_index,
    double temperature) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pgext::log_prob_entropy", "")
                       .typed<decltype(log_prob_entropy)>();
  return op.call(logit, action, ignore_index, temperature);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_surrogate(
    const at::Tensor& log_prob,
    const at::Tensor& old_log_prob,
    const at::Tensor& entropy,
    const at::Tensor& adv,
    const std::optional<at::Tensor>& weight,
    double clip_ratio,
    std::optional<double> dual_clip) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pgext::ppo_surrogate", "")
                       .typed<decltype(ppo_surrogate)>();
  return op.call(log_prob, old_log_prob, entropy, adv, weight, clip_ratio, dual_clip);
}

at::Tensor ppo_value(
    const at::Tensor& value_new,
    const at::Tensor& value_old,
    const at::Tensor& return_,
    const std::optional<at::Tensor>& weight,
    double clip_ratio,
    bool use_value_clip) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pgext::ppo_value", "")
                       .typed<decltype(ppo_value)>();
  return op.call(value_new, value_old, return_, weight, clip_ratio, use_value_clip);
}

}  // namespace ops
}  // namespace pgext
