// The pgext operator library: every schema in one place. Backends register
// their kernels in their own files (cpu/, cuda/, pg_meta.cpp, pg_autograd.cpp).
#include <torch/library.h>

TORCH_LIBRARY(pgext, m) {
  // The user-facing op: policy_loss and entropy_loss of a categorical policy.
  // Every op's trailing `temperature` T (a finite number > 0) makes it that
  // of the logits divided by T, applied as each logit is read (the saved lse
  // and entropy are those of logit / T too); gradients are with respect to
  // the logits as given.
  m.def(
      "pg_error(Tensor logit, Tensor action, Tensor return_, Tensor? weight=None, "
      "str reduction='mean', float temperature=1.0) -> (Tensor policy_loss, Tensor entropy_loss)");
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
  // The per-sample log-probability of the action and entropy of a categorical
  // policy, for any upstream gradients of either: pg_error's fused kernels
  // with a return of -1 and reduction 'none' (log_prob_entropy.cpp). Samples
  // whose action is ignore_index get 0 for both and no gradient.
  m.def(
      "log_prob_entropy(Tensor logit, Tensor action, int? ignore_index=None, float temperature=1.0) -> "
      "(Tensor log_prob, Tensor entropy)");
  // PPO's clipped surrogate, entropy loss, approx_kl and clipfrac (DI-engine's
  // ppo_policy_error) from per-sample log-probabilities, entropies,
  // advantages and weights, all of log_prob's shape (ppo_surrogate.cpp).
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
