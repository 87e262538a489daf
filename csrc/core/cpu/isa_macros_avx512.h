#pragma once
// What -mavx512f -mavx512bw -mavx512vl -mavx512dq would define, on top of
// isa_macros_avx2.h; see there. Include right after the target pragma.
#include "isa_macros_avx2.h"
#ifndef __AVX512F__
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#endif
