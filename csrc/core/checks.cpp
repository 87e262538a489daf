#include <cmath>
#include "core/checks.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ExpandUtils.h>
#include <ATen/TensorUtils.h>
#include <ATen/ops/div.h>
#include <ATen/ops/promote_types.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

namespace pgext {

namespace {
thread_local const char* t_user_op = "pg_error";
}  // namespace

const char* user_op_name() {
  return t_user_op;
}

UserOpGuard::UserOpGuard(const char* op) : previous_(t_user_op) {
  t_user_op = op;
}

UserOpGuard::~UserOpGuard() {
  t_user_op = previous_;
}

Reduction parse_reduction(c10::string_view reduction) {
  if (reduction == "mean") {
    return Reduction::Mean;
  }
  if (reduction == "sum") {
    return Reduction::Sum;
  }
  if (reduction == "none") {
    return Reduction::None;
  }
  TORCH_CHECK_VALUE(
      false, "pg_error: reduction must be 'mean', 'sum' or 'none', got '", reduction, "'");
}

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

namespace {

bool is_real_number_type(at::ScalarType t) {
  return is_supported_float(t) || at::isIntegralType(t, /*includeBool=*/true);
}

// Whether `t` broadcasts to action's shape without changing it (numpy's
// rules, aligned at the trailing dimension): a centralized critic's (B, 1)
// return against (B, A) actions does, a (B, 1) return against (B,) actions
// does not (it would grow the product to (B, B), as the notebook silently does).
bool broadcasts_to_action(const at::Tensor& t, const at::Tensor& action) {
  const auto ts = t.sym_sizes();
  const auto as = action.sym_sizes();
  if (ts.size() > as.size()) {
    return false;
  }
  const size_t lead = as.size() - ts.size();
  for (size_t i = 0; i < ts.size(); ++i) {
    if (ts[i] != 1 && ts[i] != as[lead + i]) {
      return false;
    }
  }
  return true;
}

void check_per_sample(const char* name, const at::Tensor& t, const at::Tensor& action, const at::Tensor& logit) {
  TORCH_CHECK_TYPE(
      is_real_number_type(t.scalar_type()),
      "pg_error: ", name, " must be float16, bfloat16, float32, float64, integer or bool, got dtype ",
      t.scalar_type());
  TORCH_CHECK_VALUE(
      broadcasts_to_action(t, action),
      "pg_error: ", name, " must have the shape of action ", action.sym_sizes(),
      " or broadcast to it without changing it, got ", t.sym_sizes(),
      " (a broadcast that grows the per-sample shape, such as a (B, 1) tensor against (B,) actions, "
      "would silently form a (B, B) product)");
  TORCH_CHECK_VALUE(
      t.device() == logit.device(),
      "pg_error: ", name, " is on ", t.device(), " but logit is on ", logit.device());
}

}  // namespace

void check_dense(std::initializer_list<std::pair<const char*, const at::Tensor*>> named, const char* op) {
  for (const auto& [name, t] : named) {
    if (!t->defined() || (t->layout() == at::kStrided && !t->is_nested() && !t->is_quantized())) {
      continue;
    }
    const std::string kind = t->is_nested() ? std::string("a nested tensor")
        : t->is_quantized()                 ? std::string("a quantized tensor")
                                            : "layout " + c10::str(t->layout());
    TORCH_CHECK_TYPE(false, op, ": ", name, " must be a dense (strided) tensor, got ", kind);
  }
}

bool has_tangent(std::initializer_list<const at::Tensor*> inputs) {
  for (const at::Tensor* t : inputs) {
    if (t->defined() && t->_fw_grad(/*level=*/0).defined()) {
      return true;
    }
  }
  return false;
}

void check_logit_and_action(const at::Tensor& logit, const at::Tensor& action, const char* op) {
  TORCH_CHECK_VALUE(logit.defined() && action.defined(), op, ": logit and action must be tensors");
  TORCH_CHECK_TYPE(
      is_supported_float(logit.scalar_type()),
      op, ": logit must be float16, bfloat16, float32 or float64, got ", logit.scalar_type());
  TORCH_CHECK_VALUE(
      logit.dim() >= 1, op, ": logit must have at least one dimension (..., N), got a 0-d tensor");
  TORCH_CHECK_VALUE(
      logit.sym_size(-1) > 0,
      op, ": logit has N = 0 classes (shape ", logit.sym_sizes(), "); a distribution needs N >= 1");
  TORCH_CHECK_TYPE(
      at::isIntegralType(action.scalar_type(), /*includeBool=*/false),
      op, ": action must hold integer class indices, got dtype ", action.scalar_type());
  TORCH_CHECK_VALUE(
      action.sym_sizes() == logit.sym_sizes().slice(0, logit.dim() - 1),
      op, ": action must have shape logit.shape[:-1] = ", logit.sym_sizes().slice(0, logit.dim() - 1),
      ", got ", action.sym_sizes(), " (logit ", logit.sym_sizes(), ")");
  TORCH_CHECK_VALUE(
      action.device() == logit.device(),
      op, ": action is on ", action.device(), " but logit is on ", logit.device());
}

void check_inputs(
    const at::Tensor& logit,
    const at::Tensor& action,
    const at::Tensor& ret,
    const std::optional<at::Tensor>& weight) {
  TORCH_CHECK_VALUE(ret.defined(), "pg_error: return_ must be a tensor");
  check_logit_and_action(logit, action);
  check_per_sample("return_", ret, action, logit);
  if (weight.has_value() && weight->defined()) {
    check_per_sample("weight", *weight, action, logit);
  }
}

void check_temperature(double temperature, const char* op) {
  // NaN fails the comparison too
  TORCH_CHECK_VALUE(
      std::isfinite(temperature) && temperature > 0, op, ": temperature must be a finite number > 0, got ",
      temperature);
}

void check_vocab_start(int64_t vocab_start) {
  TORCH_CHECK_VALUE(vocab_start >= 0, "pg_error: vocab_start must be >= 0, got ", vocab_start);
}

void check_backward_inputs(
    const at::Tensor& grad_policy,
    const at::Tensor& grad_entropy,
    const at::Tensor& lse,
    const at::Tensor& entropy,
    const at::Tensor& action,
    Reduction reduction) {
  const auto loss_shape = reduction == Reduction::None ? action.sym_sizes() : c10::SymIntArrayRef{};
  // Floating point only: an integer lse would be read truncated, a wrong
  // gradient without an error.
  for (const auto* t : {&grad_policy, &grad_entropy, &lse, &entropy}) {
    TORCH_CHECK_TYPE(
        is_supported_float(t->scalar_type()),
        "pg_error_backward: gradients and saved statistics must be floating point (float16, bfloat16, "
        "float32 or float64), got ", t->scalar_type());
  }
  for (const auto* g : {&grad_policy, &grad_entropy}) {
    TORCH_CHECK_VALUE(
        g->sym_sizes() == loss_shape,
        "pg_error_backward: the gradient of a loss must have the loss's shape ", loss_shape,
        ", got ", g->sym_sizes());
    TORCH_CHECK_VALUE(g->device() == action.device(),
                      "pg_error_backward: a gradient is on ", g->device(), " but action is on ", action.device());
  }
  for (const auto* s : {&lse, &entropy}) {
    TORCH_CHECK_VALUE(
        s->sym_sizes() == action.sym_sizes(),
        "pg_error_backward: saved statistics must have the shape of action ", action.sym_sizes(),
        ", got ", s->sym_sizes());
    TORCH_CHECK_VALUE(s->device() == action.device(),
                      "pg_error_backward: saved statistics are on ", s->device(), " but action is on ", action.device());
  }
}

at::Tensor scale_for_reduction(const at::Tensor& t, Reduction reduction, const at::Tensor& action) {
  if (reduction != Reduction::Mean) {
    return t;
  }
  return at::div(t, c10::Scalar(action.sym_numel()));
}

void check_merge_row_stats(at::TensorList running, at::TensorList part) {
  constexpr const char* kOp = "pg_merge_row_stats_";
  TORCH_INTERNAL_ASSERT(running.size() == 4 && part.size() == 4);
  const at::Tensor& first = running[0];
  TORCH_CHECK_VALUE(first.defined() && first.dim() == 1, kOp, ": statistics must be 1-d (rows,) tensors, got ",
                    first.defined() ? first.sizes() : at::IntArrayRef{});
  for (const at::TensorList& group : {running, part}) {
    for (const at::Tensor& t : group) {
      TORCH_CHECK_VALUE(t.defined() && t.sizes() == first.sizes(), kOp, ": every statistic must have shape ",
                        first.sizes(), ", got ", t.defined() ? t.sizes() : at::IntArrayRef{});
      TORCH_CHECK_VALUE(t.device() == first.device(), kOp, ": statistics on ", t.device(), " and ", first.device());
      TORCH_CHECK_VALUE(t.is_contiguous(), kOp, ": statistics must be contiguous");
    }
  }
  for (const at::Tensor& t : running) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kDouble, kOp, ": running statistics must be float64, got ",
                     t.scalar_type());
  }
  const auto part_dtype = part[0].scalar_type();
  TORCH_CHECK_TYPE(part_dtype == at::kFloat || part_dtype == at::kDouble, kOp,
                   ": a part's statistics must be float32 or float64, got ", part_dtype);
  for (const at::Tensor& t : part) {
    TORCH_CHECK_TYPE(t.scalar_type() == part_dtype, kOp, ": a part's statistics must share one dtype, got ",
                     t.scalar_type(), " and ", part_dtype);
  }
}

