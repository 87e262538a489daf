// AVX2+FMA build of the CPU kernels. The target is set for the whole
// translation unit before any header, which amounts to compiling it with
// -mavx2 -mfma -mf16c: the file then builds identically under setup.py, the
// JIT loader and CMake, none of which can give one source its own flags.
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,bmi,bmi2"))), apply_to = function)
#elif defined(__GNUC__)
// GCC gives lambdas' function-pointer thunks no target attribute and warns
// about their vector ABI; at::vec passes lambdas as templates, never as
// function pointers, so those thunks are never called.
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
#endif
#include "isa_macros_avx2.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "pg_cpu_kernel_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#endif
