// ppo_value: PPO's value loss (DI-engine's ppo_value_error), the squared error
// of the new values, clipped around the old ones, in one dispatcher call
// forward and one node backward.
//
// DI-engine's formula is about ten small eager ops forward and as many
// autograd nodes backward: at PPO's batch sizes (64 to 256 samples) more time
// than the whole fused policy loss. Here the forward kernel returns, beside
// the loss, each sample's derivative by value_new; backward is one multiply.
//
// The derivative follows eager autograd's conventions exactly, so that
// gradients match DI-engine's: torch.max splits the gradient evenly on ties
// (both squared errors equal, as whenever the value is inside the clip range)
// and passes it to both where one is NaN; clamp passes it strictly inside its
// bounds only (not at value_old +- clip_ratio, nor for a NaN difference).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "core/checks.h"
#include "ops/ppo_value/ppo_value.h"

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/logical_and.h>
#include <ATen/ops/logical_or.h>
#include <ATen/ops/max.h>
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

void check_value_inputs(
    const at::Tensor& value_new,
    const at::Tensor& value_old,
    const at::Tensor& return_,
    const at::Tensor& weight,
    double clip_ratio) {
  const std::pair<const char*, const at::Tensor*> named[] = {
      {"value_new", &value_new}, {"value_old", &value_old}, {"return_", &return_}, {"weight", &weight}};
  for (const auto& [name, t] : named) {
    if (!t->defined()) {
      TORCH_CHECK_VALUE(std::string(name) == "weight", "ppo_value: ", name, " must be a tensor");
      continue;
    }
    TORCH_CHECK_TYPE(
        is_supported_float(t->scalar_type()), "ppo_value: ", name,
        " must be float16, bfloat16, float32 or float64, got ", t->scalar_type());
    TORCH_CHECK_VALUE(
        t->sym_sizes() == value_new.sym_sizes(), "ppo_value: ", name, " must have value_new's shape ",
        value_new.sym_sizes(), ", got ", t->sym_sizes());
    TORCH_CHECK_VALUE(
        t->device() == value_new.device(), "ppo_value: ", name, " is on ", t->device(), " but value_new is on ",
        value_new.device());
  }
  TORCH_CHECK_VALUE(
      std::isfinite(clip_ratio) && clip_ratio >= 0.0, "ppo_value: clip_ratio must be a finite number >= 0, got ",
      clip_ratio);
}

