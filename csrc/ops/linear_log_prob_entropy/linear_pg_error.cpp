// linear_pg_error: pg_error's two losses (policy = -(return_ * log p(a)),
// entropy = H, each times weight, reduced) with the output layer fused in.
// CompositeImplicitAutograd on linear_log_prob_entropy: its chunked kernels
// and autograd for the layer, ATen ops for the per-sample terms (so return_
// and weight get gradients too, as pg_error's do).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "core/checks.h"
#include "ops/linear_log_prob_entropy/linear_log_prob_entropy.h"

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

namespace pgext {
namespace {

// pg_error's rule: a per-sample tensor has action's shape or broadcasts to it
// without changing it.
void check_per_sample(const char* name, const at::Tensor& t, const at::Tensor& action) {
  TORCH_CHECK_TYPE(
      is_supported_float(t.scalar_type()) || at::isIntegralType(t.scalar_type(), /*includeBool=*/true),
      "linear_pg_error: ", name, " must be a real number or bool tensor, got dtype ", t.scalar_type());
  const auto ts = t.sym_sizes();
  const auto as = action.sym_sizes();
  bool ok = ts.size() <= as.size();
  for (size_t i = 0; ok && i < ts.size(); ++i) {
    ok = ts[i] == 1 || ts[i] == as[as.size() - ts.size() + i];
  }
  TORCH_CHECK_VALUE(
      ok, "linear_pg_error: ", name, " must have the shape of action ", as,
      " or broadcast to it without changing it, got ", ts);
  TORCH_CHECK_VALUE(
      t.device() == action.device(), "linear_pg_error: ", name, " is on ", t.device(), " but action is on ",
      action.device());
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
  TORCH_CHECK_VALUE(ret.defined() && action.defined(), "linear_pg_error: action and return_ must be tensors");
  const Reduction red = parse_reduction(reduction);
  check_per_sample("return_", ret, action);
  const bool has_weight = weight.has_value() && weight->defined();
  if (has_weight) {
    check_per_sample("weight", *weight, action);
  }
  auto [log_prob, entropy] = ops::linear_log_prob_entropy(
      input, linear_weight, action, linear_bias, temperature, std::nullopt, chunk_size);
  const auto acc = log_prob.scalar_type();
  at::Tensor policy = -(ret.to(acc) * log_prob);
  at::Tensor ent = entropy;
  if (has_weight) {
    const at::Tensor w = weight->to(acc);
    policy = policy * w;
    ent = ent * w;
  }
  // a (B, 1) return against (B, A) actions: per-sample terms of action's shape
  policy = policy.expand_symint(action.sym_sizes());
  ent = ent.expand_symint(action.sym_sizes());
  if (red == Reduction::Mean) {
    policy = policy.mean();
    ent = ent.mean();
  } else if (red == Reduction::Sum) {
    policy = policy.sum();
    ent = ent.sum();
  }
  // pg_error's loss dtype: logits (input), return_ and weight promoted
  auto out = c10::promoteTypes(input.scalar_type(), ret.scalar_type());
  if (has_weight) {
    out = c10::promoteTypes(out, weight->scalar_type());
  }
  return {policy.to(out), ent.to(out)};
}

}  // namespace

TORCH_LIBRARY_IMPL(pgext, CompositeImplicitAutograd, m) {
  m.impl("linear_pg_error", &linear_pg_error);
}

}  // namespace pgext
