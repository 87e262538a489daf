// AVX-512 build of the CPU kernels, with the ISA ATen uses for its AVX512
// capability; see kernel_avx2.cpp for why the target is set by pragma.
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2"))), apply_to = function)
#elif defined(__GNUC__)
// GCC gives lambdas' function-pointer thunks no target attribute and warns
// about their vector ABI; at::vec passes lambdas as templates, never as
// function pointers, so those thunks are never called.
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 avx512fintrin.h
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2")
#endif
#include "isa_macros_avx512.h"
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "pg_cpu_kernel_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
