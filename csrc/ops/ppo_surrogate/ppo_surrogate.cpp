// ppo_surrogate: PPO's clipped surrogate (DI-engine's ppo_policy_error after
// the distribution), its entropy loss and info, from per-sample
// log-probabilities, in one dispatcher call forward and one node backward.
//
// DI-engine's formula is about twenty small eager ops forward and as many
// autograd nodes backward; at the batch sizes of classic RL (CartPole's 64 x
// 2, Atari's 256 x 18) their fixed costs are most of a PPO step's loss. Here
// the forward kernel returns, beside the four results, each sample's
// derivative of the two losses; backward is one multiply per input.
//
// The derivative follows eager autograd's conventions exactly, so that
// gradients match DI-engine's: min/max split the gradient evenly on ties
// (surr1 == surr2 whenever the ratio lies inside the clip range) and clamp
// passes it strictly inside its bounds only.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "core/checks.h"
#include "ops/ppo_surrogate/ppo_surrogate.h"

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/logical_and.h>
#include <ATen/ops/max.h>
#include <ATen/ops/min.h>
#include <ATen/ops/minimum.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string>

namespace pgext {

void check_surrogate_inputs(
    const at::Tensor& log_prob,
    const at::Tensor& old_log_prob,
    const at::Tensor& entropy,
    const at::Tensor& adv,
    const at::Tensor& weight,
    double clip_ratio,
    std::optional<double> dual_clip) {
  const std::pair<const char*, const at::Tensor*> named[] = {
      {"log_prob", &log_prob}, {"old_log_prob", &old_log_prob}, {"entropy", &entropy}, {"adv", &adv},
      {"weight", &weight}};
  for (const auto& [name, t] : named) {
    if (!t->defined()) {
      TORCH_CHECK_VALUE(std::string(name) == "weight", "ppo_surrogate: ", name, " must be a tensor");
      continue;
    }
    TORCH_CHECK_TYPE(
        is_supported_float(t->scalar_type()), "ppo_surrogate: ", name,
        " must be float16, bfloat16, float32 or float64, got ", t->scalar_type());
    TORCH_CHECK_VALUE(
        t->sym_sizes() == log_prob.sym_sizes(), "ppo_surrogate: ", name, " must have log_prob's shape ",
        log_prob.sym_sizes(), ", got ", t->sym_sizes());
    TORCH_CHECK_VALUE(
        t->device() == log_prob.device(), "ppo_surrogate: ", name, " is on ", t->device(), " but log_prob is on ",
        log_prob.device());
  }
  TORCH_CHECK_VALUE(
      std::isfinite(clip_ratio) && clip_ratio >= 0.0, "ppo_surrogate: clip_ratio must be a finite number >= 0, got ",
      clip_ratio);
  TORCH_CHECK_VALUE(
      !dual_clip.has_value() || (std::isfinite(*dual_clip) && *dual_clip > 1.0),
      "ppo_surrogate: dual_clip must be greater than 1.0 (or None), got ", dual_clip.value_or(0.0));
}

namespace {

using ForwardOutputs = SurrogateForward;

// The dtype of the results but clipfrac (float32, as DI-engine's): what eager
// type promotion of the inputs gives.
at::ScalarType result_dtype(
    const at::Tensor& log_prob,
    const at::Tensor& old_log_prob,
    const at::Tensor& entropy,
    const at::Tensor& adv,
    const at::Tensor& weight) {
  return promoted_dtype({log_prob, old_log_prob, entropy, adv, weight});
}

// One pass over the samples, in float32 (float64 for float64 results), the
// sums in float64: the loop DI-engine's eager ops make, without their
// intermediates.
template <typename scalar_t>
ForwardOutputs surrogate_cpu_typed(
    const at::Tensor& log_prob,
    const at::Tensor& old_log_prob,
    const at::Tensor& entropy,
    const at::Tensor& adv,
    const at::Tensor& weight,
    double clip_ratio,
    std::optional<double> dual_clip,
    at::ScalarType out_dtype) {
  const auto compute = c10::CppTypeToScalarType<scalar_t>::value;
  const auto as_compute = [&](const at::Tensor& t) { return t.to(compute).contiguous(); };
  const at::Tensor lp_t = as_compute(log_prob), old_t = as_compute(old_log_prob), ent_t = as_compute(entropy),
                   adv_t = as_compute(adv);
  const at::Tensor w_t = weight.defined() ? as_compute(weight) : at::Tensor();
  const int64_t n = lp_t.numel();
  const auto opts = lp_t.options();
  at::Tensor grad_lp = at::empty(log_prob.sizes(), opts);
  at::Tensor grad_ent = at::empty(log_prob.sizes(), opts);
  const scalar_t* lp = lp_t.const_data_ptr<scalar_t>();
  const scalar_t* old = old_t.const_data_ptr<scalar_t>();
  const scalar_t* ent = ent_t.const_data_ptr<scalar_t>();
  const scalar_t* a = adv_t.const_data_ptr<scalar_t>();
  const scalar_t* w = w_t.defined() ? w_t.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* g_lp = grad_lp.mutable_data_ptr<scalar_t>();
  scalar_t* g_ent = grad_ent.mutable_data_ptr<scalar_t>();
  // the bounds as eager compares them: Python floats cast to the tensors' dtype
  const auto lo = static_cast<scalar_t>(1.0 - clip_ratio);
  const auto hi = static_cast<scalar_t>(1.0 + clip_ratio);
  const bool dual = dual_clip.has_value();
  const auto dual_c = static_cast<scalar_t>(dual_clip.value_or(0.0));
  const scalar_t inv_n = n > 0 ? static_cast<scalar_t>(1.0 / static_cast<double>(n)) : scalar_t(0);
  double policy_sum = 0, entropy_sum = 0, kl_sum = 0;
  int64_t clipped = 0;
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t wi = w != nullptr ? w[i] : scalar_t(1);
    const scalar_t r = std::exp(lp[i] - old[i]);
    const scalar_t s1 = r * a[i];
    const bool inside = r > lo && r < hi;  // where clamp passes a gradient
    const scalar_t s2 = (r < lo ? lo : (r > hi ? hi : r)) * a[i];
    // torch.min: NaN propagates; the gradient goes to the smaller, half each on a tie
    scalar_t value, slope;
    if (std::isnan(s1) || std::isnan(s2)) {
      value = std::numeric_limits<scalar_t>::quiet_NaN();
      slope = value;
    } else if (s1 < s2) {
      value = s1, slope = a[i];
    } else if (s1 > s2) {
      value = s2, slope = inside ? a[i] : scalar_t(0);
    } else {
      value = s1, slope = inside ? a[i] : scalar_t(0.5) * a[i];
    }
    if (dual && a[i] < scalar_t(0)) {
      // torch.max against dual_clip * adv, which has no gradient
      const scalar_t floor = dual_c * a[i];
      if (value < floor) {
        value = floor, slope = scalar_t(0);
      } else if (value == floor) {
        slope = scalar_t(0.5) * slope;
      }
    }
    policy_sum += static_cast<double>(-value * wi);
    g_lp[i] = -wi * slope * r * inv_n;
    entropy_sum += static_cast<double>(ent[i] * wi);
    g_ent[i] = wi * inv_n;
    kl_sum += static_cast<double>(old[i] - lp[i]);
    clipped += (r > hi || r < lo) ? 1 : 0;
  }
  const double dn = static_cast<double>(n);
  const auto scalar = [&](double v, at::ScalarType t) { return at::scalar_tensor(v / dn, opts.dtype(t)); };
  return {scalar(policy_sum, out_dtype), scalar(entropy_sum, out_dtype), scalar(kl_sum, out_dtype),
          scalar(static_cast<double>(clipped), at::kFloat), grad_lp.to(out_dtype), grad_ent.to(out_dtype)};
}

ForwardOutputs ppo_surrogate_forward_cpu(
    const at::Tensor& log_prob,
    const at::Tensor& old_log_prob,
    const at::Tensor& entropy,
    const at::Tensor& adv,
    const std::optional<at::Tensor>& weight,
    double clip_ratio,
    std::optional<double> dual_clip) {
  const at::Tensor w = weight.value_or(at::Tensor());
  check_surrogate_inputs(log_prob, old_log_prob, entropy, adv, w, clip_ratio, dual_clip);
  const auto out_dtype = result_dtype(log_prob, old_log_prob, entropy, adv, w);
  if (out_dtype == at::kDouble) {
    return surrogate_cpu_typed<double>(log_prob, old_log_prob, entropy, adv, w, clip_ratio, dual_clip, out_dtype);
  }
  return surrogate_cpu_typed<float>(log_prob, old_log_prob, entropy, adv, w, clip_ratio, dual_clip, out_dtype);
}

}  // namespace

