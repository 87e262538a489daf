#pragma once
// pg_error's backward written with differentiable ATen ops, for
// create_graph=True (second-order gradients, e.g. MAML-style meta-RL). The
// fused backward kernel is not itself differentiable; this is.
#include "pg_checks.h"

namespace pgext {

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
    bool need_weight);

}  // namespace pgext
