// Checks of the fused output layer's inputs and its Meta kernels (shapes and
// dtypes without data, on symbolic shapes), so that FakeTensor and
// torch.compile(fullgraph=True) trace the chunk loop as one op each way and
// report the same errors as eager.
#include "core/checks.h"
#include "ops/linear_log_prob_entropy/linear_log_prob_entropy.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace pgext {

int64_t linear_chunk_rows(int64_t rows, int64_t V, at::ScalarType dtype) {
  const int64_t chunk = kLinearChunkBytes / (std::max<int64_t>(V, 1) * static_cast<int64_t>(c10::elementSize(dtype)));
  return std::max<int64_t>(1, std::min(chunk, rows));
}

int64_t linear_slice_bytes(const c10::Device& device, int64_t rows, int64_t V, at::ScalarType dtype) {
  if (device.is_cpu()) {
    return kLinearSliceBytes;
  }
  // rows * V * elt / 16 without overflow: V and the element size are small
  const int64_t sixteenth = rows / 16 * V * static_cast<int64_t>(c10::elementSize(dtype));
  return std::clamp(sixteenth, kLinearSliceBytes, kLinearSliceBytesGpuMax);
}

LinearTiles linear_tiles(
    std::optional<int64_t> chunk_size, int64_t rows, int64_t V, at::ScalarType dtype, int64_t slice_bytes) {
  const int64_t elt = static_cast<int64_t>(c10::elementSize(dtype));
  LinearTiles t;
  t.rows = std::max<int64_t>(1, std::min(rows, slice_bytes / (kLinearMinSliceClasses * elt)));
  const int64_t classes = chunk_size.has_value()
      ? *chunk_size
      : std::max(kLinearMinSliceClasses, slice_bytes / (t.rows * elt));
  t.classes = std::max<int64_t>(1, std::min(classes, V));
  return t;
}

void check_linear_inputs(
    const at::Tensor& input,
    const at::Tensor& linear_weight,
    const at::Tensor& action,
    const std::optional<at::Tensor>& linear_bias,
    double temperature,
    std::optional<int64_t> chunk_size) {
  constexpr const char* op = "linear_log_prob_entropy: ";
  TORCH_CHECK_VALUE(
      input.defined() && linear_weight.defined() && action.defined(),
      op, "input, linear_weight and action must be tensors");
  TORCH_CHECK_TYPE(
      is_supported_float(input.scalar_type()),
      op, "input must be float16, bfloat16, float32 or float64, got ", input.scalar_type());
  TORCH_CHECK_VALUE(input.dim() >= 1, op, "input must have shape (..., H), got a 0-d tensor");
  TORCH_CHECK_VALUE(
      linear_weight.dim() == 2, op, "linear_weight must have shape (V, H), got ", linear_weight.sym_sizes());
  TORCH_CHECK_TYPE(
      linear_weight.scalar_type() == input.scalar_type(),
      op, "linear_weight must have input's dtype ", input.scalar_type(), ", got ", linear_weight.scalar_type());
  TORCH_CHECK_VALUE(
      linear_weight.sym_size(1) == input.sym_size(-1),
      op, "linear_weight's H = ", linear_weight.sym_size(1), " (shape ", linear_weight.sym_sizes(),
      ") differs from input's H = ", input.sym_size(-1), " (shape ", input.sym_sizes(), ")");
  TORCH_CHECK_VALUE(
      linear_weight.sym_size(0) > 0,
      op, "linear_weight has V = 0 classes (shape ", linear_weight.sym_sizes(), "); a distribution needs V >= 1");
  TORCH_CHECK_VALUE(
      linear_weight.device() == input.device(),
      op, "linear_weight is on ", linear_weight.device(), " but input is on ", input.device());
  if (linear_bias.has_value() && linear_bias->defined()) {
    const at::Tensor& b = *linear_bias;
    TORCH_CHECK_VALUE(
        b.dim() == 1 && b.sym_size(0) == linear_weight.sym_size(0),
        op, "linear_bias must have shape (V,) = (", linear_weight.sym_size(0), ",), got ", b.sym_sizes());
    TORCH_CHECK_TYPE(
        b.scalar_type() == input.scalar_type(),
        op, "linear_bias must have input's dtype ", input.scalar_type(), ", got ", b.scalar_type());
    TORCH_CHECK_VALUE(b.device() == input.device(), op, "linear_bias is on ", b.device(), " but input is on ",
                      input.device());
  }
  TORCH_CHECK_TYPE(
      at::isIntegralType(action.scalar_type(), /*includeBool=*/false),
      op, "action must hold integer class indices, got dtype ", action.scalar_type());
  TORCH_CHECK_VALUE(
      action.sym_sizes() == input.sym_sizes().slice(0, input.dim() - 1),
      op, "action must have shape input.shape[:-1] = ", input.sym_sizes().slice(0, input.dim() - 1), ", got ",
      action.sym_sizes(), " (input ", input.sym_sizes(), ")");
  TORCH_CHECK_VALUE(
      action.device() == input.device(), op, "action is on ", action.device(), " but input is on ", input.device());
  TORCH_CHECK_VALUE(
      std::isfinite(temperature) && temperature > 0.0,
      op, "temperature must be a finite number > 0, got ", temperature);
  TORCH_CHECK_VALUE(
      !chunk_size.has_value() || *chunk_size > 0, op, "chunk_size must be > 0 (or None), got ",
      chunk_size.value_or(0));
}

