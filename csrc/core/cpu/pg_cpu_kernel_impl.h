// The CPU kernels of pg_error, compiled once per CPU capability: include only
// from kernel_<capability>.cpp, after CPU_CAPABILITY is defined.
//
// Rows are processed in cache blocks of kBlock logits. Forward takes each
// block's max, then its exp sums from cache (so memory is read once; half
// types are converted in registers, both times) while prefetching the
// thread's next block, and merges block statistics in block order. The order
// never depends on the thread count, so a row split across threads gives
// bitwise the same result as a row done by one thread.
#include "pg_cpu_kernel.h"
#include "pg_cpu_rows.h"
#include "pg_cpu_short_rows.h"
#include "pg_cpu_vec.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <tuple>
#include <vector>

// The logit dtypes of this build: kernel_avx512_bf16.cpp, the build for the
// AVX512_BF16 instructions, has bfloat16 only.
#if defined(PGEXT_CPU_AVX512_BF16)
#define PGEXT_DISPATCH_LOGIT_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
#else
#define PGEXT_DISPATCH_LOGIT_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)
#endif

namespace pgext {
namespace cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;
using math::RowStats;

// 4096 float32 logits = 16 KiB: the block stays in L1 between its two passes.
constexpr int64_t kBlock = 4096;
// Gradients at least this large are written with non-temporal stores: they
// cannot stay in the caches (L3: 32 MiB on the Zen 4, 8 MiB on the Zen 1)
// until anyone reads them.
constexpr int64_t kStreamMinBytes = int64_t(16) << 20;

// The logits as cache blocks in row-major order, block t = r * nblocks + b
// being block b of row r: the order in which both passes walk them, so that
// block t + 1 is what a thread reads next (prefetch_next).
template <typename scalar_t>
struct LogitBlocks {
  explicit LogitBlocks(const RowInputs& in) : logit(in), n(in.n), nblocks((in.n + kBlock - 1) / kBlock) {}
  int64_t count() const {
    return logit.rows * nblocks;
  }
  int64_t row(int64_t t) const {
    return t / nblocks;
  }
  int64_t start(int64_t t) const {
    return (t % nblocks) * kBlock;
  }
  const scalar_t* data(int64_t t) const {
    return logit.row(row(t)) + start(t);
  }
  int64_t len(int64_t t) const {
    return std::min(kBlock, n - start(t));
  }
  LogitRows<scalar_t> logit;
  int64_t n;
  int64_t nblocks;
};

// 2W logits at x as two vectors of the accumulation type, for the block
// statistics (maxima and sums, so bfloat16 may come in its cheaper even/odd
// order): half types are converted in registers, so that a block is never
// copied to a float buffer.
template <typename scalar_t>
inline auto load_pair(const scalar_t* x) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    return load_bf16_even_odd(x);
  } else
#endif
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return std::pair<V, V>(V::loadu(x), V::loadu(x + V::size()));
  } else {
    static_assert(Vectorized<scalar_t>::size() == 2 * V::size());
    auto [lo, hi] = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(x));
    return std::pair<V, V>(lo, hi);
  }
}

// The ragged end: `rest` (< 2W) logits at x, in order, padded with -inf so
// that the padding adds nothing to the sums. Masked loads: a scalar copy to a
// buffer was a fifth of a (4096, 40) forward.
template <typename scalar_t>
inline auto load_tail(const scalar_t* x, int64_t rest) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  const V neg_inf(math::neg_inf<acc_t>());
  const int64_t first = std::min(rest, W);
  const int64_t second = rest - first;
  V a, b;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    a = V::loadu(x, first);
    b = second > 0 ? V::loadu(x + W, second) : neg_inf;
  } else {
    std::tie(a, b) = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(x, rest));
  }
  return std::pair<V, V>(V::set(neg_inf, a, first), V::set(neg_inf, b, second));
}

