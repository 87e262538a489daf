#pragma once
// Vector helpers of the CPU kernels, compiled once per CPU capability: include
// only from pg_cpu_kernel_impl.h, after CPU_CAPABILITY is defined.
#include "../row_math.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace pgext {
namespace cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// Elements per parallel task, as at::internal::GRAIN_SIZE.
constexpr int64_t kGrain = 32768;

// Where `shifted` clamps: a masked logit (-inf) meets its zero probability as
// a finite number, so that 0 * (-inf) never turns into NaN. For float with
// the vexp below (kVexpFloor) it is -88, where exp leaves the normal range and
// vexp returns exactly 0, which its range reduction relies on. Elsewhere
// (double, and the portable build, whose exp_u20 is std::exp with denormal
// results) it is the lowest finite value, whose exp is exactly 0.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
template <typename acc_t>
constexpr bool kVexpFloor = std::is_same_v<acc_t, float>;
#else
template <typename acc_t>
constexpr bool kVexpFloor = false;
#endif

template <typename acc_t>
inline acc_t exp_floor() {
  if constexpr (kVexpFloor<acc_t>) {
    return -88.0f;
  }
  return math::lowest<acc_t>();
}

// x - shift, clamped from below at exp_floor(). One max instruction (the
// NaN-propagating at::vec::maximum costs four), and NaN still passes through.
template <typename acc_t>
inline Vectorized<acc_t> shifted(const Vectorized<acc_t>& x, const Vectorized<acc_t>& shift) {
  return at::vec::clamp_min(x - shift, Vectorized<acc_t>(exp_floor<acc_t>()));
}

// x - lse for lse = hi + lo (math::split_lse): backward's exponent, exact to
// one rounding whatever the logits' magnitude.
template <typename acc_t>
inline Vectorized<acc_t> shifted(const Vectorized<acc_t>& x, const Vectorized<acc_t>& hi, const Vectorized<acc_t>& lo) {
  return at::vec::clamp_min((x - hi) - lo, Vectorized<acc_t>(exp_floor<acc_t>()));
}

// The same two for logits divided by the temperature, x * scale (scale =
// 1 / T) in place of x, with the negated shift: one fused multiply-add where
// the subtraction was, so the temperature costs the hot loops nothing, and
// for scale = 1 the very same bits (x * 1 + (-shift) rounds as x - shift).
template <typename acc_t>
inline Vectorized<acc_t> scaled_shifted(
    const Vectorized<acc_t>& x, const Vectorized<acc_t>& scale, const Vectorized<acc_t>& neg_shift) {
  return at::vec::clamp_min(at::vec::fmadd(x, scale, neg_shift), Vectorized<acc_t>(exp_floor<acc_t>()));
}

template <typename acc_t>
inline Vectorized<acc_t> scaled_shifted(
    const Vectorized<acc_t>& x, const Vectorized<acc_t>& scale, const Vectorized<acc_t>& neg_hi,
    const Vectorized<acc_t>& lo) {
  return at::vec::clamp_min(at::vec::fmadd(x, scale, neg_hi) - lo, Vectorized<acc_t>(exp_floor<acc_t>()));
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// The constants of vexp and vexp_pair; the polynomial is at::vec's exp_u20's.
namespace vexp_const {
constexpr float kTop = 88.72283935546875f;           // ln(FLT_MAX)
constexpr float kMagic = 12583039.0f;                // 1.5 * 2^23 + 127
constexpr float kLog2e = 1.44269502162933349609375f;
constexpr float kLn2 = 0.693147182464599609375f;
constexpr float kC5 = 0.00828929059f, kC4 = 0.0418978221f, kC3 = 0.166676521f;
constexpr float kC2 = 0.499991506f, kC1 = 0.999999701f, kC0 = 1.0f;
}  // namespace vexp_const

// 2^n from z = t / ln 2 + kMagic (see vexp): n + 127 shifted into the
// exponent field.
inline Vectorized<float> exp2_of_magic(const Vectorized<float>& z) {
#if defined(CPU_CAPABILITY_AVX512)
  return Vectorized<float>(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(z), 23)));
#else
  return Vectorized<float>(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(z), 23)));
#endif
}
#endif

