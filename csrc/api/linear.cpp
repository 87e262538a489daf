// The C++ API of the fused output layer (include/pgext/linear.h): the
// dispatcher ops that Python's pgext.linear_log_prob_entropy and
// pgext.linear_pg_error call, so the same kernels, autograd and errors.
#include "include/pgext/pgext.h"
#include "ops/linear_log_prob_entropy/linear_log_prob_entropy.h"

#include <c10/util/Exception.h>

namespace pgext {

LogProbEntropy linear_log_prob_entropy(
    const at::Tensor& input, const at::Tensor& linear_weight, const at::Tensor& action,
    const LinearOptions& options) {
  // undefined tensors would reach the dispatcher with no key to dispatch on
  TORCH_CHECK_VALUE(
      input.defined() && linear_weight.defined() && action.defined(),
      "linear_log_prob_entropy: input, linear_weight and action must be tensors");
  const std::optional<at::Tensor> bias =
      options.linear_bias.has_value() && options.linear_bias->defined() ? options.linear_bias : std::nullopt;
  auto [log_prob, entropy] = ops::linear_log_prob_entropy(
      input, linear_weight, action, bias, options.temperature, options.ignore_index, options.chunk_size);
  return {std::move(log_prob), std::move(entropy)};
}

PgLoss linear_pg_error(
    const at::Tensor& input, const at::Tensor& linear_weight, const at::Tensor& action, const at::Tensor& return_,
    const LinearPgOptions& options) {
  TORCH_CHECK_VALUE(
      input.defined() && linear_weight.defined() && action.defined() && return_.defined(),
      "linear_pg_error: input, linear_weight, action and return_ must be tensors");
  const char* reduction = reduction_name(options.reduction);
  const std::optional<at::Tensor> bias =
      options.linear_bias.has_value() && options.linear_bias->defined() ? options.linear_bias : std::nullopt;
  const std::optional<at::Tensor> weight =
      options.weight.has_value() && options.weight->defined() ? options.weight : std::nullopt;
  auto [policy_loss, entropy_loss] = ops::linear_pg_error(
      input, linear_weight, action, return_, bias, weight, reduction, options.temperature, options.chunk_size);
  return {std::move(policy_loss), std::move(entropy_loss)};
}

}  // namespace pgext
