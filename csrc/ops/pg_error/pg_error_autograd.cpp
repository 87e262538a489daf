// Autograd for pg_error in C++, at the Autograd key: Python and C++ callers
// alike get gradients, and torch.compile traces forward and backward ops.
#include "core/compiled_autograd.h"
#include "core/ops.h"
#include "ops/pg_error/pg_error_grad_composite.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <array>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace pgext {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// The saved state of pg_error's backward node, unpacked: what its gradient
// needs besides the upstream gradients.
struct SavedForBackward {
  at::Tensor logit, action, ret, weight, lse, entropy;  // weight undefined if absent
  std::string reduction;
  double temperature = 1.0;
};

// The gradients of pg_error's inputs (logit, action (never), return_,
// weight) for the upstream gradients of (policy_loss, entropy_loss), those
// asked for by `needed`. `create_graph`: results that can themselves be
// differentiated (the fused kernel through its Autograd kernel, the
// per-sample gradients in ATen ops).
variable_list backward_grads(
    const variable_list& grads, const SavedForBackward& in, const std::array<bool, 4>& needed, bool create_graph) {
  // A loss left out of what is differentiated has no gradient: it counts as 0.
  at::Tensor grad_policy = grads[0];
  at::Tensor grad_entropy = grads[1];
  if (!grad_policy.defined() && !grad_entropy.defined()) {
    return variable_list(4);
  }
  if (!grad_policy.defined()) {
    grad_policy = at::zeros_like(grad_entropy);
  } else if (!grad_entropy.defined()) {
    grad_entropy = at::zeros_like(grad_policy);
  }
  const at::Tensor& logit = in.logit;
  const at::Tensor& action = in.action;
  const at::Tensor& ret = in.ret;
  const at::Tensor& weight = in.weight;
  const at::Tensor& lse = in.lse;
  const Reduction red = parse_reduction(in.reduction);
  const bool need_logit = needed[0];
  const bool need_ret = needed[2];
  const bool need_weight = weight.defined() && needed[3];

  if (create_graph) {
    // The gradient of the logits from the fused kernel all the same: the
    // op's Autograd kernel records how to differentiate it again
    // (PgErrorGradBackward). torch.func.grad and vjp always ask for
    // create_graph; with the composite formula they ran about 8x slower than
    // backward() (2048 x 1000: 28 against 3.4 ms). The per-sample gradients
    // need the log-probabilities as differentiable functions of the logits,
    // not the saved lse: composite.
    const std::optional<at::Tensor> weight_opt =
        weight.defined() ? std::optional<at::Tensor>(weight) : std::nullopt;
    at::Tensor grad_logit = need_logit ? ops::pg_error_backward(grad_policy, grad_entropy, logit, action, ret,
                                                                weight_opt, lse, in.entropy, in.reduction,
                                                                in.temperature)
                                       : at::Tensor();
    if (!need_ret && !need_weight) {
      return {grad_logit, at::Tensor(), at::Tensor(), at::Tensor()};
    }
    auto g = pg_error_grads_composite(
        grad_policy, grad_entropy, logit, action, ret, weight, red, /*need_logit=*/false, need_ret, need_weight,
        in.temperature);
    return {grad_logit, at::Tensor(), g.ret, g.weight};
  }

  at::Tensor grad_logit, grad_ret, grad_weight;
  if (need_logit) {
    const std::optional<at::Tensor> weight_opt =
        weight.defined() ? std::optional<at::Tensor>(weight) : std::nullopt;
    // Grad mode is off here, so the op's Autograd kernel would only pass the
    // call on: go straight to the backend kernel.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    grad_logit = ops::pg_error_backward(
        grad_policy, grad_entropy, logit, action, ret, weight_opt, lse, in.entropy, in.reduction, in.temperature);
  }
  if (need_ret || need_weight) {
    // Per-sample gradients: log_prob is one gather away from the saved lse
    // (float64, so that x_a - lse is exact whatever the logits' magnitude),
    // the lse of logit / T with x_a / T.
    const auto acc = acc_type(logit.scalar_type());
    at::Tensor x_action = logit.gather(-1, gather_index(action, logit.sym_size(-1))).squeeze(-1).to(at::kDouble);
    if (in.temperature != 1.0) {
      x_action = x_action / in.temperature;
    }
    const at::Tensor log_prob = (x_action - lse).to(acc);
    const at::Tensor g_pol = scale_for_reduction(grad_policy.to(acc), red, action);
    if (need_ret) {
      const at::Tensor w = weight.defined() ? weight.to(acc) : at::ones({}, log_prob.options());
      grad_ret = sum_to_shape_of(-g_pol * w * log_prob, ret).to(ret.scalar_type());
    }
    if (need_weight) {
      const at::Tensor g_ent = scale_for_reduction(grad_entropy.to(acc), red, action);
      grad_weight =
          sum_to_shape_of(-g_pol * ret.to(acc) * log_prob + g_ent * in.entropy, weight).to(weight.scalar_type());
    }
  }
  return {grad_logit, at::Tensor(), grad_ret, grad_weight};
}