// Asks for the lines of next[i, i + kStep) (next_len logits) to be brought
// into L2 while the loop works on its block's logits [i, i + kStep): the
// block's loop is arithmetic on data in L1, which leaves memory idle unless
// the next block is requested during it; the hardware prefetcher runs only a
// few lines ahead. It took a third or more off a float32 forward at
// 2048 x 32000 and a quarter off its backward (2 threads, THP on, with the
// AVX2 kernels on Zen 3 and the AVX-512 ones on Zen 4).
template <typename scalar_t, int64_t kStep>
inline void prefetch_next(const scalar_t* next, int64_t i, int64_t next_len) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(scalar_t));
  if (i >= next_len) {
    return;
  }
  if constexpr (kStep >= kLine) {
    for (int64_t k = 0; k < kStep; k += kLine) {
      _mm_prefetch(reinterpret_cast<const char*>(next + i + k), _MM_HINT_T1);
    }
  } else if (i % kLine == 0) {
    _mm_prefetch(reinterpret_cast<const char*>(next + i), _MM_HINT_T1);
  }
#endif
}

// exp(t) for exp_floor<float>() <= t <= ln(FLT_MAX) (the forward's `shifted`
// logits: a logit less its block's or tile's max, so t <= 0), with the
// polynomial of at::vec's exp_u20 and so its accuracy, in 11 instructions
// rather than 19: with t bounded on both sides, the range reduction needs no
// masks. n = round(t / ln 2) comes from adding 1.5 * 2^23 + 127, which leaves
// n + 127 in the low mantissa bits, and shifting those bits up is 2^n. t <=
// -88 gives n + 127 = 0, so 2^n and the result are exactly 0. NaN stays NaN.
inline Vectorized<float> vexp_bounded(const Vectorized<float>& x) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  using V = Vectorized<float>;
  using namespace vexp_const;
  const V z = at::vec::fmadd(x, V(kLog2e), V(kMagic));
  const V r = at::vec::fnmadd(z - V(kMagic), V(kLn2), x);
  // The polynomial in Estrin's order: three dependent steps instead of
  // Horner's five. Backward waits on this latency (its loop holds too few
  // exponentials in flight to hide it): a bfloat16 backward at 4096 x 1000
  // went from 7.44 to 6.79 ms (AVX2, one thread). Results may differ from
  // Horner's in the last bit, not in accuracy.
  const V r2 = r * r;
  const V hi = at::vec::fmadd(V(kC5), r, V(kC4));
  const V mid = at::vec::fmadd(V(kC3), r, V(kC2));
  const V lo = at::vec::fmadd(V(kC1), r, V(kC0));
  const V q = at::vec::fmadd(at::vec::fmadd(hi, r2, mid), r2, lo);
  return q * exp2_of_magic(z);
#else
  return x.exp_u20();
#endif
}
inline Vectorized<double> vexp_bounded(const Vectorized<double>& x) {
  return x.exp();
}

// vexp_bounded for any t >= exp_floor<float>(), as backward's exponents: x
// less a log-sum-exp that the kernel is handed (a shard's gradient takes the
// merged one), so nothing here bounds it above. t above ln(FLT_MAX) is
// clamped there and gives inf, as exp_u20 does, where the shift into the
// exponent field would wrap.
inline Vectorized<float> vexp(const Vectorized<float>& t) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return vexp_bounded(at::vec::clamp_max(t, Vectorized<float>(vexp_const::kTop)));
#else
  return t.exp_u20();
#endif
}
inline Vectorized<double> vexp(const Vectorized<double>& x) {
  return x.exp();
}

// vexp of two vectors, their steps in turn, with the same bits as vexp. A CPU
// that splits each 256-bit operation in two (Zen 1) holds little more than
// one exponential's chain of dependent steps in its out-of-order window:
// written one after the other, the second chain mostly waits for the first.
// In turn they overlap: float32 backward at N = 1000 (AVX2, one thread) went
// from 1.21 to 1.10 ns per logit. The forward's sums measured no faster with
// it, and the bfloat16 backward slower (1.50 to 1.66 ns per logit; with its
// rounding, the pair's live values spill), so they keep vexp.
inline std::pair<Vectorized<float>, Vectorized<float>> vexp_pair(
    const Vectorized<float>& t0, const Vectorized<float>& t1) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  using V = Vectorized<float>;
  using namespace vexp_const;
  const V x0 = at::vec::clamp_max(t0, V(kTop));
  const V x1 = at::vec::clamp_max(t1, V(kTop));
  const V z0 = at::vec::fmadd(x0, V(kLog2e), V(kMagic));
  const V z1 = at::vec::fmadd(x1, V(kLog2e), V(kMagic));
  const V r0 = at::vec::fnmadd(z0 - V(kMagic), V(kLn2), x0);
  const V r1 = at::vec::fnmadd(z1 - V(kMagic), V(kLn2), x1);
  const V r2_0 = r0 * r0;
  const V r2_1 = r1 * r1;
  const V hi0 = at::vec::fmadd(V(kC5), r0, V(kC4));
  const V hi1 = at::vec::fmadd(V(kC5), r1, V(kC4));
  const V mid0 = at::vec::fmadd(V(kC3), r0, V(kC2));
  const V mid1 = at::vec::fmadd(V(kC3), r1, V(kC2));
  const V lo0 = at::vec::fmadd(V(kC1), r0, V(kC0));
  const V lo1 = at::vec::fmadd(V(kC1), r1, V(kC0));
  const V q0 = at::vec::fmadd(at::vec::fmadd(hi0, r2_0, mid0), r2_0, lo0);
  const V q1 = at::vec::fmadd(at::vec::fmadd(hi1, r2_1, mid1), r2_1, lo1);
  return {q0 * exp2_of_magic(z0), q1 * exp2_of_magic(z1)};
