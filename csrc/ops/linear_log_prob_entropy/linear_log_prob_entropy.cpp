// The schemas of the fused output layer (a fragment of the pgext library, so
// that they live beside their kernels) and typed handles for C++ callers.
#include "ops/linear_log_prob_entropy/linear_log_prob_entropy.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(pgext, m) {
  // log_prob_entropy(F.linear(input, linear_weight, linear_bias) / temperature,
  // action, ignore_index) without the (tokens, V) logits: class slices of
  // chunk_size classes (None: about 8 MiB of logits each on the CPU, up to
  // 32 MiB on a GPU, rows tiled too when there are many), recomputed in
  // backward. Differentiable with respect to input, linear_weight and
  // linear_bias.
  m.def(
      "linear_log_prob_entropy(Tensor input, Tensor linear_weight, Tensor action, Tensor? linear_bias=None, "
      "float temperature=1.0, int? ignore_index=None, int? chunk_size=None) -> (Tensor log_prob, Tensor entropy)");
  // Forward kernel: the two outputs and the per-row float64 log-sum-exp of
  // the tempered logits, all of action's shape. The entropy doubles as the
  // saved statistic that pg_error_backward reads.
  m.def(
      "linear_log_prob_entropy_forward(Tensor input, Tensor linear_weight, Tensor action, Tensor? linear_bias, "
      "float temperature, int? ignore_index, int? chunk_size) -> (Tensor log_prob, Tensor entropy, Tensor lse)");
  // Backward kernel: the gradients of input, linear_weight and linear_bias
  // for upstream gradients of both outputs. output_mask names the gradients
  // wanted; one not wanted (a frozen head's weight) is not computed, which
  // saves its GEMM, and comes back with shape (0,), as the bias's does
  // without a bias.
  m.def(
      "linear_log_prob_entropy_backward(Tensor grad_log_prob, Tensor grad_entropy, Tensor input, "
      "Tensor linear_weight, Tensor action, Tensor? linear_bias, Tensor lse, Tensor entropy, float temperature, "
      "int? ignore_index, int? chunk_size, bool[3] output_mask) -> (Tensor grad_input, "
      "Tensor grad_linear_weight, Tensor grad_linear_bias)");
  // pg_error's two losses on the fused output layer (linear_pg_error.cpp).
  m.def(
      "linear_pg_error(Tensor input, Tensor linear_weight, Tensor action, Tensor return_, "
      "Tensor? linear_bias=None, Tensor? weight=None, str reduction='mean', float temperature=1.0, "
      "int? chunk_size=None) -> (Tensor policy_loss, Tensor entropy_loss)");
}

namespace pgext {
namespace ops {

std::tuple<at::Tensor, at::Tensor> linear_log_prob_entropy(
    const at::Tensor& input,
    const at::Tensor& linear_weight,
    const at::Tensor& action,
    const std::optional<at::Tensor>& linear_bias,
    double temperature,
    std::optional<int64_t> ignore_index,
    std::optional<int64_t> chunk_size) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pgext::linear_log_prob_entropy", "")
                       .typed<decltype(linear_log_prob_entropy)>();
  return op.call(input, linear_weight, action, linear_bias, temperature, ignore_index, chunk_size);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_log_prob_entropy_forward(
    const at::Tensor& input,
    const at::Tensor& linear_weight,
    const at::Tensor& action,
    const std::optional<at::Tensor>& linear_bias,
    double temperature,
    std::optional<int64_t> ignore_index,
    std::optional<int64_t> chunk_size) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pgext::linear_log_prob_entropy_forward", "")
                       .typed<decltype(linear_log_prob_entropy_forward)>();
  return op.call(input, linear_weight, action, linear_bias, temperature, ignore_index, chunk_size);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_log_prob_entropy_backward(
    const at::Tensor& grad_log_prob,
    const at::Tensor& grad_entropy,
    const at::Tensor& input,
    const at::Tensor& linear_weight,
    const at::Tensor& action,
    const std::optional<at::Tensor>& linear_bias,
    const at::Tensor& lse,
    const at::Tensor& entropy,
    double temperature,
    std::optional<int64_t> ignore_index,
    std::optional<int64_t> chunk_size,
    std::array<bool, 3> output_mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pgext::linear_log_prob_entropy_backward", "")
                       .typed<decltype(linear_log_prob_entropy_backward)>();
  return op.call(grad_log_prob, grad_entropy, input, linear_weight, action, linear_bias, lse, entropy, temperature,
                 ignore_index, chunk_size, output_mask);
}

std::tuple<at::Tensor, at::Tensor> linear_pg_error(
    const at::Tensor& input,
    const at::Tensor& linear_weight,
    const at::Tensor& action,
    const at::Tensor& ret,
    const std::optional<at::Tensor>& linear_bias,
    const std::optional<at::Tensor>& weight,
    c10::string_view reduction,
    double temperature,
    std::optional<int64_t> chunk_size) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pgext::linear_pg_error", "")
                       .typed<decltype(linear_pg_error)>();
  return op.call(input, linear_weight, action, ret, linear_bias, weight, reduction, temperature, chunk_size);
}

}  // namespace ops
}  // namespace pgext