// Compiled autograd (torch._dynamo.config.compiled_autograd) records a C++
// node as a call of a function of the upstream gradients and packed
// arguments. This is PgErrorBackward's; the arguments are those that
// PgErrorBackward::apply_with_saved packs, in that order.
variable_list backward_functional(const variable_list& grads, const std::vector<c10::IValue>& args) {
  torch::dynamo::autograd::PackedArgs packed(args);
  SavedForBackward in;
  in.logit = packed.unpack<at::Tensor>();
  in.action = packed.unpack<at::Tensor>();
  in.ret = packed.unpack<at::Tensor>();
  in.weight = packed.unpack<std::optional<at::Tensor>>().value_or(at::Tensor());
  in.lse = packed.unpack<at::Tensor>();
  in.entropy = packed.unpack<at::Tensor>();
  in.reduction = packed.unpack<std::string>();
  in.temperature = packed.unpack<double>();
  const auto needed = packed.unpack<std::vector<bool>>();
  const bool create_graph = packed.unpack<bool>();
  return backward_grads(grads, in, {needed[0], needed[1], needed[2], needed[3]}, create_graph);
}

// The types of what PgErrorBackward::apply_with_saved packs (weight: an
// optional tensor), in order.
std::vector<at::TypePtr> functional_schema() {
  const auto tensor = at::TensorType::get();
  return {tensor, tensor, tensor, at::OptionalType::create(tensor), tensor, tensor, at::StringType::get(),
          at::FloatType::get()};
}

CompiledFunctional compiled_functional{"pgext_PgErrorBackward", &backward_functional, &functional_schema, {}};

// The backward node of pg_error. It is a plain autograd Node, as PyTorch's
// own derivatives are, rather than a torch::autograd::Function: that one
// keeps its extra state in a boxed map and wraps outputs generically, which at
// small batches costs as much as the kernels. Saved: the inputs (no copies)
// and the per-sample log-sum-exp (float64) and entropy: 12 bytes per sample
// for float32 logits.
struct PgErrorBackward final : public torch::autograd::TraceableFunction {
  // Inputs of the node: the gradients of (policy_loss, entropy_loss).
  // Outputs, in next_edges order: logit, action (never), return_, weight.
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const SavedForBackward in{logit_.unpack(), action_.unpack(), ret_.unpack(), weight_.unpack(),
                              lse_.unpack(),   entropy_.unpack(), reduction_,     temperature_};
    // create_graph=True: the engine runs backward with grad mode on
    return backward_grads(grads, in, needed(), at::GradMode::is_enabled());
  }

  std::string name() const override {
    return "PgErrorBackward";
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* v : saved()) {
      v->reset_data();
    }
  }

  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    for (const SavedVariable* v : {&logit_, &action_, &ret_, &weight_, &lse_, &entropy_}) {
      args.collect(*v, /*is_output=*/false);
    }
    args.collect(reduction_);
    args.collect(temperature_);
  }

  variable_list apply_with_saved(
      const variable_list& grads, torch::dynamo::autograd::SwapSavedVariables& saved) override {
    saved.before(reduction_);
    variable_list result = apply_functional(*this, compiled_functional, grads, saved, this->saved(), needed(),
                                            [&](torch::dynamo::autograd::PackedArgs& packed) {
                                              packed.pack(logit_.unpack());
                                              packed.pack(action_.unpack());
                                              packed.pack(ret_.unpack());
                                              packed.pack(optional_tensor(weight_.unpack()));
                                              packed.pack(lse_.unpack());
                                              packed.pack(entropy_.unpack());
                                              packed.pack(reduction_);
                                              packed.pack(temperature_);
                                            });
    saved.after(reduction_);
    return result;
  }

  SavedVariable logit_, action_, ret_, weight_, lse_, entropy_;
  std::string reduction_;
  double temperature_ = 1.0;

 private:
  std::array<SavedVariable*, 6> saved() {
    return {&logit_, &action_, &ret_, &weight_, &lse_, &entropy_};
  }
  std::array<bool, 4> needed() const {
    return {task_should_compute_output(0), false, task_should_compute_output(2), task_should_compute_output(3)};
  }
};

