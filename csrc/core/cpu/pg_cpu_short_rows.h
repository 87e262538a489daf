#pragma once
// Short rows (N up to four vectors: classic control, Atari's 18 actions): W
// rows at a time, transposed into an (N, W) tile so that every vector op
// serves W rows. The per-row kernels would spend a short row's time in masked
// loads and horizontal reductions instead of arithmetic.
//
// Lanes never mix: a row's result depends on its own logits only, and tiles
// start at multiples of W, so results do not depend on the thread count.
// Include only from pg_cpu_kernel_impl.h.
#include "pg_cpu_tile_transpose.h"
#include "pg_cpu_rows.h"
#include "pg_cpu_vec.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace pgext {
namespace cpu {
namespace CPU_CAPABILITY {

template <typename acc_t>
constexpr int64_t kShortRowMax = 4 * Vectorized<acc_t>::size();

template <typename acc_t>
struct ShortTiles {
  static constexpr int64_t W = Vectorized<acc_t>::size();
  int64_t rows;
  int64_t n;
  int64_t count() const {
    return (rows + W - 1) / W;
  }
  int64_t grain() const {
    return std::max<int64_t>(1, kGrain / (W * n));
  }
};

// tile[j * W + i] = logit j of row r0 + i. A last, partial tile repeats its
// last row, so every lane holds real logits and nothing is read out of range.
template <typename scalar_t, typename acc_t>
inline void load_tile(const LogitRows<scalar_t>& x, int64_t r0, int64_t live, acc_t* tile) {
  constexpr int64_t W = Vectorized<acc_t>::size();
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, at::BFloat16> || std::is_same_v<scalar_t, float>) {
    static_assert(W == kTileRows);
  }
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (x.n >= 8) {
      load_bf16_tile(x, r0, live, tile);
      return;
    }
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    if (x.n >= 8) {
      load_float_tile(x, r0, live, tile);
      return;
    }
  }
#endif
  for (int64_t i = 0; i < W; ++i) {
    const scalar_t* row = x.row(r0 + std::min(i, live - 1));
    for (int64_t j = 0; j < x.n; ++j) {
      tile[j * W + i] = static_cast<acc_t>(row[j]);
    }
  }
}

// m, s and u (row_math.h) of the W rows of a tile, of their logits divided by
// the temperature (scale = 1 / T), as the per-row kernel computes them: a
// fully masked row gives (-inf, 0, 0), a row with a NaN gives NaN throughout.
template <typename acc_t>
struct TileStats {
  Vectorized<acc_t> m, s, u;
};

template <typename acc_t>
inline TileStats<acc_t> tile_stats(const acc_t* tile, int64_t n, const Vectorized<acc_t>& scale) {
  using V = Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  V m = V::loadu(tile);
  for (int64_t j = 1; j < n; ++j) {
    m = at::vec::maximum(m, V::loadu(tile + j * W));
  }
  m = m * scale;  // the max of the scaled logits (math::scaled_logit)
  // A fully masked row is shifted by 0, not by -inf: its logits then clamp to
  // the lowest finite value and add exactly 0 to s and u.
  const V zero(acc_t(0));
  const V neg_shift = V::blendv(m * V(acc_t(-1)), zero, m == V(math::neg_inf<acc_t>()));
  V s(zero), u(zero);
  for (int64_t j = 0; j < n; ++j) {
    const V d = scaled_shifted(V::loadu(tile + j * W), scale, neg_shift);
    const V e = vexp_bounded(d);  // d <= 0: x less the row's max
    s = s + e;
    u = at::vec::fmadd(e, d, u);
  }
  const V nan = m.isnan();
  return {m, V::blendv(s, m, nan), V::blendv(u, m, nan)};
}

// Loads every tile of W rows, computes its statistics and hands both to
// emit(r0, live, tile, stats), for rows [r0, r0 + live); tiles of different
// threads at once. The tile holds the logits as they are (not scaled).
template <typename scalar_t, typename Emit>
void for_each_tile_stats(const RowInputs& in, const Emit& emit) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t W = Vectorized<acc_t>::size();
  const LogitRows<scalar_t> x(in);
  const ShortTiles<acc_t> tiles{x.rows, x.n};
  const Vectorized<acc_t> scale(static_cast<acc_t>(in.inv_temperature));
  at::parallel_for(0, tiles.count(), tiles.grain(), [&](int64_t begin, int64_t end) {
    alignas(64) acc_t tile[kShortRowMax<acc_t> * W];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r0 = t * W;
      const int64_t live = std::min(W, x.rows - r0);
      load_tile(x, r0, live, tile);
      emit(r0, live, static_cast<const acc_t*>(tile), tile_stats(tile, x.n, scale));
    }
  });
}

