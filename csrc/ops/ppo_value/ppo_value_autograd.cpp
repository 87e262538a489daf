// ppo_value's autograd (the Autograd key): the forward kernel returns each
// sample's derivative of the loss, so the node's backward is one multiply;
// with create_graph it is written as a function of value_new instead, and
// where value_old, return_ or weight need a gradient (or a tangent is given)
// the op runs DI-engine's eager ops, which record theirs. Compiled autograd
// records the node in its functional form.
#include "core/checks.h"
#include "core/compiled_autograd.h"
#include "ops/ppo_value/ppo_value.h"

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

ValueForward call_forward(
    const at::Tensor& value_new,
    const at::Tensor& value_old,
    const at::Tensor& return_,
    const std::optional<at::Tensor>& weight,
    double clip_ratio,
    bool use_value_clip) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pgext::ppo_value_forward", "")
                       .typed<ValueForward(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           double, bool)>();
  return op.call(value_new, value_old, return_, weight, clip_ratio, use_value_clip);
}

// What PpoValueBackward saves, unpacked.
struct ValueSaved {
  at::Tensor value_new, value_old, return_, weight, grad_value_new;  // weight may be undefined
  double clip_ratio;
  bool use_value_clip;
};

// The gradient of value_new for the upstream gradient of the loss.
variable_list value_backward(const variable_list& grads, const ValueSaved& in, bool needed, bool create_graph) {
  variable_list out(1);
  const at::Tensor& g = grads[0];
  if (!needed || !g.defined()) {
    return out;
  }
  const auto dt = in.grad_value_new.scalar_type();
  if (create_graph) {
    // the derivative as a function of value_new (linear between the tie and
    // clip points), so that its own derivative is the loss's second
    const at::Tensor w = in.weight.defined() ? in.weight.to(dt) : at::Tensor();
    const at::Tensor slope = value_gradient(
        in.value_new.to(dt), in.value_old.to(dt), in.return_.to(dt), w, in.clip_ratio, in.use_value_clip);
    out[0] = (g * slope).to(in.value_new.scalar_type());
  } else {
    out[0] = (g * in.grad_value_new).to(in.value_new.scalar_type());
  }
  return out;
}

// Compiled autograd records the node as a call of this function of the
// upstream gradients and the arguments apply_with_saved packs, in that order.
variable_list value_backward_functional(const variable_list& grads, const std::vector<c10::IValue>& args) {
  torch::dynamo::autograd::PackedArgs packed(args);
  ValueSaved in;
  in.value_new = packed.unpack<at::Tensor>();
  in.value_old = packed.unpack<at::Tensor>();
  in.return_ = packed.unpack<at::Tensor>();
  in.weight = packed.unpack<std::optional<at::Tensor>>().value_or(at::Tensor());
  in.grad_value_new = packed.unpack<at::Tensor>();
  in.clip_ratio = packed.unpack<double>();
  in.use_value_clip = packed.unpack<bool>();
  const auto needed = packed.unpack<std::vector<bool>>();
  const bool create_graph = packed.unpack<bool>();
  return value_backward(grads, in, needed[0], create_graph);
}

// The types of what PpoValueBackward::apply_with_saved packs, in order.
std::vector<at::TypePtr> functional_schema() {
  const auto tensor = at::TensorType::get();
  return {tensor, tensor, tensor, at::OptionalType::create(tensor), tensor, at::FloatType::get(), at::BoolType::get()};
}

CompiledFunctional compiled_functional{"pgext_PpoValueBackward", &value_backward_functional, &functional_schema, {}};

