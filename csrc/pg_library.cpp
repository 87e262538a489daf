// The pgext operator library: every schema in one place. Backends register
// their kernels in their own files (cpu/, cuda/, pg_meta.cpp, pg_autograd.cpp).
#include <torch/library.h>

TORCH_LIBRARY(pgext, m) {
  // The user-facing op: policy_loss and entropy_loss of a categorical policy.
  m.def(
      "pg_error(Tensor logit, Tensor action, Tensor return_, Tensor? weight=None, "
      "str reduction='mean') -> (Tensor policy_loss, Tensor entropy_loss)");
  // Forward kernel: the two losses plus the per-sample log-sum-exp and entropy
  // that backward needs (shape of action, float32; float64 for float64 logits).
  m.def(
      "pg_error_forward(Tensor logit, Tensor action, Tensor return_, Tensor? weight, "
      "str reduction) -> (Tensor policy_loss, Tensor entropy_loss, Tensor lse, Tensor entropy)");
  // Backward kernel: the gradient with respect to logit.
  m.def(
      "pg_error_backward(Tensor grad_policy, Tensor grad_entropy, Tensor logit, Tensor action, "
      "Tensor return_, Tensor? weight, Tensor lse, Tensor entropy, str reduction) -> Tensor");
}