template <typename scalar_t>
void forward_short_rows(const RowInputs& in, ForwardRows& out) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  const ForwardSink<acc_t> sink(in, out);
  const acc_t inv_t = static_cast<acc_t>(in.inv_temperature);
  for_each_tile_stats<scalar_t>(in, [&](int64_t r0, int64_t live, const acc_t* tile, const TileStats<acc_t>& st) {
    // finish_row, for W rows at once
    alignas(64) acc_t m[W];
    alignas(64) acc_t log_s[W];
    alignas(64) acc_t entropy[W];
    const V vlog_s = st.s.log();
    st.m.store(m);
    vlog_s.store(log_s);
    (vlog_s - st.u / st.s).store(entropy);
    for (int64_t i = 0; i < live; ++i) {
      const int64_t a = sink.column(r0 + i);
      sink.put(r0 + i, a >= 0 ? math::scaled_logit(tile[a * W + i], inv_t) : acc_t(0), m[i], log_s[i], entropy[i]);
    }
  });
}

template <typename scalar_t>
void row_stats_short_rows(const RowInputs& in, int64_t vocab_start, ShardRows& out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t W = Vectorized<acc_t>::size();
  const ShardSink<acc_t> sink(in, vocab_start, out);
  const acc_t inv_t = static_cast<acc_t>(in.inv_temperature);
  for_each_tile_stats<scalar_t>(in, [&](int64_t r0, int64_t live, const acc_t* tile, const TileStats<acc_t>& st) {
    alignas(64) acc_t m[W];
    alignas(64) acc_t s[W];
    alignas(64) acc_t u[W];
    st.m.store(m);
    st.s.store(s);
    st.u.store(u);
    for (int64_t i = 0; i < live; ++i) {
      const int64_t a = sink.action_column(r0 + i);
      sink.put(r0 + i, m[i], s[i], u[i], a >= 0 ? math::scaled_logit(tile[a * W + i], inv_t) : acc_t(0));
    }
  });
}

// Rows [0, live) of an (n, W) tile (tile[j * W + i] = column j of row i) to
// `live` rows of n at dst.
template <int64_t W, typename T>
inline void store_rows(const T* tile, int64_t live, int64_t n, T* dst) {
  for (int64_t i = 0; i < live; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      dst[i * n + j] = tile[j * W + i];
    }
  }
}

