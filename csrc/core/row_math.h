#pragma once
// Per-row math of pg_error, shared by the CPU and CUDA kernels so that the CPU
// tests cover the formulas the GPU runs. Derivation: shared/design/pg_math.md.
//
// One row holds logits x_j (j < N), an action a, a return R and a weight w.
// Forward keeps three running values in the accumulation type acc_t:
//   m = max_j x_j,  s = sum_j exp(x_j - m),  u = sum_j exp(x_j - m) * (x_j - m)
// u is kept relative to m (not sum exp * x) so that the entropy does not lose
// accuracy to cancellation when logits are large (1e4 and beyond).
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace pgext {
namespace math {
// The CPU kernel files include this header once per instruction set. The
// linker keeps one copy of each inline function that is not inlined
// everywhere, possibly the AVX2 one, which the portable kernels would then
// call: an illegal instruction on a CPU without AVX2. So in those files the
// functions get a namespace of their own (inline: callers still write math::).
#if defined(CPU_CAPABILITY)
inline namespace CPU_CAPABILITY {
#endif

template <typename acc_t>
C10_HOST_DEVICE inline acc_t exp_(acc_t x) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t log_(acc_t x) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return ::log(x);
#else
  return std::log(x);
#endif
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// Lowest finite value: masked logits (-inf) are clamped to it before they meet
// a zero probability, so that 0 * (-inf) never turns into NaN.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t lowest() {
  return std::numeric_limits<acc_t>::lowest();
}

// The column of class `action` in a row that holds classes [vocab_start,
// vocab_start + n), or -1 where the row does not hold it. vocab_start >= 0
// (the ops check it), so the subtraction is done only where it cannot
// overflow: computed first, action - vocab_start wraps for actions far below
// vocab_start and can land inside the row.
C10_HOST_DEVICE inline int64_t shard_column(int64_t action, int64_t vocab_start, int64_t n) {
  return action >= vocab_start && action - vocab_start < n ? action - vocab_start : -1;
}

template <typename acc_t>
struct RowStats {
  acc_t m;  // running max
  acc_t s;  // sum exp(x - m)
  acc_t u;  // sum exp(x - m) * (x - m)
};

// The max that pg_row_stats reports: NaN wherever s is, that is for a row
// holding a NaN or +inf logit. m alone would depend on where the NaN sat and
// on how the row was split (a vector max drops NaN; combine keeps it).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t reported_max(acc_t m, acc_t s) {
  return s != s ? s : m;
}

template <typename acc_t>
C10_HOST_DEVICE inline RowStats<acc_t> empty_stats() {
  return {neg_inf<acc_t>(), acc_t(0), acc_t(0)};
}

// Merges the statistics of two disjoint parts of a row. An empty part (or one
// that is entirely masked) has m = -inf and contributes nothing: its scale is 0
// and its term is skipped rather than formed as 0 * (-inf).
template <typename acc_t>
C10_HOST_DEVICE inline RowStats<acc_t> combine(RowStats<acc_t> a, RowStats<acc_t> b) {
  // NaN in either part goes to the outputs. It is tested first: a part can
  // hold it with m = -inf (a GPU lane whose first logit was NaN; a CPU block
  // keeps it in m, which the max below would drop), and the empty case would
  // then discard it.
  if (a.m != a.m || a.s != a.s || b.m != b.m || b.s != b.s) {
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    return {nan, nan, nan};
  }
  const acc_t m = a.m > b.m ? a.m : b.m;
  if (m == neg_inf<acc_t>()) {
    return empty_stats<acc_t>();
  }
  const acc_t sa = exp_(a.m - m);
  const acc_t sb = exp_(b.m - m);
  RowStats<acc_t> r;
  r.m = m;
  r.s = sa * a.s + sb * b.s;
  r.u = (sa == acc_t(0) ? acc_t(0) : sa * (a.u + (a.m - m) * a.s)) +
        (sb == acc_t(0) ? acc_t(0) : sb * (b.u + (b.m - m) * b.s));
  return r;
}

// Folds a part's statistics (pg_row_stats' max, sum_exp, shifted_sum and
// action logit) into running ones, in float64: the action's logit is 0 in
// every part but the one holding the action, so the parts' values add up.
template <typename part_t>
C10_HOST_DEVICE inline void merge_part(
    double& m, double& s, double& u, double& x_action, part_t part_m, part_t part_s, part_t part_u,
    part_t part_x_action) {
  const RowStats<double> r = combine<double>(
      {m, s, u}, {static_cast<double>(part_m), static_cast<double>(part_s), static_cast<double>(part_u)});
  m = r.m;
  s = r.s;
  u = r.u;
  x_action += static_cast<double>(part_x_action);
}

// Adds one logit to running statistics: the per-thread step of the GPU
// kernels (the CPU ones take a block's max first, then its sums). One exp per
// element, plus one when the max moves. tests/test_math_host.py runs it on the
// host, in the GPU's split of a row among threads.
template <typename acc_t>
C10_HOST_DEVICE inline void online_update(RowStats<acc_t>& st, acc_t x) {
  if (x == neg_inf<acc_t>()) {
    return;
  }
  if (x > st.m) {
    if (st.m != neg_inf<acc_t>()) {
      const acc_t d = st.m - x;
      const acc_t scale = exp_(d);
      // Logits masked with finfo.min make d * s overflow to -inf; their part
      // weighs 0 and must not turn into 0 * (-inf) = NaN. (A NaN in s still
      // reaches the outputs through s.)
      st.u = scale == acc_t(0) ? acc_t(0) : scale * (st.u + d * st.s);
      st.s *= scale;
    }
    st.m = x;
  }
  // x - m overflows to -inf for a finfo.min logit below a max above about
  // 1e31; exp of the clamped value is 0 just the same, and 0 * d stays 0.
  acc_t d = x - st.m;
  d = d < lowest<acc_t>() ? lowest<acc_t>() : d;
  const acc_t e = exp_(d);
  st.s += e;
  st.u += e * d;
}

// A finished row: log S (S = sum_j exp(x_j - m)) and the entropy. A row whose
// logits are all -inf has no distribution: log S = -inf and H = NaN, which
// propagate honestly.
template <typename acc_t>
struct RowResult {
  acc_t log_s;
  acc_t entropy;
};

template <typename acc_t>
C10_HOST_DEVICE inline RowResult<acc_t> finish_row(RowStats<acc_t> st) {
  const acc_t log_s = log_(st.s);
  return {log_s, log_s - st.u / st.s};
}

// log p(a) = (x_a - m) - log S. Never x_a - lse: lse = m + log S rounds to
// the ulp of the logits' magnitude (2e-3 at 3e4 in float32), which would be
// the log-probability's error; x_a - m is exact wherever p(a) is not tiny.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t log_prob(acc_t x_action, acc_t m, acc_t log_s) {
  return (x_action - m) - log_s;
}