// The statistics of the block's logits divided by the temperature (inv_t =
// 1 / T): the max of the unscaled logits, scaled (the same value, see
// math::scaled_logit), then the sums of x * inv_t - m. kScaled = false (T =
// 1) is the loop without the temperature: a fused multiply-add by 1 in place
// of the subtraction gives the same bits but took 5 to 10 % off a float32
// forward at 4096 x 1000 (AVX-512, one thread).
// `next` (next_len logits) is the block this thread reads next, prefetched
// during the sums (prefetch_next), or nullptr.
template <bool kScaled, typename scalar_t>
RowStats<at::opmath_type<scalar_t>> block_stats(const scalar_t* x, int64_t len, at::opmath_type<scalar_t> inv_t,
                                                const scalar_t* next, int64_t next_len) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  const int64_t full = len - len % (2 * W);
  const int64_t rest = len - full;
  const auto [tail0, tail1] = load_tail(x + full, rest);

  // One max instruction per vector (at::vec::maximum, which keeps NaN, costs
  // four): a NaN may be dropped here, but the sums below carry it to the
  // results. Only a block with no finite logit must look for it.
  const auto max_of = [](const V& a, const V& b) { return at::vec::clamp_min(a, b); };
  V vmax(math::neg_inf<acc_t>());
  for (int64_t i = 0; i < full; i += 2 * W) {
    const auto [a, b] = load_pair(x + i);
    vmax = max_of(vmax, max_of(a, b));
  }
  if (rest > 0) {
    vmax = max_of(vmax, max_of(tail0, tail1));
  }
  const acc_t m = math::scaled_logit(
      at::vec::vec_reduce_all<acc_t>([](V& a, V& b) { return at::vec::maximum(a, b); }, vmax), inv_t);
  if (m != m) {
    return {m, m, m};
  }
  if (m == math::neg_inf<acc_t>()) {
    for (int64_t j = 0; j < len; ++j) {
      const acc_t v = static_cast<acc_t>(x[j]);
      if (v != v) {
        return {v, v, v};
      }
    }
    return math::empty_stats<acc_t>();
  }

  // Two independent accumulator pairs keep the exp pipeline busy.
  const V vm(m);
  const V neg_m(-m);
  const V scale(inv_t);
  V s0(acc_t(0)), s1(acc_t(0)), u0(acc_t(0)), u1(acc_t(0));
  const auto add_to = [&](const V& x_acc, V& s, V& u) {
    V d;
    if constexpr (kScaled) {
      d = scaled_shifted(x_acc, scale, neg_m);
    } else {
      d = shifted(x_acc, vm);
    }
    const V e = vexp_bounded(d);  // d <= 0: x less the block's max
    s = s + e;
    u = at::vec::fmadd(e, d, u);
  };
  for (int64_t i = 0; i < full; i += 2 * W) {
    prefetch_next<scalar_t, 2 * W>(next, i, next_len);
    const auto [a, b] = load_pair(x + i);
    add_to(a, s0, u0);
    add_to(b, s1, u1);
  }
  // A whole vector left goes to the first pair, a partial one to the second.
  if (rest >= W) {
    add_to(tail0, s0, u0);
    if (rest > W) {
      add_to(tail1, s1, u1);
    }
  } else if (rest > 0) {
    add_to(tail0, s1, u1);
  }
  const auto add = [](V& a, V& b) { return a + b; };
  RowStats<acc_t> st;
  st.m = m;
  st.s = at::vec::vec_reduce_all<acc_t>(add, s0 + s1);
  st.u = at::vec::vec_reduce_all<acc_t>(add, u0 + u1);
  return st;
}

