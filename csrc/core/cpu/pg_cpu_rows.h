#pragma once
// What the CPU kernels read and write per row, as raw pointers taken once per
// call, shared by the per-row (pg_cpu_kernel_impl.h) and the short-row
// (pg_cpu_short_rows.h) kernels. Include only from those.
#include "pg_cpu_kernel.h"

#include "../row_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <limits>

namespace pgext {
namespace cpu {
namespace CPU_CAPABILITY {

// The logits as rows of n, unit-strided within a row.
template <typename scalar_t>
struct LogitRows {
  explicit LogitRows(const RowInputs& in)
      : data(in.logit.const_data_ptr<scalar_t>()), stride(in.logit.stride(0)), n(in.n), rows(in.rows) {}
  const scalar_t* row(int64_t r) const {
    return data + r * stride;
  }
  const scalar_t* data;
  int64_t stride;
  int64_t n;
  int64_t rows;
};

// pg_error_forward's per-row outputs.
template <typename acc_t>
struct ForwardSink {
  ForwardSink(const RowInputs& in, ForwardRows& out)
      : action(in.action.const_data_ptr<int64_t>()),
        n(in.n),
        ret(in.ret.const_data_ptr<acc_t>()),
        ret_stride(in.ret_stride),
        weight(in.weight.defined() ? in.weight.const_data_ptr<acc_t>() : nullptr),
        lse(out.lse.mutable_data_ptr<double>()),
        entropy(out.entropy.mutable_data_ptr<acc_t>()),
        policy(out.policy.mutable_data_ptr<acc_t>()),
        entropy_weighted(out.entropy_weighted.mutable_data_ptr<acc_t>()) {}

  // A finished row: its max m, log S and entropy (math::finish_row).
  void put(int64_t r, acc_t x_action, acc_t m, acc_t log_s, acc_t row_entropy) const {
    const acc_t w = weight ? weight[r] : acc_t(1);
    lse[r] = math::saved_lse(m, log_s);
    entropy[r] = row_entropy;
    policy[r] = math::policy_term(math::log_prob(x_action, m, log_s), ret[r * ret_stride], w);
    entropy_weighted[r] = math::entropy_term(row_entropy, w);
  }

  // The action's column, or -1 for an action outside the row: only a sample
  // of weight 0 has one (check_actions), and its logit is never read.
  int64_t column(int64_t r) const {
    return math::shard_column(action[r], 0, n);
  }

  const int64_t* action;
  int64_t n;
  const acc_t* ret;
  int64_t ret_stride;  // 0: one return for every row
  const acc_t* weight;
  double* lse;
  acc_t* entropy;
  acc_t* policy;
  acc_t* entropy_weighted;
};

// pg_row_stats' per-row outputs, for the classes [vocab_start, vocab_start + n).
template <typename acc_t>
struct ShardSink {
  ShardSink(const RowInputs& in, int64_t vocab_start_, ShardRows& out)
      : action(in.action.const_data_ptr<int64_t>()),
        vocab_start(vocab_start_),
        n(in.n),
        max(out.max.mutable_data_ptr<acc_t>()),
        sum_exp(out.sum_exp.mutable_data_ptr<acc_t>()),
        shifted_sum(out.shifted_sum.mutable_data_ptr<acc_t>()),
        action_logit(out.action_logit.mutable_data_ptr<acc_t>()) {}

  // The action's column in this shard, or -1 when another shard holds it.
  int64_t action_column(int64_t r) const {
    return math::shard_column(action[r], vocab_start, n);
  }

  void put(int64_t r, acc_t m, acc_t s, acc_t u, acc_t x_action) const {
    max[r] = math::reported_max(m, s);
    sum_exp[r] = s;
    shifted_sum[r] = u;
    action_logit[r] = x_action;
  }

  const int64_t* action;
  int64_t vocab_start;
  int64_t n;
  acc_t* max;
  acc_t* sum_exp;
  acc_t* shifted_sum;
  acc_t* action_logit;
};

// A loss's upstream gradient for row r: a (rows,) tensor in acc_t, or one
// value for every row, read here from a 0-d tensor of any floating dtype
// (CpuBackend::upstream_grad).
template <typename acc_t>
struct UpstreamGrad {
  explicit UpstreamGrad(const at::Tensor& grad) {
    if (grad.dim() == 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "pg_upstream_grad", [&] {
        value = static_cast<acc_t>(*grad.const_data_ptr<scalar_t>());
      });
    } else {
      rows = grad.const_data_ptr<acc_t>();
      stride = grad.stride(0);
    }
  }
  acc_t operator[](int64_t r) const {
    return rows ? rows[r * stride] : value;
  }
  const acc_t* rows = nullptr;
  int64_t stride = 0;
  acc_t value = 0;
};

// Backward's per-row inputs (BackwardRows and the samples).
template <typename acc_t>
struct BackwardSource {
  BackwardSource(const RowInputs& in, const BackwardRows& rows)
      : action(in.action.const_data_ptr<int64_t>()),
        vocab_start(rows.shard_vocab_start.value_or(0)),
        n(in.n),
        ret(in.ret.const_data_ptr<acc_t>()),
        ret_stride(in.ret_stride),
        weight(in.weight.defined() ? in.weight.const_data_ptr<acc_t>() : nullptr),
        g_pol(rows.grad_policy),
        g_ent(rows.grad_entropy),
        lse(rows.lse.const_data_ptr<double>()),
        entropy(rows.entropy.const_data_ptr<acc_t>()),
        inv_count(math::grad_scale<acc_t>(rows.inv_count, in.inv_temperature)) {}

  // kDefaultNan: with every NaN the default NaN (see default_nan).
  template <bool kDefaultNan = false>
  math::RowGradCoef<acc_t> coef(int64_t r) const {
    const acc_t w = weight ? weight[r] : acc_t(1);
    const auto c = math::grad_coef(g_pol[r], g_ent[r], ret[r * ret_stride], w, entropy[r], inv_count);
    if constexpr (kDefaultNan) {
      return {default_nan(c.c_policy), default_nan(c.c_entropy), default_nan(c.k)};
    }
    return c;
  }

  // The action's column within the row (or shard), or -1 when another shard
  // holds it.
  int64_t action_column(int64_t r) const {
    return math::shard_column(action[r], vocab_start, n);
  }

  template <bool kDefaultNan = false>
  math::SplitLse<acc_t> row_lse(int64_t r) const {
    const auto l = math::split_lse<acc_t>(lse[r]);
    if constexpr (kDefaultNan) {
      return {default_nan(l.hi), default_nan(l.lo)};
    }
    return l;
  }

  // A NaN replaced by the default NaN, for the AVX2 bfloat16 rounding of the
  // per-row loop, which keeps a NaN a NaN only where its low 16 bits are zero
  // (bf16_rounded_high): a user's NaN (a return, an upstream gradient, a
  // log-sum-exp handed to a shard) may carry any payload. Short rows skip the
  // tests, which cost a bfloat16 (4096, 2) backward a tenth.
  static acc_t default_nan(acc_t v) {
    return v == v ? v : std::numeric_limits<acc_t>::quiet_NaN();
  }

  const int64_t* action;
  int64_t vocab_start;
  int64_t n;
  const acc_t* ret;
  int64_t ret_stride;  // 0: one return for every row
  const acc_t* weight;
  UpstreamGrad<acc_t> g_pol;
  UpstreamGrad<acc_t> g_ent;
  const double* lse;  // float64: split into hi + lo per row
  const acc_t* entropy;
  acc_t inv_count;  // 1 / C and 1 / temperature (math::grad_scale)
};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace pgext
