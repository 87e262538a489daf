#pragma once
// pg_error's derivatives written with differentiable ATen ops: the
// derivative of the fused backward kernel's gradient (second and higher
// order, e.g. MAML-style meta-RL), the per-sample gradients under
// create_graph=True, and forward mode.
#include "core/checks.h"

#include <array>

namespace pgext {

// `temperature` T: the derivatives of pg_error of logit / T, with respect to
// the logits as given (every formula below on z = logit / T, then the chain
// rule's 1 / T, all in differentiable ops).
struct PgGrads {
  at::Tensor logit;
  at::Tensor ret;
  at::Tensor weight;
};

// grad_policy / grad_entropy: 0-d ('mean', 'sum') or the shape of action.
// weight may be undefined. Only the gradients asked for are computed.
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
    double temperature = 1.0);

struct PgGradVjp {
  at::Tensor grad_policy;
  at::Tensor grad_entropy;
  at::Tensor logit;
  at::Tensor ret;
  at::Tensor weight;
};

// The vector-Jacobian product of the logits' gradient G (the `logit` of
// pg_error_grads_composite) with v (G's shape): the gradients of <v, G> with
// respect to the inputs G is computed from, those asked for (need: upstream
// gradients of the two losses, logit, return_, weight), in closed form with
// differentiable ATen ops: the backward of pg_error_backward, for second and
// higher order.
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
    double temperature = 1.0);

struct PgTangents {
  at::Tensor policy;
  at::Tensor entropy;
  at::Tensor lse;          // per sample; undefined without a logit tangent
  at::Tensor row_entropy;  // per sample; undefined without a logit tangent
};

// Forward mode (torch.func.jvp and jacfwd, torch.autograd.forward_ad): the
// tangents of the two losses (in loss_dtype) and of the per-sample log-sum-exp
// and entropy (in the accumulation type), given tangents of logit, return_
// and weight (each may be undefined: no tangent). Differentiable ATen ops as
// above.
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
    double temperature = 1.0);

}  // namespace pgext
