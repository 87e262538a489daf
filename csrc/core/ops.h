#pragma once
// Typed handles to pgext's dispatcher ops, for C++ code that calls them.
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace pgext {
namespace ops {

std::tuple<at::Tensor, at::Tensor> pg_error(
    const at::Tensor& logit,
    const at::Tensor& action,
    const at::Tensor& ret,
    const std::optional<at::Tensor>& weight,
    c10::string_view reduction,
    double temperature = 1.0);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pg_error_forward(
    const at::Tensor& logit,
    const at::Tensor& action,
    const at::Tensor& ret,
    const std::optional<at::Tensor>& weight,
    c10::string_view reduction,
    double temperature = 1.0);

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
    double temperature = 1.0);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pg_row_stats(
    const at::Tensor& logit,
    const at::Tensor& action,
    int64_t vocab_start,
    double temperature = 1.0);

void pg_merge_row_stats_(
    const at::Tensor& max,
    const at::Tensor& sum_exp,
    const at::Tensor& shifted_sum,
    const at::Tensor& action_logit,
    const at::Tensor& part_max,
    const at::Tensor& part_sum_exp,
    const at::Tensor& part_shifted_sum,
    const at::Tensor& part_action_logit);

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
    double temperature = 1.0);

std::tuple<at::Tensor, at::Tensor> log_prob_entropy(
    const at::Tensor& logit,
    const at::Tensor& action,
    std::optional<int64_t> ignore_index,
    double temperature = 1.0);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_surrogate(
    const at::Tensor& log_prob,
    const at::Tensor& old_log_prob,
    const at::Tensor& entropy,
    const at::Tensor& adv,
    const std::optional<at::Tensor>& weight,
    double clip_ratio,
    std::optional<double> dual_clip);

at::Tensor ppo_value(
    const at::Tensor& value_new,
    const at::Tensor& value_old,
    const at::Tensor& return_,
    const std::optional<at::Tensor>& weight,
    double clip_ratio,
    bool use_value_clip);

}  // namespace ops
}  // namespace pgext