// Forward mode: the tangents of pg_error's outputs (the two losses, then the
// per-sample lse and entropy where asked for) when an input carries one.
// Level 0 as in PyTorch's generated derivatives, which also compute tangents
// from the primals: a tangent must not carry one itself.
void set_forward_tangents(
    const at::Tensor& logit,
    const at::Tensor& action,
    const at::Tensor& ret,
    const at::Tensor& w,
    c10::string_view reduction,
    double temperature,
    std::initializer_list<at::Tensor*> outputs) {
  const at::Tensor d_logit = logit._fw_grad(0);
  const at::Tensor d_ret = ret._fw_grad(0);
  const at::Tensor d_weight = w.defined() ? w._fw_grad(0) : at::Tensor();
  if (!d_logit.defined() && !d_ret.defined() && !d_weight.defined()) {
    return;
  }
  at::Tensor* const* out = outputs.begin();
  const auto t = pg_error_tangents_composite(
      logit._fw_primal(0), action, ret._fw_primal(0), w.defined() ? w._fw_primal(0) : w,
      parse_reduction(reduction), out[0]->scalar_type(), d_logit, d_ret, d_weight, temperature);
  const at::Tensor tangents[] = {t.policy, t.entropy, t.lse, t.row_entropy};
  for (size_t i = 0; i < outputs.size(); ++i) {
    if (tangents[i].defined()) {
      // the tangent in its primal's dtype (lse is float64)
      out[i]->_set_fw_grad(tangents[i].to(out[i]->scalar_type()), /*level=*/0, /*is_inplace_op=*/false);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> pg_error_autograd(
    const at::Tensor& logit,
    const at::Tensor& action,
    const at::Tensor& ret,
    const std::optional<at::Tensor>& weight,
    c10::string_view reduction,
    double temperature) {
  const at::Tensor w = weight.value_or(at::Tensor());
  check_dense({{"logit", &logit}, {"action", &action}, {"return_", &ret}, {"weight", &w}});
  const bool requires_grad = torch::autograd::compute_requires_grad(logit, ret, w);
  at::Tensor policy, entropy, lse, row_entropy;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(policy, entropy, lse, row_entropy) =
        ops::pg_error_forward(logit, action, ret, weight, reduction, temperature);
  }
  if (requires_grad) {
    auto node = c10::make_intrusive<PgErrorBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(logit, action, ret, w));
    node->logit_ = SavedVariable(logit, false);
    node->action_ = SavedVariable(action, false);
    node->ret_ = SavedVariable(ret, false);
    node->weight_ = SavedVariable(w, false);
    node->lse_ = SavedVariable(lse, false);
    node->entropy_ = SavedVariable(row_entropy, false);
    node->reduction_ = std::string(reduction);
    node->temperature_ = temperature;
    torch::autograd::set_history(policy, node);
    torch::autograd::set_history(entropy, node);
  }
  set_forward_tangents(logit, action, ret, w, reduction, temperature, {&policy, &entropy});
  return {policy, entropy};
}

// Below autograd (no_grad, inference mode, tracing of the forward graph) the
// op is its forward kernel without the saved statistics.
std::tuple<at::Tensor, at::Tensor> pg_error_no_grad(
    const at::Tensor& logit,
    const at::Tensor& action,
    const at::Tensor& ret,
    const std::optional<at::Tensor>& weight,
    c10::string_view reduction,
    double temperature) {
  const at::Tensor w = weight.value_or(at::Tensor());
  check_dense({{"logit", &logit}, {"action", &action}, {"return_", &ret}, {"weight", &w}});
  auto out = ops::pg_error_forward(logit, action, ret, weight, reduction, temperature);
  return {std::get<0>(out), std::get<1>(out)};
}

// The kernel ops are not differentiable themselves: with grad mode on and an
// input that requires grad, or with a forward-mode tangent, refuse rather
// than return a constant silently. (pg_error_forward alone has tangents:
// nested torch.func transforms of pg_error reach it with theirs.)
void refuse_grad(const char* op, std::initializer_list<const at::Tensor*> inputs, bool forward_mode = false) {
  for (const at::Tensor* t : inputs) {
    if (!t->defined()) {
      continue;
    }
    TORCH_CHECK(
        !(at::GradMode::is_enabled() && t->requires_grad()),
        "pgext::", op, " is a kernel op without gradients; call pgext::pg_error (pgext.pg_error in "
        "Python) to differentiate pg_error. Nested reverse-mode torch.func transforms of pg_error "
        "(jacrev(jacrev(f))) are not supported: use torch.func.hessian or "
        "torch.autograd.grad(create_graph=True)");
    TORCH_CHECK(
        forward_mode || !t->_fw_grad(0).defined(),
        "pgext::", op, " is a kernel op without a forward-mode derivative; use pgext::pg_error "
        "(pgext.pg_error in Python). Forward mode through pg_error's backward needs "
        "create_graph=True, which torch.func transforms use");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pg_error_forward_autograd(
    const at::Tensor& logit,
    const at::Tensor& action,
    const at::Tensor& ret,
    const std::optional<at::Tensor>& weight,
    c10::string_view reduction,
    double temperature) {
  const at::Tensor w = weight.value_or(at::Tensor());
  check_dense({{"logit", &logit}, {"action", &action}, {"return_", &ret}, {"weight", &w}});
  refuse_grad("pg_error_forward", {&logit, &ret, &w}, /*forward_mode=*/true);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = ops::pg_error_forward(logit, action, ret, weight, reduction, temperature);
  }
  auto& [policy, entropy, lse, row_entropy] = out;
  set_forward_tangents(logit, action, ret, w, reduction, temperature, {&policy, &entropy, &lse, &row_entropy});
  return out;
}

// The backward node of pg_error_backward, for second and higher order: the
// first-order gradient stays the fused kernel's, and this node's
// vector-Jacobian product is the composite formula's, in closed form
// (pg_error_grad_logit_vjp_composite). The saved statistics (lse, entropy)
// are functions of the logits, recomputed there; they take no gradient.
struct PgErrorGradBackward final : public torch::autograd::TraceableFunction {
  // Outputs, in next_edges order: grad_policy, grad_entropy, logit, action
  // (never), return_, weight, lse (never), entropy (never).
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list result(8);
    if (!grads[0].defined()) {
      return result;
    }
    const std::array<bool, 5> need = {task_should_compute_output(0), task_should_compute_output(1),
                                      task_should_compute_output(2), task_should_compute_output(4),
                                      task_should_compute_output(5)};
    // In closed form with ATen ops, so that with grad mode on (this backward
    // must be differentiable) its own graph is recorded.
    const auto g = pg_error_grad_logit_vjp_composite(
        grads[0], grad_policy_.unpack(), grad_entropy_.unpack(), logit_.unpack(), action_.unpack(), ret_.unpack(),
        weight_.unpack(), parse_reduction(reduction_), need, temperature_);
    result[0] = g.grad_policy;
    result[1] = g.grad_entropy;
    result[2] = g.logit;
    result[4] = g.ret;
    result[5] = g.weight;
    return result;
  }

  std::string name() const override {
    return "PgErrorGradBackward";
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* v : {&grad_policy_, &grad_entropy_, &logit_, &action_, &ret_, &weight_}) {
      v->reset_data();
    }
  }

  SavedVariable grad_policy_, grad_entropy_, logit_, action_, ret_, weight_;
  std::string reduction_;
  double temperature_ = 1.0;
};