#else
  return {vexp(t0), vexp(t1)};
#endif
}
inline std::pair<Vectorized<double>, Vectorized<double>> vexp_pair(
    const Vectorized<double>& t0, const Vectorized<double>& t1) {
  return {vexp(t0), vexp(t1)};
}

// The largest |k| and |cE| (row_math.h) for which backward factors the
// gradient as p * (k - cE * t): |k| + 88 |cE| stays far below FLT_MAX.
constexpr double kFactoredMax = 1e36;

// Whether a row's gradient may be computed as p * (k - cE * t) (see
// backward_typed): only where t >= -88, so that the factor stays finite.
template <typename acc_t>
inline bool factorable(const math::RowGradCoef<acc_t>& c) {
  return kVexpFloor<acc_t> && std::abs(c.k) <= kFactoredMax && std::abs(c.c_entropy) <= kFactoredMax;
}

// The gradient of logits from p = exp(t) (row_math.h's grad_elem, without
// the one-hot term): p * k - cE * (p * t), exactly 0 wherever p is.
template <typename acc_t>
inline Vectorized<acc_t> grad_of_exp(
    const Vectorized<acc_t>& p, const Vectorized<acc_t>& t, const Vectorized<acc_t>& k,
    const Vectorized<acc_t>& c_entropy) {
  return at::vec::fnmadd(c_entropy, p * t, p * k);
}

// The same as p * (k - cE * t), one multiply fewer: only for factorable
// rows, where k - cE * t stays finite.
template <typename acc_t>
inline Vectorized<acc_t> grad_of_exp_factored(
    const Vectorized<acc_t>& p, const Vectorized<acc_t>& t, const Vectorized<acc_t>& k,
    const Vectorized<acc_t>& c_entropy) {
  return p * at::vec::fnmadd(c_entropy, t, k);
}

// grad_of_exp for lanes whose cE is zero (no upstream gradient of the
// entropy), bit for bit, one multiply fewer: cE * t in place of cE * (p * t),
// a zero of the same sign (p >= +0). p * k alone differs in two ways. The
// zero decides the sign of a zero result: p * k gives -0 where grad_of_exp
// gives +0 (p = 0, k < 0: the masked logits of a row with a negative
// advantage). And GCC contracts at::vec's plain vector operators: p * k less
// the one-hot term became one fused multiply-subtract, which rounds the
// action's entry otherwise (24 ulp apart in a test's row, AVX-512); here, as
// in grad_of_exp, p * k goes into an intrinsic that it cannot fuse with.
template <typename acc_t>
inline Vectorized<acc_t> grad_of_exp_policy_only(
    const Vectorized<acc_t>& p, const Vectorized<acc_t>& t, const Vectorized<acc_t>& k,
    const Vectorized<acc_t>& c_entropy) {
  return at::vec::fnmadd(c_entropy, t, p * k);
}

