// ppo_surrogate's autograd (the Autograd key): the forward kernel returns
// each sample's derivative of the two losses, so the node's backward is one
// multiply per input; with create_graph it is written as a function of
// log_prob instead, and where old_log_prob, adv or weight need a gradient (or
// a tangent is given) the op runs DI-engine's eager ops, which record theirs.
// Compiled autograd records the node in its functional form.
#include "core/checks.h"
#include "core/compiled_autograd.h"
#include "ops/ppo_surrogate/ppo_surrogate.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <array>
#include <mutex>
#include <string>
#include <vector>

namespace pgext {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

SurrogateForward call_forward(
    const at::Tensor& log_prob,
    const at::Tensor& old_log_prob,
    const at::Tensor& entropy,
    const at::Tensor& adv,
    const std::optional<at::Tensor>& weight,
    double clip_ratio,
    std::optional<double> dual_clip) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pgext::ppo_surrogate_forward", "")
                       .typed<SurrogateForward(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const std::optional<at::Tensor>&, double, std::optional<double>)>();
  return op.call(log_prob, old_log_prob, entropy, adv, weight, clip_ratio, dual_clip);
}

// What PpoSurrogateBackward saves, unpacked.
struct SurrogateSaved {
  at::Tensor log_prob, old_log_prob, adv, weight, grad_log_prob, grad_entropy;  // weight may be undefined
  double clip_ratio;
  std::optional<double> dual_clip;
  at::ScalarType entropy_dtype;
};

// The gradients of (log_prob, entropy) for the upstream gradients of
// (policy_loss, entropy_loss).
variable_list surrogate_backward(
    const variable_list& grads, const SurrogateSaved& in, std::array<bool, 2> needed, bool create_graph) {
  variable_list out(2);
  const at::Tensor& g_policy = grads[0];
  const at::Tensor& g_entropy = grads[1];
  if (needed[0] && g_policy.defined()) {
    const auto dt = in.grad_log_prob.scalar_type();
    if (create_graph) {
      // the derivative as a function of log_prob, whose own derivative is the
      // ratio's (the slope is piecewise constant)
      const at::Tensor ratio = at::exp(in.log_prob.to(dt) - in.old_log_prob.to(dt));
      at::Tensor slope = objective_slope(ratio.detach(), in.adv.to(dt), in.clip_ratio, in.dual_clip);
      if (in.weight.defined()) {
        slope = slope * in.weight.to(dt);
      }
      const double inv_n = in.log_prob.numel() > 0 ? 1.0 / static_cast<double>(in.log_prob.numel()) : 0.0;
      out[0] = (g_policy * (-(slope * ratio) * inv_n)).to(in.log_prob.scalar_type());
    } else {
      out[0] = (g_policy * in.grad_log_prob).to(in.log_prob.scalar_type());
    }
  }
  if (needed[1] && g_entropy.defined()) {
    out[1] = (g_entropy * in.grad_entropy).to(in.entropy_dtype);
  }
  return out;
}

// Compiled autograd records the node as a call of this function of the
// upstream gradients and the arguments apply_with_saved packs, in that order.
variable_list surrogate_backward_functional(const variable_list& grads, const std::vector<c10::IValue>& args) {
  torch::dynamo::autograd::PackedArgs packed(args);
  SurrogateSaved in;
  in.log_prob = packed.unpack<at::Tensor>();
  in.old_log_prob = packed.unpack<at::Tensor>();
  in.adv = packed.unpack<at::Tensor>();
  in.weight = packed.unpack<std::optional<at::Tensor>>().value_or(at::Tensor());
  in.grad_log_prob = packed.unpack<at::Tensor>();
  in.grad_entropy = packed.unpack<at::Tensor>();
  in.clip_ratio = packed.unpack<double>();
  in.dual_clip = packed.unpack<std::optional<double>>();
  in.entropy_dtype = packed.unpack<at::ScalarType>();
  const auto needed = packed.unpack<std::vector<bool>>();
  const bool create_graph = packed.unpack<bool>();
  return surrogate_backward(grads, in, {needed[0], needed[1]}, create_graph);
}

// The types of what PpoSurrogateBackward::apply_with_saved packs, in order.
std::vector<at::TypePtr> functional_schema() {
  const auto tensor = at::TensorType::get();
  return {tensor, tensor, tensor, at::OptionalType::create(tensor), tensor, tensor, at::FloatType::get(),
          at::OptionalType::create(at::FloatType::get()), at::ScalarTypeType::get()};
}

CompiledFunctional compiled_functional{"pgext_PpoSurrogateBackward", &surrogate_backward_functional, &functional_schema, {}};

