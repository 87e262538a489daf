#pragma once
// Compiled autograd (torch._dynamo.config.compiled_autograd) support shared by
// pgext's backward nodes. Compiled autograd records a C++ node as a call of a
// function of the upstream gradients and the node's packed state; each node
// packs its state, and this file does the rest the same way for all of them:
// swapping the saved variables for the compiler's proxies, binding the
// function once per process, and the call itself.
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>

#include <array>
#include <mutex>
#include <optional>
#include <vector>

namespace pgext {

// An optional tensor argument as compiled autograd's functional form packs it.
inline std::optional<at::Tensor> optional_tensor(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The functional form's signature: (upstream gradients, packed arguments).
using FunctionalBackward = torch::autograd::variable_list (*)(
    const torch::autograd::variable_list& grads, const std::vector<c10::IValue>& args);

// One node type's functional form: its name (unique per process), the
// function, and the types of the arguments the node packs, in order.
struct CompiledFunctional {
  const char* name;
  FunctionalBackward function;
  std::vector<at::TypePtr> (*schema)();
  std::once_flag bound;
};

// Node::apply_with_saved for a node whose saved variables are `saved_vars`:
// `pack` packs the node's state (after the saved variables were swapped for
// the compiler's proxies), then the functional form is bound (once) and
// called. `needed` (the outputs asked for) and whether the graph is being
// recorded are packed last, as every functional form here expects.
template <size_t kSaved, size_t kNeeded, typename Pack>
torch::autograd::variable_list apply_functional(
    const torch::autograd::Node& node,
    CompiledFunctional& functional,
    const torch::autograd::variable_list& grads,
    torch::dynamo::autograd::SwapSavedVariables& saved,
    const std::array<torch::autograd::SavedVariable*, kSaved>& saved_vars,
    const std::array<bool, kNeeded>& needed,
    const Pack& pack) {
  for (torch::autograd::SavedVariable* v : saved_vars) {
    saved.before(*v);
  }
  torch::dynamo::autograd::PackedArgs packed;
  pack(packed);
  packed.pack(std::vector<bool>(needed.begin(), needed.end()));
  packed.pack(at::GradMode::is_enabled());
  const auto& py = torch::dynamo::autograd::getPyCompilerInterface();
  std::call_once(functional.bound, [&] {
    std::vector<at::TypePtr> schema = functional.schema();
    schema.push_back(at::ListType::create(at::BoolType::get()));
    schema.push_back(at::BoolType::get());
    py->bind_function(saved.get_py_compiler(), functional.name, functional.function, schema);
  });
  const auto output_metadata =
      torch::dynamo::autograd::IValuePacker<std::vector<std::optional<torch::autograd::InputMetadata>>>::pack(
          torch::dynamo::autograd::get_input_metadata(node.next_edges()));
  torch::autograd::variable_list result = py->call_function(
      saved.get_py_compiler(), "apply_functional", functional.name, grads, packed.vec(), output_metadata);
  for (torch::autograd::SavedVariable* v : saved_vars) {
    saved.after(*v);
  }
  return result;
}

}  // namespace pgext