// factorable for W rows at once, their k and cE in lanes.
template <typename acc_t>
inline bool all_factorable(const Vectorized<acc_t>& k, const Vectorized<acc_t>& c_entropy) {
  if constexpr (kVexpFloor<acc_t>) {
    // at::vec::maximum keeps NaN, and NaN <= kFactoredMax is false
    const auto largest = at::vec::maximum(k.abs(), c_entropy.abs());
    return (largest <= Vectorized<acc_t>(static_cast<acc_t>(kFactoredMax))).zero_mask() == 0;
  }
  return false;
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// The 2W bfloat16 values at x as two float vectors, even-indexed values in
// the first and odd-indexed ones in the second. A bfloat16 is the top half of
// a float, so each vector is one shift or one mask of the loaded words, where
// the in-order conversion (at::vec::convert_to_float) takes five instructions,
// two of them across lanes. The order is not the logits': maxima and sums
// may ignore that, a gradient finds its logits with half_pair_slot.
#if defined(CPU_CAPABILITY_AVX512)
inline std::pair<Vectorized<float>, Vectorized<float>> bf16_even_odd(const __m512i& words) {
  return {Vectorized<float>(_mm512_castsi512_ps(_mm512_slli_epi32(words, 16))),
          Vectorized<float>(_mm512_castsi512_ps(_mm512_and_si512(words, _mm512_set1_epi32(~0xFFFF))))};
}
#else
inline std::pair<Vectorized<float>, Vectorized<float>> bf16_even_odd(const __m256i& words) {
  return {Vectorized<float>(_mm256_castsi256_ps(_mm256_slli_epi32(words, 16))),
          Vectorized<float>(_mm256_castsi256_ps(_mm256_and_si256(words, _mm256_set1_epi32(~0xFFFF))))};
}
#endif

inline std::pair<Vectorized<float>, Vectorized<float>> load_bf16_even_odd(const at::BFloat16* x) {
  return bf16_even_odd(Vectorized<at::BFloat16>::loadu(x));
}
#endif

// The backward pass of half types converts 2W logits to two float vectors,
// computes, and converts back: half_pair_load, half_pair_slot (where logit j
// of the 2W sits in the pair, first vector then second) and half_pair_store.
//
// bfloat16 is loaded in even/odd order (bf16_even_odd) by the AVX2 build and
// the AVX512_BF16 one. Rounding back:
//  - AVX512_BF16: one instruction rounds a pair, where at::vec takes about
//    sixteen; its output order asks for one word permute. The instruction
//    reads a denormal float as zero, so gradients below 2^-126 in magnitude
//    (float's smallest normal) come out as zero there.
//  - AVX2: at::vec's software rounding, but on the even/odd pair: an even
//    value's bfloat16 is the low half of its rounded lane, an odd value's the
//    high half, so the two vectors merge in order with one blend, where at::vec
//    packs and permutes across lanes. The same bits as at::vec, but for a
//    NaN, which stays a NaN without at::vec's test for it (see
//    bf16_rounded_high). Together with the even/odd load (two instructions
//    instead of six) that took a bfloat16 backward (AVX2, one thread) from
//    7.84 to 7.44 ms at 4096 x 1000 and from 383 to 338 us at 4096 x 18.
//  - the AVX512 build (CPUs without AVX512_BF16) and the portable one:
//    at::vec, in order.
enum class Bf16Rounding { kAtVec, kInstructions, kEvenOddSoftware };
#if defined(PGEXT_CPU_AVX512_BF16)
constexpr Bf16Rounding kBf16Rounding = Bf16Rounding::kInstructions;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr Bf16Rounding kBf16Rounding = Bf16Rounding::kEvenOddSoftware;
#else
constexpr Bf16Rounding kBf16Rounding = Bf16Rounding::kAtVec;
#endif
template <typename scalar_t>
constexpr bool kBf16Instructions =
    std::is_same_v<scalar_t, at::BFloat16> && kBf16Rounding == Bf16Rounding::kInstructions;
template <typename scalar_t>
constexpr bool kBf16EvenOddRounding =
    std::is_same_v<scalar_t, at::BFloat16> && kBf16Rounding == Bf16Rounding::kEvenOddSoftware;
template <typename scalar_t>
constexpr bool kHalfPairEvenOdd = kBf16Instructions<scalar_t> || kBf16EvenOddRounding<scalar_t>;

// The first `count` values at x (the rest read as zeros).
template <typename scalar_t>
inline std::pair<Vectorized<float>, Vectorized<float>> half_pair_load(
    const scalar_t* x, int64_t count = Vectorized<scalar_t>::size()) {
  const auto values = Vectorized<scalar_t>::loadu(x, count);
#if defined(PGEXT_CPU_AVX512_BF16) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (kHalfPairEvenOdd<scalar_t>) {
    return bf16_even_odd(values);
  } else
#endif
  {
    const auto [first, second] = at::vec::convert_to_float<scalar_t>(values);
    return {first, second};
  }
}

template <typename scalar_t>
inline int64_t half_pair_slot(int64_t j) {
  if constexpr (kHalfPairEvenOdd<scalar_t>) {
    return (j & 1) * Vectorized<float>::size() + (j >> 1);
  } else {
    return j;
  }
}

