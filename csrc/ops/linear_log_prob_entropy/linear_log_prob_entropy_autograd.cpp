// Autograd of linear_log_prob_entropy at the Autograd key (Python and C++
// callers alike; torch.compile traces the forward and backward kernel ops).
// The node saves the inputs and the per-row float64 lse and entropy (12
// bytes a row) and recomputes each chunk's logits in backward. With
// create_graph (double backward, torch.func) it runs the same chunk loop in
// differentiable ATen ops and pg_error_backward's own autograd instead.
// Compiled autograd records the node in its functional form.
#include "core/checks.h"
#include "core/compiled_autograd.h"
#include "core/ops.h"
#include "ops/linear_log_prob_entropy/linear_log_prob_entropy.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <mutex>
#include <vector>

namespace pgext {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

struct Saved {
  at::Tensor input, weight, bias, action, lse, entropy;  // bias undefined if absent
  double temperature = 1.0;
  std::optional<int64_t> ignore_index, chunk_size;
};

// The gradients as differentiable functions of the inputs and upstream
// gradients: the forward's chunk loop in ATen ops, with pg_error_backward
// (whose Autograd kernel differentiates it again) for the logits' gradient.
variable_list differentiable_grads(const at::Tensor& g_lp, const at::Tensor& g_ent, const Saved& s) {
  const int64_t rows = s.action.numel();
  const int64_t H = s.weight.size(1);
  const at::Tensor x = s.input.reshape({rows, H});
  const at::Tensor a = s.action.reshape({rows});
  const at::Tensor keep = s.ignore_index.has_value() ? a != *s.ignore_index : at::Tensor();
  const auto acc = acc_type(s.input.scalar_type());
  const at::Tensor glp = g_lp.reshape({rows}).to(acc);
  const at::Tensor gent = g_ent.reshape({rows}).to(acc);
  // statistics of the logits, which pg_error_backward's autograd recomputes
  const at::Tensor lse = s.lse.detach().reshape({rows});
  const at::Tensor ent = s.entropy.detach().reshape({rows}).to(acc);
  const at::Tensor minus_one = at::full({}, -1.0, s.input.options().dtype(acc));
  const double inv_t = 1.0 / s.temperature;
  // chunk_size counts the kernel ops' class slices; rows here
  const int64_t chunk = linear_chunk_rows(rows, s.weight.size(0), s.input.scalar_type());
  std::vector<at::Tensor> grad_input;
  at::Tensor grad_weight = at::zeros_like(s.weight);
  at::Tensor grad_bias = s.bias.defined() ? at::zeros_like(s.bias) : at::Tensor();
  for (int64_t start = 0; start < rows; start += chunk) {
    const int64_t len = std::min(chunk, rows - start);
    const at::Tensor xc = x.narrow(0, start, len);
    const at::Tensor z = (s.bias.defined() ? at::addmm(s.bias, xc, s.weight.t()) : at::mm(xc, s.weight.t())) * inv_t;
    const at::Tensor g =
        ops::pg_error_backward(glp.narrow(0, start, len), gent.narrow(0, start, len), z, a.narrow(0, start, len),
                               minus_one,
                               keep.defined() ? std::optional<at::Tensor>(keep.narrow(0, start, len)) : std::nullopt,
                               lse.narrow(0, start, len), ent.narrow(0, start, len), "none") *
        inv_t;
    grad_input.push_back(at::mm(g, s.weight));
    grad_weight = grad_weight + at::mm(g.t(), xc);
    if (grad_bias.defined()) {
      grad_bias = grad_bias + g.sum(0);
    }
  }
  at::Tensor gi = rows == 0 ? at::zeros_like(s.input) : at::cat(grad_input).view(s.input.sizes());
  return {gi, grad_weight, grad_bias};
}

// The node's gradients (input, linear_weight, linear_bias) for the upstream
// gradients of (log_prob, entropy): the backward kernel op, or with
// create_graph the differentiable chunk loop. `needed` is the outputs asked
// for; a frozen head (weight without requires_grad) skips the weight's GEMM.
variable_list linear_grads(variable_list grads, const Saved& s, std::array<bool, 3> needed, bool create_graph) {
  at::Tensor g_lp = grads[0];
  at::Tensor g_ent = grads[1];
  if (!g_lp.defined() && !g_ent.defined()) {
    return variable_list(3);
  }
  // an output left out of what is differentiated counts as a zero gradient
  if (!g_lp.defined()) {
    g_lp = at::zeros_like(g_ent);
  } else if (!g_ent.defined()) {
    g_ent = at::zeros_like(g_lp);
  }
  variable_list out;
  if (create_graph) {
    out = differentiable_grads(g_lp, g_ent, s);
  } else {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [gi, gw, gb] = ops::linear_log_prob_entropy_backward(
        g_lp, g_ent, s.input, s.weight, s.action, optional_tensor(s.bias), s.lse, s.entropy, s.temperature,
        s.ignore_index, s.chunk_size, needed);
    out = {gi, gw, gb};
  }
  for (size_t i = 0; i < 3; ++i) {
    if (!needed[i]) {
      out[i] = at::Tensor();
    }
  }
  return out;
}

// Compiled autograd records the node as a call of this function of the
// upstream gradients and the arguments apply_with_saved packs, in that order.
variable_list linear_grads_functional(const variable_list& grads, const std::vector<c10::IValue>& args) {
  torch::dynamo::autograd::PackedArgs packed(args);
  Saved s;
  s.input = packed.unpack<at::Tensor>();
  s.weight = packed.unpack<at::Tensor>();
  s.bias = packed.unpack<std::optional<at::Tensor>>().value_or(at::Tensor());
  s.action = packed.unpack<at::Tensor>();
  s.lse = packed.unpack<at::Tensor>();
  s.entropy = packed.unpack<at::Tensor>();
  s.temperature = packed.unpack<double>();
  s.ignore_index = packed.unpack<std::optional<int64_t>>();
  s.chunk_size = packed.unpack<std::optional<int64_t>>();
  const auto needed = packed.unpack<std::vector<bool>>();
  const bool create_graph = packed.unpack<bool>();
  return linear_grads(grads, s, {needed[0], needed[1], needed[2]}, create_graph);
}

// The types of what LinearLogProbEntropyBackward::apply_with_saved packs.
std::vector<at::TypePtr> functional_schema() {
  const auto tensor = at::TensorType::get();
  const auto optional_int = at::OptionalType::create(at::IntType::get());
  return {tensor, tensor, at::OptionalType::create(tensor), tensor, tensor, tensor, at::FloatType::get(),
          optional_int, optional_int};
}

CompiledFunctional compiled_functional{
    "pgext_LinearLogProbEntropyBackward", &linear_grads_functional, &functional_schema, {}};

struct LinearLogProbEntropyBackward final : public torch::autograd::TraceableFunction {
  // Outputs, in next_edges order: input, linear_weight, linear_bias.
  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    return linear_grads(std::move(grads), unpack(), needed(), at::GradMode::is_enabled());
  }