// Backward of ppo_surrogate with respect to log_prob and entropy (the fused
// path is taken only when nothing else needs a gradient).
struct PpoSurrogateBackward final : public torch::autograd::TraceableFunction {
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    return surrogate_backward(grads, unpack(), needed(), at::GradMode::is_enabled());
  }

  std::string name() const override {
    return "PpoSurrogateBackward";
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* v : saved()) {
      v->reset_data();
    }
  }

  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    for (const SavedVariable* v : {&log_prob_, &old_log_prob_, &adv_, &weight_, &grad_log_prob_, &grad_entropy_}) {
      args.collect(*v, /*is_output=*/false);
    }
    args.collect(clip_ratio_);
    args.collect(dual_clip_);
    args.collect(entropy_dtype_);
  }

  variable_list apply_with_saved(
      const variable_list& grads, torch::dynamo::autograd::SwapSavedVariables& saved) override {
    return apply_functional(*this, compiled_functional, grads, saved, this->saved(), needed(),
                            [&](torch::dynamo::autograd::PackedArgs& packed) {
                              const SurrogateSaved in = unpack();
                              packed.pack(in.log_prob);
                              packed.pack(in.old_log_prob);
                              packed.pack(in.adv);
                              packed.pack(optional_tensor(in.weight));
                              packed.pack(in.grad_log_prob);
                              packed.pack(in.grad_entropy);
                              packed.pack(in.clip_ratio);
                              packed.pack(in.dual_clip);
                              packed.pack(in.entropy_dtype);
                            });
  }

  SavedVariable log_prob_, old_log_prob_, adv_, weight_, grad_log_prob_, grad_entropy_;
  double clip_ratio_ = 0.2;
  std::optional<double> dual_clip_;
  at::ScalarType entropy_dtype_ = at::kFloat;

 private:
  std::array<SavedVariable*, 6> saved() {
    return {&log_prob_, &old_log_prob_, &adv_, &weight_, &grad_log_prob_, &grad_entropy_};
  }
  SurrogateSaved unpack() const {
    return {log_prob_.unpack(),      old_log_prob_.unpack(), adv_.unpack(), weight_.unpack(),
            grad_log_prob_.unpack(), grad_entropy_.unpack(), clip_ratio_,   dual_clip_,
            entropy_dtype_};
  }
  std::array<bool, 2> needed() const {
    return {task_should_compute_output(0), task_should_compute_output(1)};
  }
};

Outputs ppo_surrogate_autograd(
    const at::Tensor& log_prob,
    const at::Tensor& old_log_prob,
    const at::Tensor& entropy,
    const at::Tensor& adv,
    const std::optional<at::Tensor>& weight,
    double clip_ratio,
    std::optional<double> dual_clip) {
  const at::Tensor w = weight.value_or(at::Tensor());
  check_dense({{"log_prob", &log_prob}, {"old_log_prob", &old_log_prob}, {"entropy", &entropy}, {"adv", &adv},
               {"weight", &w}});
  check_surrogate_inputs(log_prob, old_log_prob, entropy, adv, w, clip_ratio, dual_clip);
  // A gradient for the old log-probabilities, the advantages or the weights,
  // or a forward-mode tangent anywhere: DI-engine's ops, which record them.
  if (torch::autograd::compute_requires_grad(old_log_prob, adv, w) ||
      has_tangent({&log_prob, &old_log_prob, &entropy, &adv, &w})) {
    return ppo_surrogate_eager(log_prob, old_log_prob, entropy, adv, w, clip_ratio, dual_clip);
  }
  SurrogateForward out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = call_forward(log_prob, old_log_prob, entropy, adv, weight, clip_ratio, dual_clip);
  }
  auto& [policy_loss, entropy_loss, approx_kl, clipfrac, grad_lp, grad_ent] = out;
  if (torch::autograd::compute_requires_grad(log_prob, entropy)) {
    auto node = c10::make_intrusive<PpoSurrogateBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(log_prob, entropy));
    node->log_prob_ = SavedVariable(log_prob, false);
    node->old_log_prob_ = SavedVariable(old_log_prob, false);
    node->adv_ = SavedVariable(adv, false);
    node->weight_ = SavedVariable(w, false);
    node->grad_log_prob_ = SavedVariable(grad_lp, false);
    node->grad_entropy_ = SavedVariable(grad_ent, false);
    node->clip_ratio_ = clip_ratio;
    node->dual_clip_ = dual_clip;
    node->entropy_dtype_ = entropy.scalar_type();
    torch::autograd::set_history(policy_loss, node);
    torch::autograd::set_history(entropy_loss, node);
  }
  return {policy_loss, entropy_loss, approx_kl, clipfrac};
}

// Below autograd (no_grad, inference mode, tracing): the forward kernel.
Outputs ppo_surrogate_no_grad(
    const at::Tensor& log_prob,
    const at::Tensor& old_log_prob,
    const at::Tensor& entropy,
    const at::Tensor& adv,
    const std::optional<at::Tensor>& weight,
    double clip_ratio,
    std::optional<double> dual_clip) {
  auto out = call_forward(log_prob, old_log_prob, entropy, adv, weight, clip_ratio, dual_clip);
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out)};
}
}  // namespace

TORCH_LIBRARY_IMPL(pgext, Autograd, m) {
  m.impl("ppo_surrogate", &ppo_surrogate_autograd);
}

TORCH_LIBRARY_IMPL(pgext, CompositeExplicitAutograd, m) {
  m.impl("ppo_surrogate", &ppo_surrogate_no_grad);
}

}  // namespace pgext