template <typename scalar_t>
void backward_short_rows(const RowInputs& in, const BackwardSource<at::opmath_type<scalar_t>>& src, at::Tensor& grad_logit) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  const LogitRows<scalar_t> x(in);
  scalar_t* out = grad_logit.mutable_data_ptr<scalar_t>();
  const int64_t n = x.n;
  const ShortTiles<acc_t> tiles{x.rows, n};
  const V vscale(static_cast<acc_t>(in.inv_temperature));

  at::parallel_for(0, tiles.count(), tiles.grain(), [&](int64_t begin, int64_t end) {
    // zeros beyond column n - 1 (see the bfloat16 column pairs)
    alignas(64) acc_t tile[kShortRowMax<acc_t> * W] = {};
    alignas(64) acc_t lse_hi[W];  // -hi
    alignas(64) acc_t lse_lo[W];
    alignas(64) acc_t k_lane[W];
    alignas(64) acc_t ce_lane[W];
    // c_policy at (action column, lane) and zero elsewhere: a column's
    // one-hot term is one subtraction of a loaded vector, where a compare
    // and a blend per column cost a bfloat16 (4096, 18) backward about 4 %
    // (53 against 51 ns a row). Only the W entries set for a tile are
    // cleared after it.
    alignas(64) acc_t one_hot[kShortRowMax<acc_t> * W] = {};
    int64_t hot[W];
#if defined(CPU_CAPABILITY_AVX2)
    // bfloat16 column pairs (store_bf16_tile), up to a whole group of 4
    // beyond the last: the ones never written stay zero
    alignas(64) uint32_t pairs[(kShortRowMax<acc_t> / 2 + 4) * W] = {};
#endif
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r0 = t * W;
      const int64_t live = std::min(W, x.rows - r0);
      for (int64_t i = 0; i < W; ++i) {
        const int64_t r = r0 + std::min(i, live - 1);
        const auto c = src.coef(r);
        const auto lse = src.row_lse(r);
        lse_hi[i] = -lse.hi;  // negated: scaled_shifted adds it
        lse_lo[i] = lse.lo;
        k_lane[i] = c.k;
        ce_lane[i] = c.c_entropy;
        // no entry where another shard holds the action
        const int64_t a = src.action_column(r);
        hot[i] = a >= 0 && a < n ? a * W + i : -1;
        if (hot[i] >= 0) {
          one_hot[hot[i]] = c.c_policy;
        }
      }
      // after the scalar writes above, so that they have left the store
      // buffer before the columns read them as vectors
      load_tile(x, r0, live, tile);
      const V vneg_hi = V::loadu(lse_hi);
      const V vlo = V::loadu(lse_lo);
      const V vk = V::loadu(k_lane);
      const V vce = V::loadu(ce_lane);
      const V zero(acc_t(0));
      // A tile none of whose rows has an entropy gradient (cE == 0: its
      // gradient None, PPO without an entropy bonus) takes the policy-only
      // forms below, which give such a row the very bits that the general
      // forms give it in a tile with other rows. Lanes past `live` repeat the
      // last row and so never spoil the test. One test of the W lanes: a
      // test per row in the loop above made a (4096, 2) backward 4 to 10 %
      // slower (AVX2 and AVX-512, one thread).
      constexpr int kAllLanes = (1 << W) - 1;
      const bool policy_only = vce.zero_mask() == kAllLanes;
      const auto column = [&](int64_t j) {
        const V tv = scaled_shifted(V::loadu(tile + j * W), vscale, vneg_hi, vlo);
        const V p = vexp(tv);
        const V g = policy_only ? grad_of_exp_policy_only(p, tv, vk, vce) : grad_of_exp(p, tv, vk, vce);
        return g - V::loadu(one_hot + j * W);
      };
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        for (int64_t j = 0; j < n; ++j) {
          column(j).store(tile + j * W);
        }
        store_rows<W>(static_cast<const acc_t*>(tile), live, n, out + r0 * n);
      } else {
        bool stored = false;
#if defined(CPU_CAPABILITY_AVX2)
        if constexpr (kBf16EvenOddRounding<scalar_t>) {
          static_assert(W == kTileRows);
          // Columns in pairs, their exponentials in turn (vexp_pair), in
          // backward_typed's factored form, rounded into one word per pair
          // and transposed out: (4096, 18) 52 -> 49 ns a row, one thread. For
          // an odd n the pair after the last column reads the tile's zeros
          // and is never stored.
          const auto factored_pairs = [&](const auto& grad_of) {  // grad_of(p, t)
            for (int64_t j = 0; j < n; j += 2) {
              const V t0 = scaled_shifted(V::loadu(tile + j * W), vscale, vneg_hi, vlo);
              const V t1 = scaled_shifted(V::loadu(tile + (j + 1) * W), vscale, vneg_hi, vlo);
              const auto [p0, p1] = vexp_pair(t0, t1);
              const V g0 = grad_of(p0, t0) - V::loadu(one_hot + j * W);
              const V g1 = grad_of(p1, t1) - V::loadu(one_hot + (j + 1) * W);
              const __m256i words = bf16_merge_rounded(g0, g1);
              _mm256_store_si256(reinterpret_cast<__m256i*>(pairs + (j / 2) * W), words);
            }
            store_bf16_tile(pairs, live, n, out + r0 * n);
          };
          // bf16_merge_rounded keeps a NaN a NaN only if its low 16 bits are
          // zero, as a logit's are: a tile with a NaN log-sum-exp (of any
          // payload) takes the path below, as all_factorable sends NaN k and
          // cE there (a NaN cP makes k NaN).
          if (n >= 8 && all_factorable(vk, vce) && (vneg_hi.isnan() | vlo.isnan()).zero_mask() == kAllLanes) {
            // With cE == 0, k - cE * t is k itself unless k is a zero: where
            // no lane's k is, p * (k - cE * t) is p * k, a product that meets
            // the one-hot term as the factored one does.
            if (policy_only && (vk == zero).zero_mask() == kAllLanes) {
              factored_pairs([&](const V& p, const V&) { return p * vk; });
            } else {
              factored_pairs([&](const V& p, const V& tv) { return grad_of_exp_factored(p, tv, vk, vce); });
            }
            stored = true;
          }
        }
#endif
        if (!stored) {
          // Rounded two columns at a time in registers: one at a time in the
          // copy below made a bfloat16 (64, 2) backward slower than float32's.
          alignas(64) scalar_t rounded[kShortRowMax<acc_t> * W];
          for (int64_t j = 0; j < n; j += 2) {
            round_pair<scalar_t>(column(j), j + 1 < n ? column(j + 1) : zero)
                .store(rounded + j * W, std::min<int64_t>(2, n - j) * W);
          }
          store_rows<W>(static_cast<const scalar_t*>(rounded), live, n, out + r0 * n);
        }
      }
      for (int64_t i = 0; i < W; ++i) {
        if (hot[i] >= 0) {
          one_hot[hot[i]] = acc_t(0);
        }
      }
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace pgext