// Computes the statistics of every row, its blocks merged in block order, and
// hands them to emit(r, row, stats); emit may run on several threads at once
// (one row each).
template <typename scalar_t, typename Emit>
void for_each_row_stats(const RowInputs& in, const Emit& emit) {
  using acc_t = at::opmath_type<scalar_t>;
  const LogitBlocks<scalar_t> blocks(in);
  const int64_t rows = in.rows;
  const int64_t nblocks = blocks.nblocks;
  const acc_t inv_t = static_cast<acc_t>(in.inv_temperature);
  const auto row = [&](int64_t r) { return blocks.logit.row(r); };
  const auto stats_of_block = [&](int64_t t) {
    // the block after, this thread's next but at the end of its range
    const bool has_next = t + 1 < blocks.count();
    const scalar_t* next = has_next ? blocks.data(t + 1) : nullptr;
    const int64_t next_len = has_next ? blocks.len(t + 1) : 0;
    return inv_t == acc_t(1) ? block_stats<false>(blocks.data(t), blocks.len(t), inv_t, next, next_len)
                             : block_stats<true>(blocks.data(t), blocks.len(t), inv_t, next, next_len);
  };

  const bool split_rows = nblocks > 1 && rows < 4 * at::get_num_threads();
  if (!split_rows) {
    const int64_t grain = std::max<int64_t>(1, kGrain / blocks.n);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (const auto r : c10::irange(begin, end)) {
        // combine(empty, block) is exactly `block`: start from block 0.
        RowStats<acc_t> st = stats_of_block(r * nblocks);
        for (const auto b : c10::irange(1, nblocks)) {
          st = math::combine(st, stats_of_block(r * nblocks + b));
        }
        emit(r, row(r), st);
      }
    });
    return;
  }
  // Few long rows: block statistics in parallel, then the same ordered merge.
  std::vector<RowStats<acc_t>> partial(blocks.count());
  at::parallel_for(0, blocks.count(), 1, [&](int64_t begin, int64_t end) {
    for (const auto t : c10::irange(begin, end)) {
      partial[t] = stats_of_block(t);
    }
  });
  for (const auto r : c10::irange(rows)) {
    RowStats<acc_t> st = partial[r * nblocks];
    for (const auto b : c10::irange(1, nblocks)) {
      st = math::combine(st, partial[r * nblocks + b]);
    }
    emit(r, row(r), st);
  }
}

template <typename scalar_t>
void forward_typed(const RowInputs& in, ForwardRows& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const ForwardSink<acc_t> sink(in, out);
  const acc_t inv_t = static_cast<acc_t>(in.inv_temperature);
  for_each_row_stats<scalar_t>(in, [&](int64_t r, const scalar_t* row, RowStats<acc_t> st) {
    const auto res = math::finish_row(st);
    const int64_t a = sink.column(r);
    sink.put(r, a >= 0 ? math::scaled_logit(static_cast<acc_t>(row[a]), inv_t) : acc_t(0), st.m, res.log_s,
             res.entropy);
  });
}

template <typename scalar_t>
void row_stats_typed(const RowInputs& in, int64_t vocab_start, ShardRows& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const ShardSink<acc_t> sink(in, vocab_start, out);
  const acc_t inv_t = static_cast<acc_t>(in.inv_temperature);
  for_each_row_stats<scalar_t>(in, [&](int64_t r, const scalar_t* row, RowStats<acc_t> st) {
    const int64_t a = sink.action_column(r);
    sink.put(r, st.m, st.s, st.u, a >= 0 ? math::scaled_logit(static_cast<acc_t>(row[a]), inv_t) : acc_t(0));
  });
}

