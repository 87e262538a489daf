// The tile loops of the fused output layer, forward and backward. They walk
// the vocabulary in class slices (and the rows in tiles only when there are
// so many that a slice would get too thin), so each slice of the weight is
// read once per row tile and its gradient written once, instead of every row
// chunk re-reading the whole weight. Forward merges the slices' row statistics
// online (pg_row_stats, as pgext.distributed merges shards); backward
// recomputes each tile's logits and takes their gradient from the saved lse
// and entropy (pg_grad_from_stats, return -1, reduction 'none'). Only
// dispatcher ops are called (at::addmm, pgext kernel ops), so the same code runs on every backend
// (CompositeExplicitAutograd) without a host synchronization, and the results
// do not depend on the chunk size beyond the GEMMs' rounding.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "core/checks.h"
#include "core/ops.h"
#include "ops/linear_log_prob_entropy/linear_log_prob_entropy.h"

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_assert_async.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/log.h>
#include <ATen/ops/logical_and.h>
#include <ATen/ops/logical_or.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <string>
#include <utility>

namespace pgext {
namespace {

struct Flat {
  at::Tensor x;       // (rows, H)
  at::Tensor action;  // (rows,)
  at::Tensor keep;    // (rows,) bool, undefined without ignore_index
  int64_t rows = 0;
  LinearTiles tiles;
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
  const int64_t V = linear_weight.size(0);
  f.tiles = linear_tiles(
      chunk_size, f.rows, V, input.scalar_type(), linear_slice_bytes(input.device(), f.rows, V, input.scalar_type()));
  return f;
}

// The actions are checked here once: pg_row_stats, which sees one class
// slice, cannot tell a bad action from one in another slice. On the CPU the
// error names the sample by its index in the whole input; elsewhere that
// would be a host synchronization, so a device-side assert reports it.
void check_actions(const Flat& f, int64_t V) {
  if (f.rows == 0) {
    return;
  }
  at::Tensor bad = at::logical_or(f.action < 0, f.action >= V);
  if (f.keep.defined()) {
    bad = at::logical_and(bad, f.keep);
  }
  if (!f.action.device().is_cpu()) {
    at::_assert_async(bad.any().logical_not(), "linear_log_prob_entropy: an action is out of range for V classes");
    return;
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

// (x W^T + b) / T for one tile, the temperature folded into the GEMM: no
// second pass over the logits and no rounding of the untempered ones.
// Written into the front of `buffer` (one tile's worth, allocated once per
// call): a fresh tile per GEMM would fault its pages in again each time,
// and with THP_MEM_ALLOC_ENABLE=1 (huge pages zeroed on every allocation)
// that cost grows with the number of slices.
at::Tensor tile_logits(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double inv_t, const at::Tensor& buffer) {
  at::Tensor z = buffer.narrow(0, 0, x.size(0) * w.size(0)).view({x.size(0), w.size(0)});
  if (b.defined()) {
    return at::addmm_out(z, b, x, w.t(), /*beta=*/inv_t, /*alpha=*/inv_t);
  }
  at::mm_out(z, x, w.t());
  return inv_t == 1.0 ? z : z.mul_(inv_t);
}

at::Tensor tile_buffer(const Flat& f, const at::Tensor& input) {
  return at::empty({std::min(f.tiles.rows, f.rows) * f.tiles.classes}, input.options());
}

// The running statistics of one row tile over the class slices seen so far,
// in float64 so that the merge's rescalings do not depend on the slicing:
// each slice's pg_row_stats is folded in by one pg_merge_row_stats_ call
// (math::combine, as pgext.distributed merges shards; pg_math.md).
struct RowStats {
  at::Tensor max, sum_exp, shifted_sum, action_logit;

  RowStats(int64_t rows, const at::TensorOptions& options) {
    const auto f64 = options.dtype(at::kDouble);
    max = at::full({rows}, -INFINITY, f64);
    sum_exp = at::zeros({rows}, f64);
    shifted_sum = at::zeros({rows}, f64);
    action_logit = at::zeros({rows}, f64);
  }

  void merge(const at::Tensor& m, const at::Tensor& s, const at::Tensor& q, const at::Tensor& xa) {
    ops::pg_merge_row_stats_(max, sum_exp, shifted_sum, action_logit, m, s, q, xa);
  }
};

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
  const int64_t V = linear_weight.size(0);
  check_actions(f, V);
  const at::Tensor bias = linear_bias.value_or(at::Tensor());
  const auto acc = input.options().dtype(acc_type(input.scalar_type()));
  at::Tensor log_prob = at::empty({f.rows}, acc);
  at::Tensor entropy = at::empty({f.rows}, acc);
  at::Tensor lse = at::empty({f.rows}, input.options().dtype(at::kDouble));
  const double inv_t = 1.0 / temperature;
  const at::Tensor buffer = tile_buffer(f, input);
  for (int64_t r0 = 0; r0 < f.rows; r0 += f.tiles.rows) {
    const int64_t rn = std::min(f.tiles.rows, f.rows - r0);
    const at::Tensor x = f.x.narrow(0, r0, rn);
    const at::Tensor a = f.action.narrow(0, r0, rn);
    RowStats st(rn, input.options());
    for (int64_t c0 = 0; c0 < V; c0 += f.tiles.classes) {
      const int64_t cn = std::min(f.tiles.classes, V - c0);
      const at::Tensor z = tile_logits(
          x, linear_weight.narrow(0, c0, cn), bias.defined() ? bias.narrow(0, c0, cn) : bias, inv_t, buffer);
      // the action's logit is 0 where the action lies in another slice, and
      // ignored rows' actions are never read as indices
      auto [m, s, q, xa] = ops::pg_row_stats(z, a, c0, 1.0);
      st.merge(m, s, q, xa);
    }
    const at::Tensor log_total = at::log(st.sum_exp);
    // the kernels' form (pg_math.h): log p(a) = (x_a - max) - log S
    log_prob.narrow(0, r0, rn).copy_((st.action_logit - st.max) - log_total);
    entropy.narrow(0, r0, rn).copy_(log_total - st.shifted_sum / st.sum_exp);
    lse.narrow(0, r0, rn).copy_(st.max + log_total);
  }
  if (f.keep.defined()) {
    // exactly 0 for ignored rows (a padding row may hold NaN); backward never
    // reads their statistics
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
    std::optional<int64_t> chunk_size,
    std::array<bool, 3> output_mask) {
  check_linear_inputs(input, linear_weight, action, linear_bias, temperature, chunk_size);
  check_linear_backward_inputs(grad_log_prob, grad_entropy, lse, entropy, action);
  const Flat f = flatten(input, linear_weight, action, ignore_index, chunk_size);
  const int64_t V = linear_weight.size(0);
  const at::Tensor bias = linear_bias.value_or(at::Tensor());
  const bool want_input = output_mask[0];
  const bool want_weight = output_mask[1];
  const bool want_bias = output_mask[2] && bias.defined();
  const auto dtype = input.scalar_type();
  const auto acc = acc_type(dtype);
  // a gradient not asked for: shape (0,), and none of its work is done
  const auto none = [&] { return at::empty({0}, input.options()); };
  at::Tensor grad_input = want_input ? at::zeros({f.rows, linear_weight.size(1)}, input.options().dtype(acc)) : none();
  at::Tensor grad_weight = want_weight ? at::empty(linear_weight.sizes(), linear_weight.options()) : none();
  at::Tensor grad_bias = want_bias ? at::empty(bias.sizes(), bias.options()) : none();
  if (!want_input && !want_weight && !want_bias) {
    return {grad_input, grad_weight, grad_bias};
  }
  // contiguous once here (the gradient of a sum is an expanded view), not
  // copied again by every slice's pg_grad_from_stats
  const at::Tensor g_lp = grad_log_prob.reshape({f.rows}).to(acc).contiguous();
  const at::Tensor g_ent = grad_entropy.reshape({f.rows}).to(acc).contiguous();
  const at::Tensor row_lse = lse.reshape({f.rows}).to(at::kDouble);
  const at::Tensor row_entropy = entropy.reshape({f.rows}).to(acc);
  const at::Tensor minus_one = at::full({}, -1.0, input.options().dtype(acc));
  const std::optional<at::Tensor> keep = f.keep.defined() ? std::optional<at::Tensor>(f.keep) : std::nullopt;
  const double inv_t = 1.0 / temperature;
  const bool one_row_tile = f.tiles.rows >= f.rows;
  const at::Tensor buffer = tile_buffer(f, input);
  // grad_input sums over every class slice: in float32 for half types. Each
  // class slice of the weight's gradient is written once, summed over the
  // row tiles (in float32 for half types) only when there are several.
  for (int64_t c0 = 0; c0 < V; c0 += f.tiles.classes) {
    const int64_t cn = std::min(f.tiles.classes, V - c0);
    const at::Tensor w = linear_weight.narrow(0, c0, cn);
    const at::Tensor b = bias.defined() ? bias.narrow(0, c0, cn) : bias;
    at::Tensor gw;
    if (want_weight) {
      gw = one_row_tile ? grad_weight.narrow(0, c0, cn) : at::zeros({cn, w.size(1)}, w.options().dtype(acc));
    }
    at::Tensor gb = want_bias ? at::zeros({cn}, b.options().dtype(acc)) : at::Tensor();
    for (int64_t r0 = 0; r0 < f.rows; r0 += f.tiles.rows) {
      const int64_t rn = std::min(f.tiles.rows, f.rows - r0);
      const at::Tensor x = f.x.narrow(0, r0, rn);
      const at::Tensor z = tile_logits(x, w, b, inv_t, buffer);
      // d loss / d logits of the tempered logits, in their dtype; 0 on ignored rows
      const at::Tensor g = ops::pg_grad_from_stats(
          g_lp.narrow(0, r0, rn), g_ent.narrow(0, r0, rn), z, f.action.narrow(0, r0, rn), minus_one,
          keep.has_value() ? std::optional<at::Tensor>(keep->narrow(0, r0, rn)) : std::nullopt,
          row_lse.narrow(0, r0, rn), row_entropy.narrow(0, r0, rn), "none", c0, 1.0);
      if (want_input) {
        at::Tensor gi = grad_input.narrow(0, r0, rn);
        if (acc == dtype) {
          gi.addmm_(g, w, /*beta=*/1, /*alpha=*/inv_t);
        } else {
          gi.add_(at::mm(g, w), inv_t);
        }
      }
      if (want_weight) {
        if (one_row_tile) {
          at::mm_out(gw, g.t(), x);
          if (inv_t != 1.0) {
            gw.mul_(inv_t);
          }
        } else if (acc == dtype) {
          gw.addmm_(g.t(), x, /*beta=*/1, /*alpha=*/inv_t);
        } else {
          gw.add_(at::mm(g.t(), x), inv_t);
        }
      }
      if (want_bias) {
        gb.add_(g.sum(0, /*keepdim=*/false, acc), inv_t);
      }
    }
    if (want_weight && !one_row_tile) {
      grad_weight.narrow(0, c0, cn).copy_(gw);
    }
    if (want_bias) {
      grad_bias.narrow(0, c0, cn).copy_(gb);
    }
  }
  if (f.rows == 0) {  // no row tile ran: the class slices were never written
    for (at::Tensor* t : {&grad_weight, &grad_bias}) {
      t->zero_();
    }
  }
  if (want_input) {
    grad_input = grad_input.to(dtype).view(input.sizes());
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pgext, CompositeExplicitAutograd, m) {
  m.impl("linear_log_prob_entropy_forward", &linear_forward);
  m.impl("linear_log_prob_entropy_backward", &linear_backward);
}

}  // namespace pgext
