// The chunk loops of the fused output layer, forward and backward. Each chunk
// of rows forms its logits (rows x V) with one GEMM, runs pg_error's fused
// kernels on them (return -1, reduction 'none': policy = log p(a)) and drops
// them; backward recomputes them. Only dispatcher ops are called (at::addmm,
// pgext::pg_error_forward/backward), so the same code runs on every backend
// (CompositeExplicitAutograd) without a host synchronization, and the results
// do not depend on the chunk size beyond the GEMMs' rounding.
#include "core/checks.h"
#include "core/ops.h"
#include "ops/linear_log_prob_entropy/linear_log_prob_entropy.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

namespace pgext {
namespace {

struct Flat {
  at::Tensor x;       // (rows, H)
  at::Tensor action;  // (rows,)
  at::Tensor keep;    // (rows,) bool, undefined without ignore_index
  int64_t rows = 0;
  int64_t chunk = 1;
};

Flat flatten(
    const at::Tensor& input,
    const at::Tensor& linear_weight,
    const at::Tensor& action,
    std::optional<int64_t> ignore_index,
    std::optional<int64_t> chunk_size) {
  Flat f;
  f.rows = action.numel();
  // (rows, H) from the row count, not -1: H may be 0
  f.x = input.reshape({f.rows, linear_weight.size(1)});
  f.action = action.reshape({f.rows});
  if (ignore_index.has_value()) {
    f.keep = f.action != *ignore_index;
  }
  f.chunk = linear_chunk_rows(chunk_size, f.rows, linear_weight.size(0), input.scalar_type());
  return f;
}

// On the CPU, the actions are checked here once, so that an error names the
// sample by its index in the whole input, not in its chunk (the kernels'
// check, which also runs, knows only the chunk). On CUDA that would be a host
// synchronization: the kernels' device-side assert reports it instead.
void check_actions_on_cpu(const Flat& f, int64_t V) {
  if (!f.action.device().is_cpu() || f.rows == 0) {
    return;
  }
  at::Tensor bad = at::logical_or(f.action < 0, f.action >= V);
  if (f.keep.defined()) {
    bad = at::logical_and(bad, f.keep);
  }
  if (!bad.any().item<bool>()) {
    return;
  }
  const int64_t i = bad.nonzero()[0][0].item<int64_t>();
  throw_action_out_of_range(
      "linear_log_prob_entropy: action " + std::to_string(f.action[i].item<int64_t>()) + " (sample " +
      std::to_string(i) + ") is out of range for V = " + std::to_string(V) + " classes; expected 0 <= action < " +
      std::to_string(V));
}

std::optional<at::Tensor> rows_of(const at::Tensor& t, int64_t start, int64_t len) {
  return t.defined() ? std::optional<at::Tensor>(t.narrow(0, start, len)) : std::nullopt;
}

// (x W^T + b) / T for one chunk, the temperature folded into the GEMM: no
// second pass over the logits and no rounding of the untempered ones.
at::Tensor chunk_logits(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double inv_t) {
  if (b.defined()) {
    return at::addmm(b, x, w.t(), /*beta=*/inv_t, /*alpha=*/inv_t);
  }
  at::Tensor z = at::mm(x, w.t());
  return inv_t == 1.0 ? z : z.mul_(inv_t);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_forward(
    const at::Tensor& input,
    const at::Tensor& linear_weight,
    const at::Tensor& action,
    const std::optional<at::Tensor>& linear_bias,
    double temperature,
    std::optional<int64_t> ignore_index,
    std::optional<int64_t> chunk_size) {
  check_linear_inputs(input, linear_weight, action, linear_bias, temperature, chunk_size);
  const Flat f = flatten(input, linear_weight, action, ignore_index, chunk_size);
  check_actions_on_cpu(f, linear_weight.size(0));
  const at::Tensor bias = linear_bias.value_or(at::Tensor());
  const auto acc = input.options().dtype(acc_type(input.scalar_type()));
  at::Tensor log_prob = at::empty({f.rows}, acc);
  at::Tensor entropy = at::empty({f.rows}, acc);
  at::Tensor lse = at::empty({f.rows}, input.options().dtype(at::kDouble));
  const at::Tensor minus_one = at::full({}, -1.0, acc);
  const double inv_t = 1.0 / temperature;
  for (int64_t start = 0; start < f.rows; start += f.chunk) {
    const int64_t len = std::min(f.chunk, f.rows - start);
    const at::Tensor z = chunk_logits(f.x.narrow(0, start, len), linear_weight, bias, inv_t);
    // Ignored rows have weight 0: pg_error neither range-checks nor reads them.
    auto [policy, unused, row_lse, row_entropy] =
        ops::pg_error_forward(z, f.action.narrow(0, start, len), minus_one, rows_of(f.keep, start, len), "none");
    log_prob.narrow(0, start, len).copy_(policy);
    entropy.narrow(0, start, len).copy_(row_entropy);
    lse.narrow(0, start, len).copy_(row_lse);
  }
  if (f.keep.defined()) {
    // exactly 0 for ignored rows (the weight alone leaves -0, or a padding
    // row's NaN); backward never reads their statistics
    const at::Tensor zero = at::zeros({}, acc);
    log_prob = at::where(f.keep, log_prob, zero);
    entropy = at::where(f.keep, entropy, zero);
  }
  return {log_prob.view(action.sizes()), entropy.view(action.sizes()), lse.view(action.sizes())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(
    const at::Tensor& grad_log_prob,
    const at::Tensor& grad_entropy,
    const at::Tensor& input,
    const at::Tensor& linear_weight,
    const at::Tensor& action,
    const std::optional<at::Tensor>& linear_bias,
    const at::Tensor& lse,
    const at::Tensor& entropy,
    double temperature,
    std::optional<int64_t> ignore_index,
    std::optional<int64_t> chunk_size) {
  check_linear_inputs(input, linear_weight, action, linear_bias, temperature, chunk_size);
  check_linear_backward_inputs(grad_log_prob, grad_entropy, lse, entropy, action);
  const Flat f = flatten(input, linear_weight, action, ignore_index, chunk_size);
  const at::Tensor bias = linear_bias.value_or(at::Tensor());
  const auto dtype = input.scalar_type();
  const auto acc = acc_type(dtype);
  const at::Tensor g_lp = grad_log_prob.reshape({f.rows}).to(acc);
  const at::Tensor g_ent = grad_entropy.reshape({f.rows}).to(acc);
  const at::Tensor row_lse = lse.reshape({f.rows}).to(at::kDouble);
  const at::Tensor row_entropy = entropy.reshape({f.rows}).to(acc);
  const at::Tensor minus_one = at::full({}, -1.0, input.options().dtype(acc));
  const double inv_t = 1.0 / temperature;
  // The weight's gradient sums over every chunk: in float32 for half types
  // (each chunk's product is rounded once, the sum is not), converted at the end.
  at::Tensor grad_input = at::empty({f.rows, linear_weight.size(1)}, input.options());
  at::Tensor grad_weight = at::zeros(linear_weight.sizes(), linear_weight.options().dtype(acc));
  at::Tensor grad_bias = bias.defined() ? at::zeros(bias.sizes(), bias.options().dtype(acc)) : at::Tensor();
  for (int64_t start = 0; start < f.rows; start += f.chunk) {
    const int64_t len = std::min(f.chunk, f.rows - start);
    const at::Tensor x = f.x.narrow(0, start, len);
    const at::Tensor z = chunk_logits(x, linear_weight, bias, inv_t);
    // d loss / d logits of the tempered logits, in their dtype; 0 on ignored rows
    const at::Tensor g = ops::pg_error_backward(
        g_lp.narrow(0, start, len), g_ent.narrow(0, start, len), z, f.action.narrow(0, start, len), minus_one,
        rows_of(f.keep, start, len), row_lse.narrow(0, start, len), row_entropy.narrow(0, start, len), "none");
    at::Tensor gi = grad_input.narrow(0, start, len);
    at::addmm_out(gi, gi, g, linear_weight, /*beta=*/0, /*alpha=*/inv_t);
    if (acc == dtype) {
      grad_weight.addmm_(g.t(), x, /*beta=*/1, /*alpha=*/inv_t);
    } else {
      grad_weight.add_(at::mm(g.t(), x), inv_t);
    }
    if (grad_bias.defined()) {
      grad_bias.add_(g.sum(0, /*keepdim=*/false, acc), inv_t);
    }
  }
  return {grad_input.view(input.sizes()), grad_weight.to(dtype),
          grad_bias.defined() ? grad_bias.to(dtype) : at::empty({0}, input.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(pgext, CompositeExplicitAutograd, m) {
  m.impl("linear_log_prob_entropy_forward", &linear_forward);
  m.impl("linear_log_prob_entropy_backward", &linear_backward);
}

}  // namespace pgext