template <typename scalar_t>
void backward_typed(const RowInputs& in, const BackwardSource<at::opmath_type<scalar_t>>& src, at::Tensor& grad_logit) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;

  const LogitBlocks<scalar_t> blocks(in);
  const int64_t n = in.n;
  scalar_t* out = grad_logit.mutable_data_ptr<scalar_t>();

  // Gradients too large for the caches are streamed (pg_cpu_vec.h) from a
  // block buffer.
  const bool stream = in.rows * n * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamMinBytes;
  const int64_t tasks = blocks.count();
  const V vscale(static_cast<acc_t>(in.inv_temperature));
  const int64_t grain = std::max<int64_t>(1, kGrain / std::min(n, kBlock));
  // The whole loop once per case, so that without a temperature (kScaled
  // false) the loop is the one without the multiply, compiled as before.
  const auto run = [&](auto scaled_tag) {
    constexpr bool kScaled = decltype(scaled_tag)::value;
    at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> gbuf(!kConvert && stream ? kBlock : 0);
      std::vector<scalar_t> sbuf(kConvert && stream ? kBlock : 0);
      for (const auto t : c10::irange(begin, end)) {
        const int64_t r = blocks.row(t);
        const int64_t start = blocks.start(t);
        const int64_t len = blocks.len(t);
        const auto c = src.template coef<kBf16EvenOddRounding<scalar_t>>(r);
        const scalar_t* x = blocks.data(t);
        scalar_t* dst = out + r * n + start;
        const int64_t a = src.action_column(r) - start;  // the one-hot entry, if in [0, len)
        // this thread's next block, prefetched during this one (prefetch_next)
        const bool has_next = t + 1 < end;
        const scalar_t* next_x = has_next ? blocks.data(t + 1) : nullptr;
        const int64_t next_len = has_next ? blocks.len(t + 1) : 0;

        const auto lse = src.template row_lse<kBf16EvenOddRounding<scalar_t>>(r);
        const V vhi(lse.hi);
        const V vneg_hi(-lse.hi);
        const V vlo(lse.lo);
        const V vk(c.k);
        const V vce(c.c_entropy);
        const bool factored = factorable(c);
        // grad_vec(x): the gradient of a vector of logits; grad_pair(x0, x1):
        // of two, their exponentials in turn (vexp_pair).
        const auto row_block = [&](const auto& grad_vec, const auto& grad_pair) {
          // grad of `count` logits in acc_t at x_acc into g, the one-hot entry
          // (at column a) included
          const auto grad_run = [&](const acc_t* x_acc, int64_t count, acc_t* g) {
            const auto pair_at = [&](int64_t i0, int64_t i1) {
              const auto [g0, g1] = grad_pair(V::loadu(x_acc + i0), V::loadu(x_acc + i1));
              g0.store(g + i0);
              g1.store(g + i1);
            };
            int64_t i = 0;
            for (; i + 2 * W <= count; i += 2 * W) {
              prefetch_next<scalar_t, 2 * W>(next_x, i, next_len);
              pair_at(i, i + W);
            }
            // A ragged end is computed as the last W logits, overlapping the
            // vector before (those values are written again, the same bits):
            // at::vec's partial loads and stores go through a buffer and cost
            // more than a vector's arithmetic.
            const int64_t rest = count - i;
            if (rest > W) {
              pair_at(i, count - W);
            } else if (rest > 0 && count >= W) {
              grad_vec(V::loadu(x_acc + count - W)).store(g + count - W);
            } else if (rest > 0) {
              grad_vec(V::loadu(x_acc + i, rest)).store(g + i, rest);
            }
            if (a >= 0 && a < count) {
              g[a] -= c.c_policy;
            }
          };

          if constexpr (!kConvert) {
            acc_t* g = stream ? gbuf.data() : dst;
            grad_run(x, len, g);
            if (stream) {
              stream_copy(g, len * static_cast<int64_t>(sizeof(scalar_t)), dst);
            }
          } else {
            // Half types: convert, compute and convert back in registers, two
            // float vectors per half vector (pg_cpu_vec.h). A chunk is `count`
            // logits from column i; `one_hot` is the action's column within it,
            // or -1.
            using VS = Vectorized<scalar_t>;
            constexpr int64_t WS = VS::size();
            scalar_t* d = stream ? sbuf.data() : dst;
            const V lane_index = V::arange(acc_t(0), acc_t(1));
            const V zero(acc_t(0));
            const V vcp(c.c_policy);
            // g less c_policy in the lane numbered `lane` (if any): the one-hot
            // subtracted in registers, since a scalar write into a spilled
            // vector stalls its reload (store forwarding), about a row's time on
            // short rows. x - 0 is x, so the other lanes are unchanged.
            const auto less_policy_at = [&](const V& g, const V& lane) {
              return g - V::blendv(zero, vcp, lane_index == lane);
            };
            const auto chunk = [&](int64_t i, int64_t count, int64_t one_hot) {
              prefetch_next<scalar_t, WS>(next_x, i, next_len);
              auto [first, second] = half_pair_load(x + i, count);
              first = grad_vec(first);
              second = grad_vec(second);
              if (one_hot >= 0) {
                const V slot(static_cast<acc_t>(half_pair_slot<scalar_t>(one_hot)));
                first = less_policy_at(first, slot);
                second = less_policy_at(second, slot - V(acc_t(W)));
              }
              half_pair_store(first, second, d + i, count);
            };
            // Only the chunk that holds the action's entry blends it in; the
            // loops around it test nothing. The ragged end is one more chunk.
            const int64_t full = len - len % WS;
            const int64_t a_chunk = a >= 0 && a < full ? a - a % WS : full;
            for (int64_t i = 0; i < a_chunk; i += WS) {
              chunk(i, WS, -1);
            }
            if (a_chunk < full) {
              chunk(a_chunk, WS, a - a_chunk);
            }
            for (int64_t i = a_chunk + WS; i < full; i += WS) {
              chunk(i, WS, -1);
            }
            if (full < len) {
              bool done = false;
  #if defined(CPU_CAPABILITY_AVX2)
              if constexpr (kBf16EvenOddRounding<scalar_t>) {
                if (len - full <= W && len >= W) {
                  // A ragged end of at most W logits (18 = 16 + 2): the last W,
                  // in order, as one float vector, where a pair computes 2W.
                  // N = 18: 70 -> 64 ns a row; N = 40: 99 -> 87 (one thread).
                  const int64_t i = len - W;
                  V g = grad_vec(load_bf16_in_order(x + i));
                  if (a >= i && a < len) {
                    g = less_policy_at(g, V(static_cast<acc_t>(a - i)));
                  }
                  store_bf16_in_order(g, d + i);
                  done = true;
                }
              }
  #endif
              if (!done) {
                // From len >= WS on, the last WS logits, overlapping (see grad_run).
                const int64_t i = len >= WS ? len - WS : full;
                chunk(i, len - i, a >= i && a < len ? a - i : -1);
              }
            }
            if (stream) {
              stream_copy(d, len * static_cast<int64_t>(sizeof(scalar_t)), dst);
            }
          }
        };
        // p * k - cE * (p * t) (row_math.h) is exactly 0 wherever p is, whatever
        // the coefficients. p * (k - cE * t) has one multiply after the
        // exponential instead of two and an fnmadd, which took 13% off a float32
        // backward at 4096 x 1000 (AVX2, one thread; the loop waits on the
        // exponential's latency). It is exact at p = 0 too as long as k - cE * t
        // is finite: with t >= -88 (kVexpFloor), for coefficients up to
        // kFactoredMax.
        const auto with_grad = [&](const auto& grad_of, const auto& exponent) {  // grad_of(p, t)
          row_block(
              [&](const V& xv) {
                const V tv = exponent(xv);
                return grad_of(vexp(tv), tv);
              },
              [&](const V& x0, const V& x1) {
                const V t0 = exponent(x0);
                const V t1 = exponent(x1);
                const auto [p0, p1] = vexp_pair(t0, t1);
                return std::pair<V, V>(grad_of(p0, t0), grad_of(p1, t1));
              });
        };
        // t = x / T - lse: without a temperature, x - lse with no multiply
        const auto exponent = [&](const V& xv) {
          if constexpr (kScaled) {
            return scaled_shifted(xv, vscale, vneg_hi, vlo);
          } else {
            return shifted(xv, vhi, vlo);
          }
        };
        // A row whose entropy has no upstream gradient (cE == 0) skips the
        // entropy term: p * k, the value of both forms below.
        if (c.c_entropy == acc_t(0)) {
          with_grad([&](const V& p, const V&) { return p * vk; }, exponent);
        } else if (factored) {
          with_grad([&](const V& p, const V& tv) { return grad_of_exp_factored(p, tv, vk, vce); }, exponent);
        } else {
          with_grad([&](const V& p, const V& tv) { return grad_of_exp(p, tv, vk, vce); }, exponent);
        }
      }
      if (stream) {
        stream_fence();
      }
    });
  };
  if (in.inv_temperature != 1.0) {
    run(std::true_type{});
  } else {
    run(std::false_type{});
  }
}