  std::string name() const override {
    return "LinearLogProbEntropyBackward";
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* v : saved()) {
      v->reset_data();
    }
  }

  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    for (const SavedVariable* v : {&input_, &weight_, &bias_, &action_, &lse_, &entropy_}) {
      args.collect(*v, /*is_output=*/v == &entropy_);
    }
    args.collect(temperature_);
    args.collect(ignore_index_);
    args.collect(chunk_size_);
  }

  variable_list apply_with_saved(
      const variable_list& grads, torch::dynamo::autograd::SwapSavedVariables& saved) override {
    return apply_functional(*this, compiled_functional, grads, saved, this->saved(), needed(),
                            [&](torch::dynamo::autograd::PackedArgs& packed) {
                              const Saved s = unpack();
                              packed.pack(s.input);
                              packed.pack(s.weight);
                              packed.pack(optional_tensor(s.bias));
                              packed.pack(s.action);
                              packed.pack(s.lse);
                              packed.pack(s.entropy);
                              packed.pack(s.temperature);
                              packed.pack(s.ignore_index);
                              packed.pack(s.chunk_size);
                            });
  }

  SavedVariable input_, weight_, bias_, action_, lse_, entropy_;
  double temperature_ = 1.0;
  std::optional<int64_t> ignore_index_, chunk_size_;

 private:
  std::array<SavedVariable*, 6> saved() {
    return {&input_, &weight_, &bias_, &action_, &lse_, &entropy_};
  }
  Saved unpack() {
    return {input_.unpack(), weight_.unpack(), bias_.unpack(), action_.unpack(),
            lse_.unpack(),   entropy_.unpack(getptr()), temperature_, ignore_index_, chunk_size_};
  }
  std::array<bool, 3> needed() const {
    return {task_should_compute_output(0), task_should_compute_output(1), task_should_compute_output(2)};
  }
};

