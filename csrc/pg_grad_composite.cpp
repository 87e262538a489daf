#include "pg_grad_composite.h"

#include <ATen/ATen.h>

namespace pgext {

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
    bool need_weight) {
  const auto acc = acc_type(logit.scalar_type());
  const at::Tensor x = logit.to(acc);
  const at::Tensor logp = at::log_softmax(x, -1);
  const at::Tensor p = logp.exp();
  // Masked classes (p = 0, logp = -inf) add nothing to the entropy; `where`
  // keeps them out of p * logp, whose value and derivative would be NaN.
  const at::Tensor logp_safe = at::where(p > 0, logp, at::zeros({}, logp.options()));
  const at::Tensor entropy = -(p * logp_safe).sum(-1);
  const at::Tensor index = action.to(at::kLong).unsqueeze(-1);
  const at::Tensor logp_action = logp.gather(-1, index).squeeze(-1);

  const at::Tensor g_pol = scale_for_reduction(grad_policy.to(acc), reduction, action);
  const at::Tensor g_ent = scale_for_reduction(grad_entropy.to(acc), reduction, action);
  const at::Tensor r = ret.to(acc);
  const at::Tensor w = weight.defined() ? weight.to(acc) : at::ones({}, x.options());

  PgGrads out;
  if (need_logit) {
    const at::Tensor c_pol = (g_pol * w * r).unsqueeze(-1);
    const at::Tensor c_ent = (g_ent * w).unsqueeze(-1);
    const at::Tensor onehot = at::zeros_like(p).scatter(-1, index, 1.0);
    const at::Tensor g = c_pol * (p - onehot) - c_ent * p * (logp_safe + entropy.unsqueeze(-1));
    out.logit = g.to(logit.scalar_type());
  }
  if (need_ret) {
    out.ret = (-g_pol * w * logp_action).to(ret.scalar_type());
  }
  if (need_weight && weight.defined()) {
    out.weight = (-g_pol * r * logp_action + g_ent * entropy).to(weight.scalar_type());
  }
  return out;
}

}  // namespace pgext