namespace {

// The loss's dtype: eager's promotion of the inputs.
at::ScalarType result_dtype(
    const at::Tensor& value_new, const at::Tensor& value_old, const at::Tensor& return_, const at::Tensor& weight) {
  return promoted_dtype({value_new, value_old, return_, weight});
}

// One pass over the samples in the compute dtype, the sum in float64: the
// loop DI-engine's eager ops make, without their intermediates. Each step
// rounds as eager's forward and backward ops do, so float32 gradients match
// eager autograd's to the bit.
template <typename scalar_t>
ValueForward value_cpu_typed(
    const at::Tensor& value_new,
    const at::Tensor& value_old,
    const at::Tensor& return_,
    const at::Tensor& weight,
    double clip_ratio,
    bool use_value_clip,
    at::ScalarType out_dtype) {
  const auto compute = c10::CppTypeToScalarType<scalar_t>::value;
  const auto as_compute = [&](const at::Tensor& t) { return t.to(compute).contiguous(); };
  const at::Tensor vn_t = as_compute(value_new), vo_t = as_compute(value_old), ret_t = as_compute(return_);
  const at::Tensor w_t = weight.defined() ? as_compute(weight) : at::Tensor();
  const int64_t n = vn_t.numel();
  const auto opts = vn_t.options();
  at::Tensor grad_vn = at::empty(value_new.sizes(), opts);
  const scalar_t* vn = vn_t.const_data_ptr<scalar_t>();
  const scalar_t* vo = vo_t.const_data_ptr<scalar_t>();
  const scalar_t* ret = ret_t.const_data_ptr<scalar_t>();
  const scalar_t* w = w_t.defined() ? w_t.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* g_vn = grad_vn.mutable_data_ptr<scalar_t>();
  // the bound as eager compares it: a Python float cast to the tensors' dtype
  const auto c = static_cast<scalar_t>(clip_ratio);
  // d loss / d (squared error * weight): 0.5, then mean's division by n
  const scalar_t half_inv_n = n > 0 ? scalar_t(0.5) / static_cast<scalar_t>(n) : scalar_t(0);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t wi = w != nullptr ? w[i] : scalar_t(1);
    const scalar_t g = half_inv_n * wi;
    const scalar_t e1 = ret[i] - vn[i];
    const scalar_t v1 = e1 * e1;
    if (!use_value_clip) {
      sum += static_cast<double>(v1 * wi);
      g_vn[i] = -(g * (scalar_t(2) * e1));
      continue;
    }
    const scalar_t d = vn[i] - vo[i];
    const bool inside = d > -c && d < c;  // where clamp passes a gradient
    const scalar_t e2 = ret[i] - (vo[i] + (d < -c ? -c : (d > c ? c : d)));  // NaN stays NaN, as in clamp
    const scalar_t v2 = e2 * e2;
    // torch.max: NaN propagates and both sides get the gradient; otherwise
    // the larger gets it, half each on a tie
    scalar_t value, s1, s2;
    if (std::isnan(v1) || std::isnan(v2)) {
      value = std::numeric_limits<scalar_t>::quiet_NaN(), s1 = scalar_t(1), s2 = scalar_t(1);
    } else if (v1 > v2) {
      value = v1, s1 = scalar_t(1), s2 = scalar_t(0);
    } else if (v1 < v2) {
      value = v2, s1 = scalar_t(0), s2 = scalar_t(1);
    } else {
      value = v1, s1 = scalar_t(0.5), s2 = scalar_t(0.5);
    }
    sum += static_cast<double>(value * wi);
    const scalar_t through_v1 = -((g * s1) * (scalar_t(2) * e1));
    const scalar_t through_v2 = inside ? -((g * s2) * (scalar_t(2) * e2)) : scalar_t(0);
    g_vn[i] = through_v1 + through_v2;
  }
  const at::Tensor loss = at::scalar_tensor(0.5 * sum / static_cast<double>(n), opts.dtype(out_dtype));
  return {loss, grad_vn.to(out_dtype)};
}

ValueForward ppo_value_forward_cpu(
    const at::Tensor& value_new,
    const at::Tensor& value_old,
    const at::Tensor& return_,
    const std::optional<at::Tensor>& weight,
    double clip_ratio,
    bool use_value_clip) {
  const at::Tensor w = weight.value_or(at::Tensor());
  check_value_inputs(value_new, value_old, return_, w, clip_ratio);
  const auto out_dtype = result_dtype(value_new, value_old, return_, w);
  if (out_dtype == at::kDouble) {
    return value_cpu_typed<double>(value_new, value_old, return_, w, clip_ratio, use_value_clip, out_dtype);
  }
  return value_cpu_typed<float>(value_new, value_old, return_, w, clip_ratio, use_value_clip, out_dtype);
}

}  // namespace

at::Tensor value_gradient(
    const at::Tensor& value_new,
    const at::Tensor& value_old,
    const at::Tensor& return_,
    const at::Tensor& weight,
    double clip_ratio,
    bool use_value_clip) {
  const double half_inv_n = value_new.numel() > 0 ? 0.5 / static_cast<double>(value_new.numel()) : 0.0;
  const at::Tensor g = weight.defined() ? weight * half_inv_n : at::full({}, half_inv_n, value_new.options());
  const at::Tensor e1 = return_ - value_new;
  if (!use_value_clip) {
    return -(g * (2 * e1));
  }
  const at::Tensor d = value_new - value_old;
  const at::Tensor e2 = return_ - (value_old + d.clamp(-clip_ratio, clip_ratio));
  // torch.max's and clamp's masks, piecewise constant in value_new: read
  // from values without gradient
  const at::Tensor v1 = e1.detach().square(), v2 = e2.detach().square();
  const at::Tensor inside = at::logical_and(d.detach() > -clip_ratio, d.detach() < clip_ratio);
  const at::Tensor nan = at::logical_or(v1.isnan(), v2.isnan());
  const auto opts = value_new.options();
  const at::Tensor one = at::ones({}, opts), half = at::full({}, 0.5, opts), zero = at::zeros({}, opts);
  const at::Tensor s1 = at::where(at::logical_or(nan, v1 > v2), one, at::where(v1 < v2, zero, half));
  const at::Tensor s2 = at::where(at::logical_or(nan, v1 < v2), one, at::where(v1 > v2, zero, half));
  return -((g * s1) * (2 * e1)) + at::where(inside, -((g * s2) * (2 * e2)), zero);
}