at::ScalarType acc_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

at::ScalarType promoted_dtype(at::TensorList tensors) {
  std::optional<at::ScalarType> t;
  for (const auto& x : tensors) {
    if (x.defined()) {
      t = t ? at::promote_types(*t, x.scalar_type()) : x.scalar_type();
    }
  }
  TORCH_INTERNAL_ASSERT(t.has_value(), "promoted_dtype: no defined tensor");
  return *t;
}

at::ScalarType loss_type(
    const at::Tensor& logit,
    const at::Tensor& ret,
    const std::optional<at::Tensor>& weight) {
  auto t = c10::promoteTypes(logit.scalar_type(), ret.scalar_type());
  if (weight.has_value() && weight->defined()) {
    t = c10::promoteTypes(t, weight->scalar_type());
  }
  return t;
}

namespace {

// (rows, n) view of the logits sharing their storage, or a contiguous copy
// when no single row stride describes them.
at::Tensor logit_rows(const at::Tensor& logit, int64_t rows, int64_t n) {
  if (logit.dim() == 2 && logit.stride(1) == 1) {
    return logit;  // already rows; the common case needs no view
  }
  if (logit.stride(-1) == 1 || n == 1) {
    const int64_t shape[2] = {rows, n};
    auto strides = at::detail::computeStride(logit.sizes(), logit.strides(), shape);
    if (strides.has_value()) {
      return logit.as_strided({rows, n}, {(*strides)[0], 1});
    }
  }
  return logit.contiguous().view({rows, n});
}

// A contiguous half-type tensor as float, converted by a plain loop.
template <typename half_t>
at::Tensor small_half_to_float(const at::Tensor& t) {
  // CPU only (small_to_float): allocated without a dispatch, see empty_cpu.
  at::Tensor out = at::detail::empty_cpu(t.sizes(), t.options().dtype(at::kFloat));
  const half_t* src = t.const_data_ptr<half_t>();
  float* dst = out.mutable_data_ptr<float>();
  for (int64_t i = 0, n = t.numel(); i < n; ++i) {
    dst[i] = static_cast<float>(src[i]);
  }
  return out;
}

// A small contiguous CPU half-type `t` as float (`type`), by
// small_half_to_float: for the per-sample vectors of a small batch (return_,
// upstream gradients: four per bfloat16 training step) the dispatched `.to()`
// costs more than the conversion itself. Undefined where that does not apply.
at::Tensor small_to_float(const at::Tensor& t, at::ScalarType type) {
  constexpr int64_t kSmall = 16384;
  if (type != at::kFloat || !t.device().is_cpu() || t.numel() > kSmall || !t.is_contiguous() ||
      t.layout() != at::kStrided) {
    return {};
  }
  switch (t.scalar_type()) {
    case at::kBFloat16:
      return small_half_to_float<at::BFloat16>(t);
    case at::kHalf:
      return small_half_to_float<at::Half>(t);
    default:
      return {};
  }
}

// `t` in dtype `type`: by small_to_float where that applies, else by `.to()`.
at::Tensor converted_to(const at::Tensor& t, at::ScalarType type) {
  at::Tensor small = small_to_float(t, type);
  return small.defined() ? small : t.to(type);
}

}  // namespace

