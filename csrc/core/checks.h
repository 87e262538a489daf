#pragma once
// Input validation and flattening shared by every backend of pg_error. The
// checks read only metadata (shapes, dtypes, devices), never data, so the Meta
// kernels run them too and torch.compile reports the same errors as eager.
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <initializer_list>
#include <string>
#include <optional>
#include <utility>

namespace pgext {

enum class Reduction : int64_t { None = 0, Mean = 1, Sum = 2 };

// ValueError unless `reduction` is 'mean', 'sum' or 'none'.
Reduction parse_reduction(c10::string_view reduction);

// The floating dtypes pgext computes with (logits, statistics, gradients).
// at::isFloatingType also admits float8, which type promotion and the
// kernels' dispatch reject later with errors that name neither the argument
// nor the problem.
bool is_supported_float(at::ScalarType t);

// TypeError for a sparse, nested, quantized or MKLDNN tensor (undefined ones
// pass): the kernels read dense memory, and the dispatcher would otherwise
// fail on the tensor's backend with a NotImplementedError naming no argument.
// Called by the ops' first kernels (Autograd, CompositeExplicitAutograd).
// `op`: the op the user called, which the messages name.
void check_dense(
    std::initializer_list<std::pair<const char*, const at::Tensor*>> named, const char* op = "pg_error");

// Whether a defined input carries a forward-mode tangent: the fused PPO ops'
// autograd then runs DI-engine's eager ops, which propagate it.
bool has_tangent(std::initializer_list<const at::Tensor*> inputs);

// The op the user called, for the messages of checks that run inside
// pg_error's kernels (the actions' range): an op implemented by calling
// pg_error (log_prob_entropy) sets its name around the call, so the message
// names it at no extra cost and without a second check. Thread-local: those
// checks run on the calling thread. "pg_error" when no guard is active.
const char* user_op_name();

class UserOpGuard {
 public:
  explicit UserOpGuard(const char* op);
  ~UserOpGuard();
  UserOpGuard(const UserOpGuard&) = delete;
  UserOpGuard& operator=(const UserOpGuard&) = delete;

 private:
  const char* previous_;
};

// Checks of logit and action alone (also used by pg_row_stats).
void check_logit_and_action(const at::Tensor& logit, const at::Tensor& action, const char* op = "pg_error");

// ValueError unless the sampling temperature is a finite number > 0: the
// kernels divide the logits by it (multiply by its inverse).
void check_temperature(double temperature, const char* op = "pg_error");

// ValueError / TypeError naming the offending shapes, dtypes or devices.
// return_ and weight have action's shape or broadcast to it without changing
// it (torch.broadcast_shapes(t.shape, action.shape) == action.shape).
void check_inputs(
    const at::Tensor& logit,
    const at::Tensor& action,
    const at::Tensor& ret,
    const std::optional<at::Tensor>& weight);

// Reports an action outside [0, N): through the handler set with
// pgext::detail::set_action_error_handler, else as a c10::IndexError
// (defined in api/pgext.cpp, beside the handler).
[[noreturn]] void throw_action_out_of_range(const std::string& message);

// A shard's first class id: class ids are int64 and never negative.
void check_vocab_start(int64_t vocab_start);

// The extra inputs of the backward op: upstream gradients of the two losses
// (0-d for 'mean' and 'sum', the shape of action for 'none') and the
// per-sample statistics saved by forward (the shape of action), all floating.
void check_backward_inputs(
    const at::Tensor& grad_policy,
    const at::Tensor& grad_entropy,
    const at::Tensor& lse,
    const at::Tensor& entropy,
    const at::Tensor& action,
    Reduction reduction);

// `t` divided by the number of samples for 'mean', as is otherwise. Works on
// symbolic shapes (torch.compile with dynamic shapes).
at::Tensor scale_for_reduction(const at::Tensor& t, Reduction reduction, const at::Tensor& action);

// pg_merge_row_stats_'s inputs: eight (rows,) contiguous tensors on one
// device, the running four float64, the part's four of one float dtype.
void check_merge_row_stats(at::TensorList running, at::TensorList part);

// Accumulation type of the kernels: float32 for every floating dtype but
// float64, which accumulates in float64.
at::ScalarType acc_type(at::ScalarType dtype);

// What eager type promotion of the defined tensors gives (all of one shape, so
// no 0-d special case); undefined tensors (absent optional inputs) are skipped.
at::ScalarType promoted_dtype(at::TensorList tensors);

// Dtype of the two losses: the promotion of logit, return_ and weight, as the
// notebook's arithmetic would produce.
at::ScalarType loss_type(
    const at::Tensor& logit,
    const at::Tensor& ret,
    const std::optional<at::Tensor>& weight);

// pg_error's inputs viewed as rows of logits.
struct RowInputs {
  at::Tensor logit;   // (rows, n), unit stride within a row, any row stride
  at::Tensor action;  // (rows,) int64, contiguous
  // the caller's action dtype, for error messages: a uint64 action of 2**63 or
  // more reads negative once converted to int64
  at::ScalarType action_dtype = at::kLong;
  at::Tensor ret;     // (rows,) accumulation dtype, contiguous; or 0-d, read with ret_stride 0
  int64_t ret_stride = 1;
  at::Tensor weight;  // (rows,) accumulation dtype, contiguous; undefined if absent
  int64_t rows = 0;
  int64_t n = 0;
  // 1 / temperature: the kernels read logit * inv_temperature wherever they
  // load a logit (exactly the logit for 1)
  double inv_temperature = 1.0;
};

// A per-sample tensor that passed check_inputs, expanded (a view) to action's shape.
at::Tensor expand_to_action(const at::Tensor& t, const at::Tensor& action);

// The gradient of a per-sample tensor of shape `like`, from its gradient at
// action's shape: summed over the broadcast dimensions.
at::Tensor sum_to_shape_of(const at::Tensor& grad, const at::Tensor& like);

// action as an int64 gather index (..., 1) into rows of n classes. A sample of
// weight 0 may carry any action (padding), which the kernels never read; ATen
// code that gathers reads class 0 instead: clamped, which changes no action
// the kernels would read, and its term is multiplied by the weight 0.
at::Tensor gather_index(const at::Tensor& action, const c10::SymInt& n);

// Flattens validated logit and action to rows (ret and weight left undefined).
RowInputs flatten_logit_and_action(const at::Tensor& logit, const at::Tensor& action, double temperature = 1.0);

// Flattens validated inputs to rows. The logits are copied only when their
// leading dimensions cannot be addressed with a single row stride or the
// class dimension is not unit-strided.
RowInputs flatten_rows(
    const at::Tensor& logit,
    const at::Tensor& action,
    const at::Tensor& ret,
    const std::optional<at::Tensor>& weight,
    double temperature = 1.0);

// An upstream gradient in the accumulation dtype, one value per row: (rows,)
// contiguous for reduction 'none', the 0-d gradient itself for 'mean' and
// 'sum' (read with grad_row_stride 0, no expanded view to build).
at::Tensor rows_of_grad(const at::Tensor& grad, int64_t rows, at::ScalarType acc);

// The distance between the values of consecutive rows in rows_of_grad's result.
inline int64_t grad_row_stride(const at::Tensor& grad_rows) {
  return grad_rows.dim() == 0 ? 0 : grad_rows.stride(0);
}

// `t` (rows elements) as a contiguous (rows,) tensor of dtype `type`: `t`
// itself when it is one already (small batches: each dispatched no-op costs
// as much as a row).
at::Tensor as_rows(const at::Tensor& t, int64_t rows, at::ScalarType type);

}  // namespace pgext