template <typename scalar_t>
bool short_rows(const RowInputs& in) {
  return in.n <= kShortRowMax<at::opmath_type<scalar_t>>;
}

// Backward has no reduction to share across a tile, only the transposes to pay
// for, against the per-row loop's partial vectors. With AVX-512 those are
// masked instructions, and tiles win up to about half a vector (measured on
// Zen 4). Elsewhere at::vec copies a partial vector through a buffer, and
// tiles win for every row shorter than the per-row loop's step, one logit
// vector (AVX2 on Zen 1, one thread: float32 at N = 5 24 against 36 ns a row,
// bfloat16 at N = 8 38 against 50). bfloat16 tiles with AVX2 move in and out
// by vector transposes (pg_cpu_tile_transpose.h) and also win on rows with a
// ragged end, up to N = 28 (N = 18: 49 against 63 ns a row, N = 28: 68
// against 72); at N = 16, one whole chunk, and from N = 30 the per-row loop
// is faster (41 against 43 at N = 16, 70 against 73 at N = 32).
template <typename scalar_t>
bool short_rows_backward(const RowInputs& in) {
#if defined(CPU_CAPABILITY_AVX512)
  return in.n <= Vectorized<at::opmath_type<scalar_t>>::size() / 2;
#else
  constexpr int64_t kChunk = Vectorized<scalar_t>::size();
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (kBf16EvenOddRounding<scalar_t>) {
    return in.n <= 28 && in.n != kChunk;
  }
#endif
  return in.n < kChunk;
#endif
}