bool has_forward_tangent(std::initializer_list<const at::Tensor*> inputs) {
  for (const at::Tensor* t : inputs) {
    if (t->defined() && t->_fw_grad(/*level=*/0).defined()) {
      return true;
    }
  }
  return false;
}

at::Tensor pg_error_backward_autograd(
    const at::Tensor& grad_policy,
    const at::Tensor& grad_entropy,
    const at::Tensor& logit,
    const at::Tensor& action,
    const at::Tensor& ret,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& lse,
    const at::Tensor& entropy,
    c10::string_view reduction,
    double temperature) {
  const at::Tensor w = weight.value_or(at::Tensor());
  check_dense({{"grad_policy", &grad_policy}, {"grad_entropy", &grad_entropy}, {"logit", &logit},
               {"action", &action}, {"return_", &ret}, {"weight", &w}, {"lse", &lse}, {"entropy", &entropy}});
  // The statistics are functions of the logits that the gradient recomputes:
  // a gradient or tangent of their own would be dropped.
  refuse_grad("pg_error_backward", {&lse, &entropy}, /*forward_mode=*/true);
  if (has_forward_tangent({&grad_policy, &grad_entropy, &logit, &ret, &w, &lse, &entropy})) {
    // Forward mode through pg_error's backward (torch.func.hessian): the
    // composite formula, whose ATen ops carry the tangents.
    check_inputs(logit, action, ret, weight);
    check_backward_inputs(grad_policy, grad_entropy, lse, entropy, action, parse_reduction(reduction));
    check_temperature(temperature);
    return pg_error_grads_composite(
               grad_policy, grad_entropy, logit, action, ret, w, parse_reduction(reduction),
               /*need_logit=*/true, /*need_ret=*/false, /*need_weight=*/false, temperature)
        .logit;
  }
  at::Tensor grad_logit;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    grad_logit = ops::pg_error_backward(
        grad_policy, grad_entropy, logit, action, ret, weight, lse, entropy, reduction, temperature);
  }
  if (torch::autograd::compute_requires_grad(grad_policy, grad_entropy, logit, ret, w)) {
    auto node = c10::make_intrusive<PgErrorGradBackward>();
    node->set_next_edges(
        torch::autograd::collect_next_edges(grad_policy, grad_entropy, logit, action, ret, w, lse, entropy));
    node->grad_policy_ = SavedVariable(grad_policy, false);
    node->grad_entropy_ = SavedVariable(grad_entropy, false);
    node->logit_ = SavedVariable(logit, false);
    node->action_ = SavedVariable(action, false);
    node->ret_ = SavedVariable(ret, false);
    node->weight_ = SavedVariable(w, false);
    node->reduction_ = std::string(reduction);
    node->temperature_ = temperature;
    torch::autograd::set_history(grad_logit, node);
  }
  return grad_logit;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pg_row_stats_autograd(
    const at::Tensor& logit,
    const at::Tensor& action,
    int64_t vocab_start,
    double temperature) {
  check_dense({{"logit", &logit}, {"action", &action}});
  refuse_grad("pg_row_stats", {&logit});
  at::AutoDispatchBelowADInplaceOrView guard;
  return ops::pg_row_stats(logit, action, vocab_start, temperature);
}