namespace {

// The forward kernel as ATen ops, in the CPU kernel's compute dtype: CUDA and
// every backend but CPU.
ValueForward ppo_value_forward_composite(
    const at::Tensor& value_new,
    const at::Tensor& value_old,
    const at::Tensor& return_,
    const std::optional<at::Tensor>& weight,
    double clip_ratio,
    bool use_value_clip) {
  const at::Tensor w = weight.value_or(at::Tensor());
  check_value_inputs(value_new, value_old, return_, w, clip_ratio);
  const auto dt = result_dtype(value_new, value_old, return_, w);
  const auto compute = acc_type(dt);
  const at::Tensor vn = value_new.to(compute), vo = value_old.to(compute), ret = return_.to(compute);
  const at::Tensor w_c = w.defined() ? w.to(compute) : at::Tensor();
  const at::Tensor loss = ppo_value_eager(vn, vo, ret, w_c, clip_ratio, use_value_clip);
  const at::Tensor grad_vn = value_gradient(vn, vo, ret, w_c, clip_ratio, use_value_clip);
  return {loss.to(dt), grad_vn.to(dt)};
}

ValueForward ppo_value_forward_meta(
    const at::Tensor& value_new,
    const at::Tensor& value_old,
    const at::Tensor& return_,
    const std::optional<at::Tensor>& weight,
    double clip_ratio,
    bool /*use_value_clip*/) {
  const at::Tensor w = weight.value_or(at::Tensor());
  check_value_inputs(value_new, value_old, return_, w, clip_ratio);
  const auto opts = value_new.options().dtype(result_dtype(value_new, value_old, return_, w));
  return {at::empty({}, opts), at::empty_symint(value_new.sym_sizes(), opts)};
}

}  // namespace

at::Tensor ppo_value_eager(
    const at::Tensor& value_new,
    const at::Tensor& value_old,
    const at::Tensor& return_,
    const at::Tensor& weight_in,
    double clip_ratio,
    bool use_value_clip) {
  const at::Tensor weight = weight_in.defined() ? weight_in : at::ones_like(value_old);
  if (use_value_clip) {
    const at::Tensor value_clip = value_old + (value_new - value_old).clamp(-clip_ratio, clip_ratio);
    const at::Tensor v1 = (return_ - value_new).pow(2);
    const at::Tensor v2 = (return_ - value_clip).pow(2);
    return 0.5 * (at::max(v1, v2) * weight).mean();
  }
  return 0.5 * ((return_ - value_new).pow(2) * weight).mean();
}

TORCH_LIBRARY_FRAGMENT(pgext, m) {
  // PPO's value loss (DI-engine's ppo_value_error): 0.5 * mean(weight *
  // (return_ - value_new)^2), the larger of that and the error of the value
  // clipped to value_old +- clip_ratio where use_value_clip; all tensors of
  // value_new's shape.
  m.def(
      "ppo_value(Tensor value_new, Tensor value_old, Tensor return_, Tensor? weight=None, float clip_ratio=0.2, "
      "bool use_value_clip=True) -> Tensor");
  // Its forward kernel: the loss, then each sample's derivative of it by value_new.
  m.def(
      "ppo_value_forward(Tensor value_new, Tensor value_old, Tensor return_, Tensor? weight, float clip_ratio, "
      "bool use_value_clip) -> (Tensor value_loss, Tensor grad_value_new)");
}

TORCH_LIBRARY_IMPL(pgext, CompositeExplicitAutograd, m) {
  m.impl("ppo_value_forward", &ppo_value_forward_composite);
}

TORCH_LIBRARY_IMPL(pgext, CPU, m) {
  m.impl("ppo_value_forward", &ppo_value_forward_cpu);
}

TORCH_LIBRARY_IMPL(pgext, Meta, m) {
  m.impl("ppo_value_forward", &ppo_value_forward_meta);
}

}  // namespace pgext
