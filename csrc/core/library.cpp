// The pgext operator library and the schemas of the row kernels every op is
// built on (core/cpu, core/cuda): pg_error's forward and backward, and the
// per-shard statistics and gradient that pgext.distributed and the fused output
// layer merge across class slices. Each user-facing op defines its own schema
// beside its kernels (ops/<op>/, a fragment of this library).
//
// Every op's trailing `temperature` T (a finite number > 0) makes it that of
// the logits divided by T, applied as each logit is read (the saved lse and
// entropy are those of logit / T too); gradients are with respect to the
// logits as given.
#include <torch/library.h>

TORCH_LIBRARY(pgext, m) {
  // Forward kernel: the two losses plus the per-sample log-sum-exp (float64,
  // exact enough for backward to form x - lse at any magnitude) and entropy
  // (float32; float64 for float64 logits) that backward needs, of action's shape.
  // return_ and weight have action's shape or broadcast to it without changing it.
  m.def(
      "pg_error_forward(Tensor logit, Tensor action, Tensor return_, Tensor? weight, "
      "str reduction, float temperature=1.0) -> "
      "(Tensor policy_loss, Tensor entropy_loss, Tensor lse, Tensor entropy)");
  // Backward kernel: the gradient with respect to logit.
  m.def(
      "pg_error_backward(Tensor grad_policy, Tensor grad_entropy, Tensor logit, Tensor action, "
      "Tensor return_, Tensor? weight, Tensor lse, Tensor entropy, str reduction, float temperature=1.0) -> Tensor");
  // Pieces for logits sharded over the class dimension (pgext.distributed):
  // this shard's per-sample max, sum exp(x - max), sum exp(x - max) * (x - max)
  // and the action's logit (0 where the action lies in another shard), for
  // classes [vocab_start, vocab_start + N_local).
  m.def(
      "pg_row_stats(Tensor logit, Tensor action, int vocab_start=0, float temperature=1.0) -> "
      "(Tensor max, Tensor sum_exp, Tensor shifted_sum, Tensor action_logit)");
  // pg_error_backward for a shard, from the global per-sample lse and entropy;
  // actions outside the shard contribute no one-hot term.
  m.def(
      "pg_grad_from_stats(Tensor grad_policy, Tensor grad_entropy, Tensor logit, Tensor action, "
      "Tensor return_, Tensor? weight, Tensor lse, Tensor entropy, str reduction, int vocab_start, "
      "float temperature=1.0) -> Tensor");
  // Folds one part's pg_row_stats (float32 or float64, (rows,) each) into
  // running statistics of the same rows (float64, (rows,), updated in place),
  // as math::combine merges two parts of a row: one launch per class slice of
  // the fused output layer. Running statistics start as max -inf and zeros.
  m.def(
      "pg_merge_row_stats_(Tensor(a!) max, Tensor(b!) sum_exp, Tensor(c!) shifted_sum, "
      "Tensor(d!) action_logit, Tensor part_max, Tensor part_sum_exp, Tensor part_shifted_sum, "
      "Tensor part_action_logit) -> ()");
}