void check_linear_backward_inputs(
    const at::Tensor& grad_log_prob,
    const at::Tensor& grad_entropy,
    const at::Tensor& lse,
    const at::Tensor& entropy,
    const at::Tensor& action) {
  for (const at::Tensor* t : {&grad_log_prob, &grad_entropy, &lse, &entropy}) {
    TORCH_CHECK_VALUE(t->defined(), "linear_log_prob_entropy_backward: gradients and statistics must be tensors");
    TORCH_CHECK_TYPE(
        is_supported_float(t->scalar_type()),
        "linear_log_prob_entropy_backward: gradients and saved statistics must be floating point, got ",
        t->scalar_type());
    TORCH_CHECK_VALUE(
        t->sym_sizes() == action.sym_sizes(),
        "linear_log_prob_entropy_backward: gradients and saved statistics must have action's shape ",
        action.sym_sizes(), ", got ", t->sym_sizes());
    TORCH_CHECK_VALUE(
        t->device() == action.device(), "linear_log_prob_entropy_backward: a gradient or statistic is on ",
        t->device(), " but action is on ", action.device());
  }
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_forward_meta(
    const at::Tensor& input,
    const at::Tensor& linear_weight,
    const at::Tensor& action,
    const std::optional<at::Tensor>& linear_bias,
    double temperature,
    std::optional<int64_t> /*ignore_index*/,
    std::optional<int64_t> chunk_size) {
  check_linear_inputs(input, linear_weight, action, linear_bias, temperature, chunk_size);
  const auto stats = input.options().dtype(acc_type(input.scalar_type()));
  return {at::empty_symint(action.sym_sizes(), stats), at::empty_symint(action.sym_sizes(), stats),
          at::empty_symint(action.sym_sizes(), input.options().dtype(at::kDouble))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward_meta(
    const at::Tensor& grad_log_prob,
    const at::Tensor& grad_entropy,
    const at::Tensor& input,
    const at::Tensor& linear_weight,
    const at::Tensor& action,
    const std::optional<at::Tensor>& linear_bias,
    const at::Tensor& lse,
    const at::Tensor& entropy,
    double temperature,
    std::optional<int64_t> /*ignore_index*/,
    std::optional<int64_t> chunk_size,
    std::array<bool, 3> output_mask) {
  check_linear_inputs(input, linear_weight, action, linear_bias, temperature, chunk_size);
  check_linear_backward_inputs(grad_log_prob, grad_entropy, lse, entropy, action);
  const bool has_bias = linear_bias.has_value() && linear_bias->defined();
  const at::Tensor none = at::empty({0}, input.options());
  return {output_mask[0] ? at::empty_symint(input.sym_sizes(), input.options()) : none,
          output_mask[1] ? at::empty_symint(linear_weight.sym_sizes(), linear_weight.options()) : none.clone(),
          has_bias && output_mask[2] ? at::empty_symint(linear_bias->sym_sizes(), linear_bias->options())
                                     : none.clone()};
}

}  // namespace

TORCH_LIBRARY_IMPL(pgext, Meta, m) {
  m.impl("linear_log_prob_entropy_forward", &linear_forward_meta);
  m.impl("linear_log_prob_entropy_backward", &linear_backward_meta);
}

}  // namespace pgext
