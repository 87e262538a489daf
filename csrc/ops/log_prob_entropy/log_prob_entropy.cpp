// log_prob_entropy: the per-sample log pi(a|s) and entropy H of a categorical
// policy, the two quantities PPO, A2C and token-level GRPO losses are made of.
//
// They are pg_error's per-sample terms with a return of -1 and no reduction:
// policy = -w * R * log p(a) = log p(a) and entropy = H (w = 1). So this op is
// pg_error itself (CompositeImplicitAutograd): its fused forward and backward
// kernels on every backend, its C++ autograd (any order, forward mode), Meta
// kernel, vmap rules and torch.compile support, with no kernel of its own.
// Saved for backward: pg_error's float64 lse and entropy, 12 bytes a sample
// (13 with ignore_index: the bool mask of the ignored samples).
//
// The sampling temperature T is pg_error's: the kernels read each logit as
// logit * (1 / T), so log_prob and entropy are those of logit / T without a
// scaled copy of the logits, and the gradient is that of the composition.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "core/checks.h"
#include "core/ops.h"

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

namespace pgext {
namespace {

std::tuple<at::Tensor, at::Tensor> log_prob_entropy(
    const at::Tensor& logit,
    const at::Tensor& action,
    std::optional<int64_t> ignore_index,
    double temperature) {
  constexpr const char* kOp = "log_prob_entropy";
  TORCH_CHECK_VALUE(logit.defined() && action.defined(), "log_prob_entropy: logit and action must be tensors");
  // pg_error checks them too, but its messages would name pg_error
  check_dense({{"logit", &logit}, {"action", &action}}, kOp);
  check_logit_and_action(logit, action, kOp);
  check_temperature(temperature, kOp);
  // float32 per-sample outputs for half-type logits (the kernels' accumulation
  // type), float64 for float64: the dtype a ratio exp(log_prob - old) needs.
  // pg_error's kernels check the actions' range; their message names this op
  const UserOpGuard guard(kOp);
  const at::Tensor minus_one = at::scalar_tensor(-1.0, logit.options().dtype(acc_type(logit.scalar_type())));
  if (!ignore_index.has_value()) {
    return ops::pg_error(logit, action, minus_one, std::nullopt, "none", temperature);
  }
  // Ignored samples (LLM padding) get weight 0: pg_error neither checks nor
  // reads their actions, and they get no gradient. Their outputs are set to
  // exactly 0 (the weight alone would leave -0, or a NaN of a padding row's
  // logits). The bool mask is all that is saved besides pg_error's state.
  const at::Tensor keep = action != *ignore_index;
  auto [log_prob, entropy] = ops::pg_error(logit, action, minus_one, keep, "none", temperature);
  const at::Tensor zero = at::zeros({}, log_prob.options());
  return {at::where(keep, log_prob, zero), at::where(keep, entropy, zero)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pgext, m) {
  // The per-sample log-probability of the action and entropy of a categorical
  // policy, for any upstream gradients of either: pg_error's fused kernels
  // with a return of -1 and reduction 'none'. Samples
  // whose action is ignore_index get 0 for both and no gradient.
  m.def(
      "log_prob_entropy(Tensor logit, Tensor action, int? ignore_index=None, float temperature=1.0) -> "
      "(Tensor log_prob, Tensor entropy)");
}

TORCH_LIBRARY_IMPL(pgext, CompositeImplicitAutograd, m) {
  m.impl("log_prob_entropy", &log_prob_entropy);
}

}  // namespace pgext