void check_dense_inputs(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& action,
                        const at::Tensor& bias) {
  check_dense({{"input", &input}, {"linear_weight", &weight}, {"action", &action}, {"linear_bias", &bias}});
}

std::tuple<at::Tensor, at::Tensor> linear_log_prob_entropy_autograd(
    const at::Tensor& input,
    const at::Tensor& linear_weight,
    const at::Tensor& action,
    const std::optional<at::Tensor>& linear_bias,
    double temperature,
    std::optional<int64_t> ignore_index,
    std::optional<int64_t> chunk_size) {
  const at::Tensor bias = linear_bias.value_or(at::Tensor());
  check_dense_inputs(input, linear_weight, action, bias);
  for (const at::Tensor* t : {&input, &linear_weight, &bias}) {
    TORCH_CHECK(
        !t->defined() || !t->_fw_grad(/*level=*/0).defined(),
        "linear_log_prob_entropy has no forward-mode derivative (jvp, jacfwd); compose F.linear and "
        "pgext.log_prob_entropy for forward mode");
  }
  const bool requires_grad = torch::autograd::compute_requires_grad(input, linear_weight, bias);
  at::Tensor log_prob, entropy, lse;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(log_prob, entropy, lse) = ops::linear_log_prob_entropy_forward(
        input, linear_weight, action, linear_bias, temperature, ignore_index, chunk_size);
  }
  if (requires_grad) {
    auto node = c10::make_intrusive<LinearLogProbEntropyBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(input, linear_weight, bias));
    node->input_ = SavedVariable(input, false);
    node->weight_ = SavedVariable(linear_weight, false);
    node->bias_ = SavedVariable(bias, false);
    node->action_ = SavedVariable(action, false);
    node->lse_ = SavedVariable(lse, false);
    node->temperature_ = temperature;
    node->ignore_index_ = ignore_index;
    node->chunk_size_ = chunk_size;
    torch::autograd::set_history(log_prob, node);
    torch::autograd::set_history(entropy, node);
    // saved after set_history: the entropy is an output of this node
    node->entropy_ = SavedVariable(entropy, true);
  }
  return {log_prob, entropy};
}

// Below autograd (no_grad, inference mode, tracing of the forward graph):
// the forward kernel without the saved lse.
std::tuple<at::Tensor, at::Tensor> linear_log_prob_entropy_no_grad(
    const at::Tensor& input,
    const at::Tensor& linear_weight,
    const at::Tensor& action,
    const std::optional<at::Tensor>& linear_bias,
    double temperature,
    std::optional<int64_t> ignore_index,
    std::optional<int64_t> chunk_size) {
  check_dense_inputs(input, linear_weight, action, linear_bias.value_or(at::Tensor()));
  auto out = ops::linear_log_prob_entropy_forward(
      input, linear_weight, action, linear_bias, temperature, ignore_index, chunk_size);
  return {std::get<0>(out), std::get<1>(out)};
}

}  // namespace

TORCH_LIBRARY_IMPL(pgext, Autograd, m) {
  m.impl("linear_log_prob_entropy", &linear_log_prob_entropy_autograd);
}

TORCH_LIBRARY_IMPL(pgext, CompositeExplicitAutograd, m) {
  m.impl("linear_log_prob_entropy", &linear_log_prob_entropy_no_grad);
}

}  // namespace pgext
