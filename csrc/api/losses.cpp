// DI-engine's PPO and A2C losses for C++ callers (include/pgext/pgext.h), the
// twins of pgext/losses/ppo.py and pgext/losses/a2c.py: log_prob_entropy (or pg_error) for
// the categorical part, the fused ppo_surrogate and ppo_value ops for PPO's
// losses, and a few ATen ops elsewhere, so autograd covers them.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "core/ops.h"
#include "include/pgext/pgext.h"
#include "ops/ppo_surrogate/ppo_surrogate.h"
#include "ops/ppo_value/ppo_value.h"

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/promote_types.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <initializer_list>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace pgext {
namespace {

void check_dual_clip(const PpoOptions& options) {
  TORCH_CHECK_VALUE(
      !options.dual_clip.has_value() || *options.dual_clip > 1.0,
      "pgext::ppo: dual_clip must be greater than 1.0 (or unset), got ", options.dual_clip.value_or(0.0));
}

// The old policy's log-probabilities, without gradient: logit_old itself when
// it has action's shape (stored log-probabilities), else from old logits.
at::Tensor old_log_prob(const at::Tensor& logit_old, const at::Tensor& action) {
  if (logit_old.dim() == action.dim()) {
    TORCH_CHECK_VALUE(
        logit_old.sizes() == action.sizes(), "pgext::ppo: old log-probabilities must have the actions' shape ",
        action.sizes(), ", got ", logit_old.sizes());
    return logit_old.detach();
  }
  const c10::AutoGradMode no_grad(false);
  return std::get<0>(ops::log_prob_entropy(logit_old, action, std::nullopt));
}

// A non-floating weight (a mask) as eager multiplication would promote it:
// to the dtype of the values it multiplies.
at::Tensor floating_weight(const at::Tensor& weight, at::ScalarType values) {
  return !weight.defined() || at::isFloatingType(weight.scalar_type()) ? weight : weight.to(values);
}

std::optional<at::Tensor> optional_tensor(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

using Named = std::initializer_list<std::pair<const char*, const at::Tensor*>>;

// The checks of pgext/_args.py, where the losses' eager ATen expressions
// would fail with a c10::Error naming no argument. Undefined tensors are
// skipped. With cpu_scalars, a 0-d CPU tensor may sit beside another device,
// as eager arithmetic allows.
void check_devices(const char* op, const char* anchor_name, const at::Tensor& anchor, Named named,
                   bool cpu_scalars) {
  for (const auto& [name, t] : named) {
    if (!t->defined() || t->device() == anchor.device() || (cpu_scalars && t->dim() == 0 && t->is_cpu())) {
      continue;
    }
    TORCH_CHECK_VALUE(false, op, ": ", name, " is on ", t->device(), " but ", anchor_name, " is on ", anchor.device());
  }
}

// Whether the shapes broadcast together (torch.broadcast_shapes without the
// error, whose message names no argument).
bool broadcastable(c10::ArrayRef<at::IntArrayRef> shapes) {
  size_t ndim = 0;
  for (const auto shape : shapes) {
    ndim = std::max(ndim, shape.size());
  }
  std::vector<int64_t> result(ndim, 1);
  for (const auto shape : shapes) {
    for (size_t i = 0; i < shape.size(); ++i) {
      int64_t& r = result[ndim - shape.size() + i];
      if (shape[i] != 1 && shape[i] != r) {
        if (r != 1) {
          return false;
        }
        r = shape[i];
      }
    }
  }
  return true;
}

void check_broadcast(const char* op, Named named) {
  std::vector<at::IntArrayRef> shapes;
  std::string listed;
  for (const auto& [name, t] : named) {
    if (t->defined()) {
      shapes.push_back(t->sizes());
      listed += (listed.empty() ? "" : ", ") + std::string(name) + " " + c10::str(t->sizes());
    }
  }
  TORCH_CHECK_VALUE(broadcastable(shapes), op, ": the shapes ", listed, " do not broadcast together");
}

// The shapes DI-engine's eager surrogate can combine (pgext/losses/ppo.py's
// _require_surrogate_shapes): the entropy keeps the actions' shape where the
// weight (the advantage when there is none) has it, the ratio where the
// advantage has it, otherwise each loses dim 1, the agents'; what results
// must broadcast with the advantage and the weight.
void check_surrogate_shapes(const at::Tensor& logp_new, const at::Tensor& adv, const at::Tensor& weight) {
  const at::IntArrayRef shape = logp_new.sizes();
  const at::IntArrayRef adv_shape = adv.sizes();
  const at::IntArrayRef weight_shape = weight.defined() ? weight.sizes() : adv_shape;
  const bool has_agents = shape.size() >= 2;
  std::vector<int64_t> agents;
  if (has_agents) {
    agents.push_back(shape[0]);
    agents.insert(agents.end(), shape.begin() + 2, shape.end());
  }
  const bool fits = (weight_shape == shape || has_agents) && (adv_shape == shape || has_agents) &&
      broadcastable({weight_shape == shape ? shape : agents, weight_shape}) &&
      broadcastable({adv_shape == shape ? shape : agents, adv_shape, weight_shape});
  TORCH_CHECK_VALUE(
      fits, "pgext::ppo: adv ", adv_shape, weight.defined() ? " and weight " + c10::str(weight_shape) : "",
      " must have the actions' shape ", shape,
      has_agents ? ", or broadcast with " + c10::str(at::IntArrayRef(agents)) +
              ", that shape without dim 1, where several agents share them"
                 : std::string());
}

// pg_error's argument error in a2c_error's names (its return_ is the
// advantage), of the same c10 type. Only from a catch block.
[[noreturn]] void rethrow_as_a2c(const c10::Error& error) {
  std::string message = error.msg();
  for (const auto& [theirs, ours] : {std::pair<std::string, std::string>{"pg_error: return_", "pgext::a2c_error: adv"},
                                     {"pg_error:", "pgext::a2c_error:"}}) {
    if (message.rfind(theirs, 0) == 0) {
      message = ours + message.substr(theirs.size());
      break;
    }
  }
  if (dynamic_cast<const c10::IndexError*>(&error) != nullptr) {
    C10_THROW_ERROR(IndexError, message);
  }
  if (dynamic_cast<const c10::TypeError*>(&error) != nullptr) {
    C10_THROW_ERROR(TypeError, message);
  }
  if (dynamic_cast<const c10::ValueError*>(&error) != nullptr) {
    C10_THROW_ERROR(ValueError, message);
  }
  throw;
}

// A loss is a mean: the values must promote to a real floating-point type.
void check_float_result(const char* op, Named named) {
  bool floating = false, complex = false;
  for (const auto& [name, t] : named) {
    if (t->defined()) {
      floating = floating || at::isFloatingType(t->scalar_type());
      complex = complex || at::isComplexType(t->scalar_type());
    }
  }
  TORCH_CHECK_TYPE(floating && !complex, op, ": needs a real floating-point tensor among its values");
}

}  // namespace

std::pair<PpoPolicyLoss, PpoInfo> ppo_policy_error(const PpoPolicyData& data, const PpoOptions& options) {
  check_dual_clip(options);
  TORCH_CHECK_VALUE(
      data.logit_new.defined() && data.logit_old.defined() && data.action.defined() && data.adv.defined(),
      "pgext::ppo_policy_error: logit_new, logit_old, action and adv must be tensors");
  const auto [logp_new, entropy] = ops::log_prob_entropy(data.logit_new, data.action, std::nullopt);
  const at::Tensor logp_old = old_log_prob(data.logit_old, data.action);
  const at::Tensor w = data.weight.has_value() && data.weight->defined() ? *data.weight : at::Tensor();
  at::Tensor policy_loss, entropy_loss, approx_kl, clipfrac;
  if (logp_new.sizes() == data.adv.sizes() && (!w.defined() || w.sizes() == data.adv.sizes())) {
    // a non-floating weight (a mask) as eager multiplication would promote it
    const at::Tensor weight = floating_weight(w, data.adv.scalar_type());
    std::tie(policy_loss, entropy_loss, approx_kl, clipfrac) = ops::ppo_surrogate(
        logp_new, logp_old, entropy, data.adv, optional_tensor(weight), options.clip_ratio, options.dual_clip);
  } else {  // several agents sharing one advantage: ratio and entropy averaged over them
    check_devices("pgext::ppo", "logit_new", logp_new, {{"adv", &data.adv}, {"weight", &w}}, true);
    check_surrogate_shapes(logp_new, data.adv, w);
    std::tie(policy_loss, entropy_loss, approx_kl, clipfrac) =
        ppo_surrogate_eager(logp_new, logp_old, entropy, data.adv, w, options.clip_ratio, options.dual_clip);
  }
  PpoInfo info{approx_kl, clipfrac};
  return {PpoPolicyLoss{policy_loss, entropy_loss}, info};
}

std::pair<PpoLoss, PpoInfo> ppo_error(const PpoData& data, const PpoOptions& options) {
  check_dual_clip(options);
  auto [policy, info] = ppo_policy_error(
      PpoPolicyData{data.logit_new, data.logit_old, data.action, data.adv, data.weight}, options);
  TORCH_CHECK_VALUE(
      data.value_new.defined() && data.value_old.defined() && data.return_.defined(),
      "pgext::ppo_error: value_new, value_old and return_ must be tensors");
  const at::Tensor w = data.weight.has_value() && data.weight->defined() ? *data.weight : at::Tensor();
  const at::Tensor& v_new = data.value_new;
  const at::Tensor& v_old = data.value_old;
  const at::Tensor& ret = data.return_;
  const at::Tensor weight = floating_weight(
      w, at::promote_types(at::promote_types(v_new.scalar_type(), v_old.scalar_type()), ret.scalar_type()));
  bool fused = true;  // one shape, floating values on one device: the fused op
  for (const at::Tensor* t : {&v_old, &ret, &weight}) {
    fused = fused && (!t->defined() || (t->sizes() == v_new.sizes() && t->device() == v_new.device()));
  }
  for (const at::Tensor* t : {&v_new, &v_old, &ret}) {
    fused = fused && at::isFloatingType(t->scalar_type());
  }
  if (!fused) {
    const Named values = {{"value_old", &v_old}, {"return_", &ret}, {"weight", &weight}};
    check_devices("pgext::ppo_error", "value_new", v_new, values, true);
    check_float_result("pgext::ppo_error", {{"value_new", &v_new}, {"value_old", &v_old}, {"return_", &ret}});
    check_broadcast("pgext::ppo_error", {{"value_new", &v_new}, {"value_old", &v_old}, {"return_", &ret},
                                         {"weight", &weight}});
  }
  const at::Tensor value_loss =
      fused ? ops::ppo_value(v_new, v_old, ret, optional_tensor(weight), options.clip_ratio, options.use_value_clip)
            : ppo_value_eager(v_new, v_old, ret, weight, options.clip_ratio, options.use_value_clip);
  return {PpoLoss{policy.policy_loss, value_loss, policy.entropy_loss}, info};
}

A2cLoss a2c_error(const A2cData& data) {
  TORCH_CHECK_VALUE(
      data.logit.defined() && data.action.defined() && data.value.defined() && data.adv.defined() &&
          data.return_.defined(),
      "pgext::a2c_error: logit, action, value, adv and return_ must be tensors");
  // A2C's policy and entropy losses are pg_error's with the advantage as the return
  const std::optional<at::Tensor> weight =
      data.weight.has_value() && data.weight->defined() ? data.weight : std::nullopt;
  at::Tensor policy_loss, entropy_loss;
  try {
    std::tie(policy_loss, entropy_loss) = ops::pg_error(data.logit, data.action, data.adv, weight, "mean");
  } catch (const c10::Error& e) {
    rethrow_as_a2c(e);
  }
  const at::Tensor w = weight.value_or(at::Tensor());
  const Named values = {{"value", &data.value}, {"return_", &data.return_}, {"weight", &w}};
  check_devices("pgext::a2c_error", "logit", data.logit, values, false);
  check_float_result("pgext::a2c_error", {{"value", &data.value}, {"return_", &data.return_}});
  check_broadcast("pgext::a2c_error", values);
  const at::Tensor squared = (data.return_ - data.value).pow(2);
  const at::Tensor value_loss = weight.has_value() ? (squared * *weight).mean() : squared.mean();
  return {policy_loss, value_loss, entropy_loss};
}

}  // namespace pgext
