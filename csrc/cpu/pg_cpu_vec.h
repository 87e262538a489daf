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

// Elements per parallel task, as at::internal::GRAIN_SIZE.
constexpr int64_t kGrain = 32768;

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