// Backward of ppo_value with respect to value_new (the fused path is taken
// only when nothing else needs a gradient).
struct PpoValueBackward final : public torch::autograd::TraceableFunction {
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    return value_backward(grads, unpack(), needed()[0], at::GradMode::is_enabled());
  }

  std::string name() const override {
    return "PpoValueBackward";
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* v : saved()) {
      v->reset_data();
    }
  }

  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    for (const SavedVariable* v : {&value_new_, &value_old_, &return_, &weight_, &grad_value_new_}) {
      args.collect(*v, /*is_output=*/false);
    }
    args.collect(clip_ratio_);
    args.collect(use_value_clip_);
  }

  variable_list apply_with_saved(
      const variable_list& grads, torch::dynamo::autograd::SwapSavedVariables& saved) override {
    return apply_functional(*this, compiled_functional, grads, saved, this->saved(), needed(),
                            [&](torch::dynamo::autograd::PackedArgs& packed) {
                              const ValueSaved in = unpack();
                              packed.pack(in.value_new);
                              packed.pack(in.value_old);
                              packed.pack(in.return_);
                              packed.pack(optional_tensor(in.weight));
                              packed.pack(in.grad_value_new);
                              packed.pack(in.clip_ratio);
                              packed.pack(in.use_value_clip);
                            });
  }

  SavedVariable value_new_, value_old_, return_, weight_, grad_value_new_;
  double clip_ratio_ = 0.2;
  bool use_value_clip_ = true;

 private:
  std::array<SavedVariable*, 5> saved() {
    return {&value_new_, &value_old_, &return_, &weight_, &grad_value_new_};
  }
  ValueSaved unpack() const {
    return {value_new_.unpack(),      value_old_.unpack(), return_.unpack(), weight_.unpack(),
            grad_value_new_.unpack(), clip_ratio_,         use_value_clip_};
  }
  std::array<bool, 1> needed() const {
    return {task_should_compute_output(0)};
  }
};

at::Tensor ppo_value_autograd(
    const at::Tensor& value_new,
    const at::Tensor& value_old,
    const at::Tensor& return_,
    const std::optional<at::Tensor>& weight,
    double clip_ratio,
    bool use_value_clip) {
  const at::Tensor w = weight.value_or(at::Tensor());
  check_dense(
      {{"value_new", &value_new}, {"value_old", &value_old}, {"return_", &return_}, {"weight", &w}}, "ppo_value");
  check_value_inputs(value_new, value_old, return_, w, clip_ratio);
  // A gradient for the old values, the returns or the weights, or a
  // forward-mode tangent anywhere: DI-engine's ops, which record them.
  if (torch::autograd::compute_requires_grad(value_old, return_, w) ||
      has_tangent({&value_new, &value_old, &return_, &w})) {
    return ppo_value_eager(value_new, value_old, return_, w, clip_ratio, use_value_clip);
  }
  ValueForward out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = call_forward(value_new, value_old, return_, weight, clip_ratio, use_value_clip);
  }
  auto& [loss, grad_vn] = out;
  if (torch::autograd::compute_requires_grad(value_new)) {
    auto node = c10::make_intrusive<PpoValueBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(value_new));
    node->value_new_ = SavedVariable(value_new, false);
    node->value_old_ = SavedVariable(value_old, false);
    node->return_ = SavedVariable(return_, false);
    node->weight_ = SavedVariable(w, false);
    node->grad_value_new_ = SavedVariable(grad_vn, false);
    node->clip_ratio_ = clip_ratio;
    node->use_value_clip_ = use_value_clip;
    torch::autograd::set_history(loss, node);
  }
  return loss;
}

// Below autograd (no_grad, inference mode, tracing): the forward kernel.
at::Tensor ppo_value_no_grad(
    const at::Tensor& value_new,
    const at::Tensor& value_old,
    const at::Tensor& return_,
    const std::optional<at::Tensor>& weight,
    double clip_ratio,
    bool use_value_clip) {
  return std::get<0>(call_forward(value_new, value_old, return_, weight, clip_ratio, use_value_clip));
}
}  // namespace

TORCH_LIBRARY_IMPL(pgext, Autograd, m) {
  m.impl("ppo_value", &ppo_value_autograd);
}

TORCH_LIBRARY_IMPL(pgext, CompositeExplicitAutograd, m) {
  m.impl("ppo_value", &ppo_value_no_grad);
}

}  // namespace pgext