// The log-sum-exp saved for backward, in float64 whatever acc_t: m + log S
// exactly (to 2^-53), so that backward can recover x - lse to acc_t's rounding.
template <typename acc_t>
C10_HOST_DEVICE inline double saved_lse(acc_t m, acc_t log_s) {
  return static_cast<double>(m) + static_cast<double>(log_s);
}

// A saved lse as hi + lo in acc_t: x - hi is exact for the logits that matter
// (Sterbenz), so (x - hi) - lo is x - lse to one rounding. An infinite lse (a
// fully masked or overflowing row) keeps lo = 0 rather than inf - inf.
template <typename acc_t>
struct SplitLse {
  acc_t hi;
  acc_t lo;
};

template <typename acc_t>
C10_HOST_DEVICE inline SplitLse<acc_t> split_lse(double lse) {
  const acc_t hi = static_cast<acc_t>(lse);
  const bool finite = hi - hi == acc_t(0);
  return {hi, finite ? static_cast<acc_t>(lse - static_cast<double>(hi)) : acc_t(0)};
}

// A logit divided by the sampling temperature T, as x * (1 / T) in acc_t:
// what every kernel reads in place of the logit (never a scaled copy of the
// logits in memory). inv_t = 1 leaves x bitwise as it is. Since
// multiplication by inv_t > 0 is monotone after rounding, the max of the
// scaled logits is the scaled max, which the CPU kernels use.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t scaled_logit(acc_t x, acc_t inv_t) {
  return x * inv_t;
}

// Per-row loss terms before reduction.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t policy_term(acc_t log_prob_action, acc_t ret, acc_t w) {
  return -w * ret * log_prob_action;
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t entropy_term(acc_t entropy, acc_t w) {
  return w * entropy;
}

// Backward: with p_j = exp(x_j - lse) (x_j - lse formed from split_lse),
//   dL/dx_j = cP * (p_j - [j == a]) - cE * p_j * (x_j - lse + H)
//           = p_j * k - cE * (p_j * t_j) - cP * [j == a]
// where t_j = x_j - lse, cP = gP*w*R/C, cE = gE*w/C and k = cP - cE*H.
// Written this way a masked logit (t_j clamped to the lowest finite value,
// p_j = 0) yields exactly 0 without ever forming 0 * (-inf) or overflowing.
template <typename acc_t>
struct RowGradCoef {
  acc_t c_policy;   // cP: also what the action's entry loses
  acc_t c_entropy;  // cE
  acc_t k;          // cP - cE * H
};

// With a temperature T the kernels see z = x / T (x * inv_t, scaled_logit)
// and the formulas above hold for z; dL/dx = dL/dz / T, so all three
// coefficients carry 1 / T: the kernels pass inv_count = (1 / C) * (1 / T)
// (grad_scale), which costs nothing per row and is 1 / C itself for T = 1.
template <typename acc_t>
C10_HOST_DEVICE inline RowGradCoef<acc_t> grad_coef(
    acc_t grad_policy, acc_t grad_entropy, acc_t ret, acc_t w, acc_t entropy, acc_t inv_count) {
  RowGradCoef<acc_t> c;
  c.c_policy = grad_policy * w * ret * inv_count;
  c.c_entropy = grad_entropy * w * inv_count;
  c.k = c.c_policy - c.c_entropy * entropy;
  return c;
}

// grad_coef's inv_count for C rows (inv_count = 1 / C, or 1) at the
// temperature 1 / inv_temperature, formed in double and rounded once.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t grad_scale(double inv_count, double inv_temperature) {
  return static_cast<acc_t>(inv_count * inv_temperature);
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t grad_elem(acc_t x, SplitLse<acc_t> lse, RowGradCoef<acc_t> c) {
  acc_t t = (x - lse.hi) - lse.lo;
  t = t < lowest<acc_t>() ? lowest<acc_t>() : t;
  const acc_t p = exp_(t);
  return p * c.k - c.c_entropy * (p * t);
}

// grad_elem for a row whose entropy has no upstream gradient (cE == 0: the
// entropy's gradient None, PPO without an entropy bonus): p * k, the value
// grad_elem gives (up to the sign of a zero), with no entropy arithmetic.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t grad_elem_policy_only(acc_t x, SplitLse<acc_t> lse, RowGradCoef<acc_t> c) {
  acc_t t = (x - lse.hi) - lse.lo;
  t = t < lowest<acc_t>() ? lowest<acc_t>() : t;
  return exp_(t) * c.k;
}

#if defined(CPU_CAPABILITY)
}  // namespace CPU_CAPABILITY
#endif
}  // namespace math
}  // namespace pgext
