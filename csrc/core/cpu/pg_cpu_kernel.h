#pragma once
// The CPU kernels of pg_error. pg_cpu_kernel_impl.h is compiled once per CPU
// capability (kernel_default.cpp, kernel_avx2.cpp, kernel_avx512.cpp), each
// into its own namespace, and pg_cpu.cpp picks one at run time as ATen does;
// kernel_avx512_bf16.cpp adds a bfloat16-only build for CPUs with AVX512_BF16.
#include "../backend_ops.h"

namespace pgext {
namespace cpu {

// forward: actions are in [0, n). row_stats: the row holds classes
// [vocab_start, vocab_start + n); other actions read nothing.
// backward: grad_logit is (rows, n) contiguous in logit's dtype; the one-hot
// term applies where action - shard_vocab_start (0 without a shard) lies in
// [0, n).
using ForwardFn = void (*)(const RowInputs& in, ForwardRows& out);
using RowStatsFn = void (*)(const RowInputs& in, int64_t vocab_start, ShardRows& out);
using BackwardFn = void (*)(const RowInputs& in, const BackwardRows& rows, at::Tensor& grad_logit);

#define PGEXT_DECLARE_CPU_KERNELS(CAP)                  \
  namespace CAP {                                        \
  void forward(const RowInputs& in, ForwardRows& out);   \
  void row_stats(const RowInputs& in, int64_t vocab_start, ShardRows& out); \
  void backward(const RowInputs& in, const BackwardRows& rows, at::Tensor& grad_logit); \
  const char* name();                                    \
  }

// Name of the kernel build in use for logits of `dtype`: "DEFAULT", "AVX2",
// "AVX512", or "AVX512_BF16" (bfloat16 only).
const char* active_capability(at::ScalarType dtype);

PGEXT_DECLARE_CPU_KERNELS(DEFAULT)
#if defined(__x86_64__) || defined(_M_X64)
PGEXT_DECLARE_CPU_KERNELS(AVX2)
PGEXT_DECLARE_CPU_KERNELS(AVX512)
PGEXT_DECLARE_CPU_KERNELS(AVX512_BF16)
#endif

}  // namespace cpu
}  // namespace pgext