void forward(const RowInputs& in, ForwardRows& out) {
  PGEXT_DISPATCH_LOGIT_TYPES(in.logit.scalar_type(), "pg_error_forward_cpu", [&] {
    if (short_rows<scalar_t>(in)) {
      forward_short_rows<scalar_t>(in, out);
    } else {
      forward_typed<scalar_t>(in, out);
    }
  });
}

void row_stats(const RowInputs& in, int64_t vocab_start, ShardRows& out) {
  PGEXT_DISPATCH_LOGIT_TYPES(in.logit.scalar_type(), "pg_row_stats_cpu", [&] {
    if (short_rows<scalar_t>(in)) {
      row_stats_short_rows<scalar_t>(in, vocab_start, out);
    } else {
      row_stats_typed<scalar_t>(in, vocab_start, out);
    }
  });
}

void backward(const RowInputs& in, const BackwardRows& rows, at::Tensor& grad_logit) {
  PGEXT_DISPATCH_LOGIT_TYPES(in.logit.scalar_type(), "pg_error_backward_cpu", [&] {
    const BackwardSource<at::opmath_type<scalar_t>> src(in, rows);
    if (short_rows_backward<scalar_t>(in)) {
      backward_short_rows<scalar_t>(in, src, grad_logit);
    } else {
      backward_typed<scalar_t>(in, src, grad_logit);
    }
  });
}

const char* name() {
  return C10_STRINGIZE(CPU_CAPABILITY);
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace pgext
