#pragma once
// A target pragma switches code generation but, in C++, leaves the ISA macros
// undefined, and the headers that follow (Sleef, at::vec) test those macros.
// Define what -mavx2 -mfma -mf16c would; include right after the pragma.
#ifndef __AVX2__
#define __SSE3__ 1
#define __SSSE3__ 1
#define __SSE4_1__ 1
#define __SSE4_2__ 1
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define __BMI__ 1
#define __BMI2__ 1
#endif
