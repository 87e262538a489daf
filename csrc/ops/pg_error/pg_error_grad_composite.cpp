#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "ops/pg_error/pg_error_grad_composite.h"

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/log_softmax.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

namespace pgext {

namespace {

// Per-row log-probabilities and entropy of the logits, in the accumulation type.
struct RowTerms {
  at::Tensor p;          // (..., N)
  at::Tensor logp_safe;  // log p, 0 where p = 0
  at::Tensor entropy;    // (...)
  at::Tensor logp_action;
  at::Tensor index;  // action as int64, (..., 1)
};

// logit / T as the kernels read it, logit * (1 / T); the logits themselves
// for T = 1 (no op recorded).
at::Tensor scaled(const at::Tensor& x, double inv_t) {
  return inv_t == 1.0 ? x : x * inv_t;
}

RowTerms row_terms(const at::Tensor& x, const at::Tensor& action) {
  RowTerms t;
  const at::Tensor logp = at::log_softmax(x, -1);
  t.p = logp.exp();
  // Masked classes (p = 0, logp = -inf) add nothing to the entropy; `where`
  // keeps them out of p * logp, whose value and derivative would be NaN.
  t.logp_safe = at::where(t.p > 0, logp, at::zeros({}, logp.options()));
  t.entropy = -(t.p * t.logp_safe).sum(-1);
  t.index = gather_index(action, x.sym_size(-1));
  t.logp_action = logp.gather(-1, t.index).squeeze(-1);
  return t;
}

// What the gradient of the logits is made of, in the accumulation type: the
// row terms, and per row (or 0-d, broadcast) the upstream gradients scaled
// for the reduction, the return and the weight (1 without one). The
// gradient is G = c_pol (p - onehot) - c_ent p s, with c_pol = g_pol w r,
// c_ent = g_ent w and s = log p + H.
struct GradTerms {
  RowTerms rows;
  at::Tensor g_pol, g_ent, r, w;
};

GradTerms grad_terms(
    const at::Tensor& grad_policy,
    const at::Tensor& grad_entropy,
    const at::Tensor& logit,
    const at::Tensor& action,
    const at::Tensor& ret,
    const at::Tensor& weight,
    Reduction reduction,
    double inv_t) {
  const auto acc = acc_type(logit.scalar_type());
  GradTerms t{row_terms(scaled(logit.to(acc), inv_t), action)};
  t.g_pol = scale_for_reduction(grad_policy.to(acc), reduction, action);
  t.g_ent = scale_for_reduction(grad_entropy.to(acc), reduction, action);
  t.r = ret.to(acc);
  t.w = weight.defined() ? weight.to(acc) : at::ones({}, t.rows.p.options());
  return t;
}

}  // namespace

PgGrads pg_error_grads_composite(
    const at::Tensor& grad_policy,
    const at::Tensor& grad_entropy,
    const at::Tensor& logit,
    const at::Tensor& action,
    const at::Tensor& ret,
    const at::Tensor& weight,
    Reduction reduction,
    bool need_logit,
    bool need_ret,
    bool need_weight,
    double temperature) {
  const double inv_t = 1.0 / temperature;
  const auto [rows, g_pol, g_ent, r, w] =
      grad_terms(grad_policy, grad_entropy, logit, action, ret, weight, reduction, inv_t);
  const auto& [p, logp_safe, entropy, logp_action, index] = rows;
  PgGrads out;
  if (need_logit) {
    const at::Tensor c_pol = (g_pol * w * r).unsqueeze(-1);
    const at::Tensor c_ent = (g_ent * w).unsqueeze(-1);
    const at::Tensor onehot = at::zeros_like(p).scatter(-1, index, 1.0);
    const at::Tensor g = c_pol * (p - onehot) - c_ent * p * (logp_safe + entropy.unsqueeze(-1));
    out.logit = scaled(g, inv_t).to(logit.scalar_type());
  }
  if (need_ret) {
    out.ret = sum_to_shape_of(-g_pol * w * logp_action, ret).to(ret.scalar_type());
  }
  if (need_weight && weight.defined()) {
    out.weight = sum_to_shape_of(-g_pol * r * logp_action + g_ent * entropy, weight).to(weight.scalar_type());
  }
  return out;
}

PgGradVjp pg_error_grad_logit_vjp_composite(
    const at::Tensor& v,
    const at::Tensor& grad_policy,
    const at::Tensor& grad_entropy,
    const at::Tensor& logit,
    const at::Tensor& action,
    const at::Tensor& ret,
    const at::Tensor& weight,
    Reduction reduction,
    const std::array<bool, 5>& need,
    double temperature) {
  const double inv_t = 1.0 / temperature;
  const auto [rows, g_pol, g_ent, r, w] =
      grad_terms(grad_policy, grad_entropy, logit, action, ret, weight, reduction, inv_t);
  const auto& [p, logp_safe, entropy, logp_action, index] = rows;
  // The logits' gradient is G(z) / T: <v, G(z) / T> = <v / T, G(z)>, whose
  // derivative with respect to the logits is that with respect to z, / T.
  const at::Tensor vv = scaled(v.to(p.scalar_type()), inv_t);
  // With G as in grad_terms, <v, G> = c_pol A + c_ent B per row, where
  const at::Tensor s = logp_safe + entropy.unsqueeze(-1);
  const at::Tensor onehot = at::zeros_like(p).scatter(-1, index, 1.0);
  const at::Tensor a = (vv * (p - onehot)).sum(-1);
  const at::Tensor b = -(vv * p * s).sum(-1);
  // The adjoint of scale_for_reduction and of the broadcast of a 0-d
  // upstream gradient over the rows.
  const auto reduced = [&](const at::Tensor& t) {
    return reduction == Reduction::None ? t : scale_for_reduction(t.sum(), reduction, action);
  };
  PgGradVjp out;
  if (need[0]) {
    out.grad_policy = reduced(a * w * r).to(grad_policy.scalar_type());
  }
  if (need[1]) {
    out.grad_entropy = reduced(b * w).to(grad_entropy.scalar_type());
  }
  if (need[2]) {
    // with dp_j/dx_k = p_j (d_jk - p_k) and dH/dx_k = -p_k s_k:
    //   d<v, G>/dx_k = c_pol p_k (v_k - <v, p>) - c_ent p_k ((v_k - <v, p>) (1 + s_k) - <v, p s>)
    const at::Tensor centered = vv - (vv * p).sum(-1, /*keepdim=*/true);
    const at::Tensor c_pol = (g_pol * w * r).unsqueeze(-1);
    const at::Tensor c_ent = (g_ent * w).unsqueeze(-1);
    out.logit = scaled(p * (c_pol * centered - c_ent * (centered * (1 + s) + b.unsqueeze(-1))), inv_t)
                    .to(logit.scalar_type());
  }
  if (need[3]) {
    out.ret = sum_to_shape_of(a * g_pol * w, ret).to(ret.scalar_type());
  }
  if (need[4] && weight.defined()) {
    out.weight = sum_to_shape_of(a * g_pol * r + b * g_ent, weight).to(weight.scalar_type());
  }
  return out;
}

PgTangents pg_error_tangents_composite(
    const at::Tensor& logit,
    const at::Tensor& action,
    const at::Tensor& ret,
    const at::Tensor& weight,
    Reduction reduction,
    at::ScalarType loss_dtype,
    const at::Tensor& d_logit,
    const at::Tensor& d_ret,
    const at::Tensor& d_weight,
    double temperature) {
  const auto acc = acc_type(logit.scalar_type());
  const double inv_t = 1.0 / temperature;
  const auto [p, logp_safe, entropy, logp_action, index] = row_terms(scaled(logit.to(acc), inv_t), action);
  const at::Tensor r = ret.to(acc);
  const at::Tensor w = weight.defined() ? weight.to(acc) : at::ones({}, p.options());
  // policy = -w r log p_a and entropy = w H, per sample, with
  //   d log p_a = dx_a - sum_j p_j dx_j,   dH = -sum_j p_j (log p_j + H) dx_j.
  PgTangents out;
  at::Tensor d_policy = at::zeros_like(entropy);
  at::Tensor d_entropy = at::zeros_like(entropy);
  if (d_logit.defined()) {
    const at::Tensor dx = scaled(d_logit.to(acc), inv_t);  // the tangent of z = logit / T
    out.lse = (p * dx).sum(-1);
    out.row_entropy = -(p * (logp_safe + entropy.unsqueeze(-1)) * dx).sum(-1);
    const at::Tensor d_logp_action = dx.gather(-1, index).squeeze(-1) - out.lse;
    d_policy = d_policy - w * r * d_logp_action;
    d_entropy = d_entropy + w * out.row_entropy;
  }
  if (d_ret.defined()) {
    d_policy = d_policy - w * d_ret.to(acc) * logp_action;
  }
  if (d_weight.defined()) {
    const at::Tensor dw = d_weight.to(acc);
    d_policy = d_policy - dw * r * logp_action;
    d_entropy = d_entropy + dw * entropy;
  }
  const auto reduce = [&](const at::Tensor& t) {
    return (reduction == Reduction::None ? t : scale_for_reduction(t.sum(), reduction, action)).to(loss_dtype);
  };
  out.policy = reduce(d_policy);
  out.entropy = reduce(d_entropy);
  return out;
}

}  // namespace pgext