at::Tensor pg_grad_from_stats_autograd(
    const at::Tensor& grad_policy,
    const at::Tensor& grad_entropy,
    const at::Tensor& logit,
    const at::Tensor& action,
    const at::Tensor& ret,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& lse,
    const at::Tensor& entropy,
    c10::string_view reduction,
    int64_t vocab_start,
    double temperature) {
  const at::Tensor w = weight.value_or(at::Tensor());
  check_dense({{"grad_policy", &grad_policy}, {"grad_entropy", &grad_entropy}, {"logit", &logit},
               {"action", &action}, {"return_", &ret}, {"weight", &w}, {"lse", &lse}, {"entropy", &entropy}});
  refuse_grad("pg_grad_from_stats", {&grad_policy, &grad_entropy, &logit, &ret, &w, &lse, &entropy});
  at::AutoDispatchBelowADInplaceOrView guard;
  return ops::pg_grad_from_stats(
      grad_policy, grad_entropy, logit, action, ret, weight, lse, entropy, reduction, vocab_start, temperature);
}

}  // namespace

TORCH_LIBRARY_IMPL(pgext, Autograd, m) {
  m.impl("pg_row_stats", &pg_row_stats_autograd);
  m.impl("pg_grad_from_stats", &pg_grad_from_stats_autograd);
  m.impl("pg_error", &pg_error_autograd);
  m.impl("pg_error_forward", &pg_error_forward_autograd);
  m.impl("pg_error_backward", &pg_error_backward_autograd);
}

TORCH_LIBRARY_IMPL(pgext, CompositeExplicitAutograd, m) {
  m.impl("pg_error", &pg_error_no_grad);
}

}  // namespace pgext