at::Tensor objective_slope(
    const at::Tensor& ratio, const at::Tensor& adv, double clip_ratio, std::optional<double> dual_clip) {
  const double lo = 1.0 - clip_ratio, hi = 1.0 + clip_ratio;
  const at::Tensor s1 = ratio * adv;
  const at::Tensor s2 = ratio.clamp(lo, hi) * adv;
  const at::Tensor inside = at::logical_and(ratio > lo, ratio < hi);  // where clamp passes a gradient
  const at::Tensor zero = at::zeros({}, adv.options());
  const at::Tensor outer = at::where(inside, adv, zero);
  at::Tensor slope = at::where(s1 < s2, adv, at::where(s1 > s2, outer, at::where(inside, adv, 0.5 * adv)));
  if (dual_clip.has_value()) {
    const at::Tensor clip1 = at::minimum(s1, s2);
    const at::Tensor floor = *dual_clip * adv;
    const at::Tensor dual_slope = at::where(clip1 > floor, slope, at::where(clip1 == floor, 0.5 * slope, zero));
    slope = at::where(adv < 0, dual_slope, slope);
  }
  return slope;
}

namespace {

// The forward kernel as ATen ops: CUDA and every backend but CPU.
ForwardOutputs ppo_surrogate_forward_composite(
    const at::Tensor& log_prob,
    const at::Tensor& old_log_prob,
    const at::Tensor& entropy,
    const at::Tensor& adv,
    const std::optional<at::Tensor>& weight,
    double clip_ratio,
    std::optional<double> dual_clip) {
  const at::Tensor w = weight.value_or(at::Tensor());
  check_surrogate_inputs(log_prob, old_log_prob, entropy, adv, w, clip_ratio, dual_clip);
  const auto dt = result_dtype(log_prob, old_log_prob, entropy, adv, w);
  auto [policy_loss, entropy_loss, approx_kl, clipfrac] =
      ppo_surrogate_eager(log_prob, old_log_prob, entropy, adv, w, clip_ratio, dual_clip);
  const at::Tensor ratio = at::exp(log_prob.to(dt) - old_log_prob.to(dt));
  const double inv_n = log_prob.numel() > 0 ? 1.0 / static_cast<double>(log_prob.numel()) : 0.0;
  const at::Tensor w_dt = w.defined() ? w.to(dt) : at::ones({}, ratio.options());
  const at::Tensor grad_lp = -(w_dt * objective_slope(ratio, adv.to(dt), clip_ratio, dual_clip) * ratio) * inv_n;
  const at::Tensor grad_ent = (w_dt * inv_n).expand(log_prob.sizes()).contiguous();
  return {policy_loss.to(dt), entropy_loss.to(dt), approx_kl.to(dt), clipfrac, grad_lp, grad_ent};
}

ForwardOutputs ppo_surrogate_forward_meta(
    const at::Tensor& log_prob,
    const at::Tensor& old_log_prob,
    const at::Tensor& entropy,
    const at::Tensor& adv,
    const std::optional<at::Tensor>& weight,
    double clip_ratio,
    std::optional<double> dual_clip) {
  const at::Tensor w = weight.value_or(at::Tensor());
  check_surrogate_inputs(log_prob, old_log_prob, entropy, adv, w, clip_ratio, dual_clip);
  const auto opts = log_prob.options().dtype(result_dtype(log_prob, old_log_prob, entropy, adv, w));
  return {at::empty({}, opts), at::empty({}, opts), at::empty({}, opts), at::empty({}, opts.dtype(at::kFloat)),
          at::empty_symint(log_prob.sym_sizes(), opts), at::empty_symint(log_prob.sym_sizes(), opts)};
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_surrogate_eager(
    const at::Tensor& log_prob,
    const at::Tensor& old_log_prob,
    const at::Tensor& entropy_in,
    const at::Tensor& adv,
    const at::Tensor& weight_in,
    double clip_ratio,
    std::optional<double> dual_clip) {
  const at::Tensor weight = weight_in.defined() ? weight_in : at::ones_like(adv);
  at::Tensor entropy = entropy_in;
  if (entropy.sizes() != weight.sizes()) {  // several agents sharing one advantage
    entropy = entropy.mean(1);
  }
  const at::Tensor entropy_loss = (entropy * weight).mean();
  at::Tensor ratio = at::exp(log_prob - old_log_prob);
  if (ratio.sizes() != adv.sizes()) {
    ratio = ratio.mean(1);
  }
  const at::Tensor surr1 = ratio * adv;
  const at::Tensor surr2 = ratio.clamp(1 - clip_ratio, 1 + clip_ratio) * adv;
  at::Tensor policy_loss;
  if (dual_clip.has_value()) {
    const at::Tensor clip1 = at::min(surr1, surr2);
    const at::Tensor clip2 = at::max(clip1, *dual_clip * adv);
    policy_loss = -(at::where(adv < 0, clip2, clip1) * weight).mean();
  } else {
    policy_loss = (-at::min(surr1, surr2) * weight).mean();
  }
  const c10::AutoGradMode no_grad(false);
  return {policy_loss, entropy_loss, (old_log_prob - log_prob).mean(),
          (ratio.gt(1 + clip_ratio) | ratio.lt(1 - clip_ratio)).to(at::kFloat).mean()};
}

TORCH_LIBRARY_FRAGMENT(pgext, m) {
  // PPO's clipped surrogate, entropy loss, approx_kl and clipfrac (DI-engine's
  // ppo_policy_error) from per-sample log-probabilities, entropies,
  // advantages and weights, all of log_prob's shape.
  m.def(
      "ppo_surrogate(Tensor log_prob, Tensor old_log_prob, Tensor entropy, Tensor adv, Tensor? weight=None, "
      "float clip_ratio=0.2, float? dual_clip=None) -> "
      "(Tensor policy_loss, Tensor entropy_loss, Tensor approx_kl, Tensor clipfrac)");
  // Its forward kernel: the four results, then each sample's derivative of
  // policy_loss by log_prob and of entropy_loss by entropy.
  m.def(
      "ppo_surrogate_forward(Tensor log_prob, Tensor old_log_prob, Tensor entropy, Tensor adv, Tensor? weight, "
      "float clip_ratio, float? dual_clip) -> (Tensor policy_loss, Tensor entropy_loss, Tensor approx_kl, "
      "Tensor clipfrac, Tensor grad_log_prob, Tensor grad_entropy)");
}

TORCH_LIBRARY_IMPL(pgext, CompositeExplicitAutograd, m) {
  m.impl("ppo_surrogate_forward", &ppo_surrogate_forward_composite);
}

TORCH_LIBRARY_IMPL(pgext, CPU, m) {
  m.impl("ppo_surrogate_forward", &ppo_surrogate_forward_cpu);
}

TORCH_LIBRARY_IMPL(pgext, Meta, m) {
  m.impl("ppo_surrogate_forward", &ppo_surrogate_forward_meta);
}

}  // namespace pgext
