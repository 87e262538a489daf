#pragma once
// Vector helpers of the CPU kernels, compiled once per CPU capability: include
// only from pg_cpu_kernel_impl.h, after CPU_CAPABILITY is defined.
#include "../pg_math.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace pgext {
namespace cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

inline Vectorized<float> vexp(const Vectorized<float>& x) {
  return x.exp_u20();
}
inline Vectorized<double> vexp(const Vectorized<double>& x) {
  return x.exp();
}

// x - shift, clamped to the lowest finite value so that a masked logit (-inf)
// meets its zero probability as a finite number. One max instruction (the
// NaN-propagating at::vec::maximum costs four), and NaN still passes through.
template <typename acc_t>
inline Vectorized<acc_t> shifted(const Vectorized<acc_t>& x, const Vectorized<acc_t>& shift) {
  return at::vec::clamp_min(x - shift, Vectorized<acc_t>(math::lowest<acc_t>()));
}

// The logits of one block in the accumulation type: a pointer into the row
// when no conversion is needed, else converted into `buf`.
template <typename scalar_t, typename acc_t>
inline const acc_t* load_block(const scalar_t* src, int64_t len, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    using VS = Vectorized<scalar_t>;
    using VF = Vectorized<float>;
    int64_t i = 0;
    for (; i + VS::size() <= len; i += VS::size()) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(VS::loadu(src + i));
      lo.store(buf + i);
      hi.store(buf + i + VF::size());
    }
    for (; i < len; ++i) {
      buf[i] = static_cast<float>(src[i]);
    }
    return buf;
  }
}

template <typename scalar_t>
inline void store_block(const float* src, int64_t len, scalar_t* dst) {
  using VS = Vectorized<scalar_t>;
  using VF = Vectorized<float>;
  int64_t i = 0;
  for (; i + VS::size() <= len; i += VS::size()) {
    at::vec::convert_from_float<scalar_t>(VF::loadu(src + i), VF::loadu(src + i + VF::size()))
        .store(dst + i);
  }
  for (; i < len; ++i) {
    dst[i] = static_cast<scalar_t>(src[i]);
  }
}

// A partial last vector, padded with -inf so it adds nothing to the sums.
template <typename acc_t>
inline Vectorized<acc_t> load_tail(const acc_t* x, int64_t count) {
  using V = Vectorized<acc_t>;
  return V::set(V(math::neg_inf<acc_t>()), V::loadu(x, count), count);
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