#if defined(CPU_CAPABILITY_AVX2)
// The float bits of v plus at::vec's round-to-nearest-even bias: the rounded
// bfloat16 is the high half. A NaN whose low 16 bits are zero stays the same
// NaN there (the bias cannot carry out of the low half), and every NaN of the
// backward kernels is one: a bfloat16 logit's or the default NaN (the
// per-row loop takes its coefficients with any NaN replaced by the default
// one, default_nan, and tiles with a NaN coefficient round with at::vec);
// arithmetic keeps an operand's NaN. So the kernels skip at::vec's test for
// NaN (with which a NaN rounds to 0xFFFF), two of the six instructions per
// vector.
inline __m256i bf16_rounded_high(const Vectorized<float>& v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  return _mm256_add_epi32(_mm256_add_epi32(bits, lsb), _mm256_set1_epi32(0x7fff));
}

// Each lane of `low` and `high` rounded to nearest even, the two bfloat16 in
// one 32-bit lane: `low`'s in the low half (first in memory).
inline __m256i bf16_merge_rounded(const Vectorized<float>& low, const Vectorized<float>& high) {
  const __m256i low_words = _mm256_srli_epi32(bf16_rounded_high(low), 16);
  return _mm256_blend_epi16(low_words, bf16_rounded_high(high), 0xAA);  // odd words: high's
}

// W bfloat16 values at x as one float vector, in order.
inline Vectorized<float> load_bf16_in_order(const at::BFloat16* x) {
  const __m128i words = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return Vectorized<float>(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(words), 16)));
}

// v rounded to nearest even (the bits of half_pair_store), stored at dst.
inline void store_bf16_in_order(const Vectorized<float>& v, at::BFloat16* dst) {
  const __m256i words = _mm256_srli_epi32(bf16_rounded_high(v), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), packed);
}
#endif

// [first..., second...] rounded to nearest even, in that order.
template <typename scalar_t>
inline Vectorized<scalar_t> round_pair(const Vectorized<float>& first, const Vectorized<float>& second) {
#if defined(PGEXT_CPU_AVX512_BF16)
  if constexpr (kBf16Instructions<scalar_t>) {
    return Vectorized<scalar_t>(reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(second, first)));
  } else
#endif
  {
    return at::vec::convert_from_float<scalar_t>(first, second);
  }
}

// Rounds to nearest even and stores the first `count` of the 2W values of a
// half_pair_load pair at dst.
template <typename scalar_t>
inline void half_pair_store(
    const Vectorized<float>& first, const Vectorized<float>& second, scalar_t* dst,
    int64_t count = Vectorized<scalar_t>::size()) {
#if defined(PGEXT_CPU_AVX512_BF16)
  if constexpr (kBf16Instructions<scalar_t>) {
    // [even..., odd...] to [even 0, odd 0, even 1, odd 1, ...]
    const __m512i interleave = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
        23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i packed = round_pair<scalar_t>(first, second);
    Vectorized<scalar_t>(_mm512_permutexvar_epi16(interleave, packed)).store(dst, count);
    return;
  }
#endif
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (kBf16EvenOddRounding<scalar_t>) {
    // an even logit's bfloat16 from `first`, the odd one after it from `second`
    Vectorized<scalar_t>(bf16_merge_rounded(first, second)).store(dst, count);
    return;
  }
#endif
  round_pair<scalar_t>(first, second).store(dst, count);
}

// Copies `nbytes` to memory that will not be read again soon (a gradient
// larger than the caches) with non-temporal stores: they skip the
// read-for-ownership of each destination line, a third of backward's memory
// traffic. Call stream_fence() before the data is handed to another thread.
inline void stream_copy(const void* src_v, int64_t nbytes, void* dst_v) {
  const char* src = static_cast<const char*>(src_v);
  char* dst = static_cast<char*>(dst_v);
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#if defined(CPU_CAPABILITY_AVX512)
  constexpr int64_t kLine = 64;
#else
  constexpr int64_t kLine = 32;
#endif
  const int64_t head = std::min<int64_t>(
      nbytes, (kLine - static_cast<int64_t>(reinterpret_cast<uintptr_t>(dst) % kLine)) % kLine);
  std::memcpy(dst, src, head);
  int64_t i = head;
  for (; i + kLine <= nbytes; i += kLine) {
#if defined(CPU_CAPABILITY_AVX512)
    _mm512_stream_si512(
        reinterpret_cast<__m512i*>(dst + i), _mm512_loadu_si512(reinterpret_cast<const void*>(src + i)));
#else
    _mm256_stream_si256(
        reinterpret_cast<__m256i*>(dst + i), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
#endif
  }
  std::memcpy(dst + i, src + i, nbytes - i);
#else
  std::memcpy(dst, src, nbytes);
#endif
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace pgext