at::Tensor as_rows(const at::Tensor& t, int64_t rows, at::ScalarType type) {
  if (t.dim() == 1 && t.scalar_type() == type && t.is_contiguous()) {
    return t;
  }
  // A 1-d `t` holds `rows` values already: its reshape would be one more
  // dispatched op (two, with its view) per conversion.
  return converted_to(t.dim() == 1 ? t : t.reshape({rows}), type).contiguous();
}

at::Tensor expand_to_action(const at::Tensor& t, const at::Tensor& action) {
  return t.sizes() == action.sizes() ? t : t.expand(action.sizes());
}

at::Tensor gather_index(const at::Tensor& action, const c10::SymInt& n) {
  return action.to(at::kLong).clamp(0, c10::Scalar(n - 1)).unsqueeze(-1);
}

at::Tensor sum_to_shape_of(const at::Tensor& grad, const at::Tensor& like) {
  return grad.sym_sizes() == like.sym_sizes() ? grad : at::sum_to(grad, like.sym_sizes());
}

RowInputs flatten_logit_and_action(const at::Tensor& logit, const at::Tensor& action, double temperature) {
  RowInputs in;
  in.inv_temperature = 1.0 / temperature;
  in.n = logit.size(-1);
  in.rows = action.numel();
  in.logit = logit_rows(logit, in.rows, in.n);
  in.action = as_rows(action, in.rows, at::kLong);
  in.action_dtype = action.scalar_type();
  return in;
}

RowInputs flatten_rows(
    const at::Tensor& logit,
    const at::Tensor& action,
    const at::Tensor& ret,
    const std::optional<at::Tensor>& weight,
    double temperature) {
  RowInputs in = flatten_logit_and_action(logit, action, temperature);
  const auto acc = acc_type(logit.scalar_type());
  if (ret.dim() == 0) {
    // One return for every sample (log_prob_entropy's -1): its expanded copy
    // would cost small batches two more dispatched ops per call.
    in.ret = ret.scalar_type() == acc ? ret : converted_to(ret, acc);
    in.ret_stride = 0;
  } else {
    in.ret = as_rows(expand_to_action(ret, action), in.rows, acc);
  }
  if (weight.has_value() && weight->defined()) {
    in.weight = as_rows(expand_to_action(*weight, action), in.rows, acc);
  }
  return in;
}

at::Tensor rows_of_grad(const at::Tensor& grad, int64_t rows, at::ScalarType acc) {
  if (grad.dim() == 0) {
    return grad.scalar_type() == acc ? grad : converted_to(grad, acc);
  }
  return as_rows(grad, rows, acc);
}

}  // namespace pgext
