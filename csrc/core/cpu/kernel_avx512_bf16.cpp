// The AVX-512 kernels again, for bfloat16 logits only, with the AVX512_BF16
// instructions (one instruction rounds two float vectors to bfloat16). ATen's
// AVX512 capability does not include them, so pg_cpu.cpp picks this build by
// CPUID; see kernel_avx2.cpp for why the target is set by pragma.
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,bmi,bmi2"))), apply_to = function)
#elif defined(__GNUC__)
// See kernel_avx512.cpp.
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,bmi,bmi2")
#endif
#include "isa_macros_avx512.h"
#define CPU_CAPABILITY AVX512_BF16
#define CPU_CAPABILITY_AVX512
#define PGEXT_CPU_AVX512_BF16
#include "pg_cpu_kernel_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
