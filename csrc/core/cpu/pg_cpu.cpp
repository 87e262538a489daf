// CPU backend of pgext's ops: the run-time choice of the kernel build for this
// CPU, the host-side action check and the deterministic batch reduction; the
// host side shared with CUDA is in backend_ops.h.
#include "../checks.h"
#include "../row_math.h"
#include "pg_cpu_alloc.h"
#include "pg_cpu_kernel.h"

#include <ATen/Dispatch.h>
#include <ATen/Version.h>
#include <torch/library.h>

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#include <cpuid.h>
#endif

#include <cstdint>
#include <string>

namespace pgext {
namespace cpu {

namespace {

struct KernelSet {
  ForwardFn forward;
  RowStatsFn row_stats;
  BackwardFn backward;
  const char* (*name)();
};

// ATen's own choice (CPU features, capped by ATEN_CPU_CAPABILITY), as the
// string torch.backends.cpu.get_cpu_capability() reports; the enum-valued
// at::native::get_cpu_capability() is not exported from libtorch_cpu.
KernelSet select_kernels() {
#if defined(__x86_64__) || defined(_M_X64)
  const std::string cap = at::get_cpu_capability();
  if (cap.rfind("AVX512", 0) == 0) {
    return {&AVX512::forward, &AVX512::row_stats, &AVX512::backward, &AVX512::name};
  }
  if (cap.rfind("AVX2", 0) == 0) {
    return {&AVX2::forward, &AVX2::row_stats, &AVX2::backward, &AVX2::name};
  }
#endif
  return {&DEFAULT::forward, &DEFAULT::row_stats, &DEFAULT::backward, &DEFAULT::name};
}

// CPUID leaf 7, sub-leaf 1, EAX bit 5. ATen's AVX512 capability (what makes
// the AVX512 build the choice) already includes the OS's save of the AVX-512
// registers.
bool cpu_has_avx512_bf16() {
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) != 0 && ((eax >> 5) & 1) != 0;
#else
  return false;
#endif
}

// ATen reads the capability (and ATEN_CPU_CAPABILITY) once per process too.
const KernelSet& kernels() {
  static const KernelSet set = select_kernels();
  return set;
}

// bfloat16 logits: the AVX512_BF16 build where the AVX512 one is in use and
// the CPU has the instructions.
const KernelSet& bf16_kernels() {
  static const KernelSet set = [] {
#if defined(__x86_64__) || defined(_M_X64)
    if (kernels().name == &AVX512::name && cpu_has_avx512_bf16()) {
      return KernelSet{&AVX512_BF16::forward, &AVX512_BF16::row_stats, &AVX512_BF16::backward, &AVX512_BF16::name};
    }
#endif
    return kernels();
  }();
  return set;
}

const KernelSet& kernels(at::ScalarType dtype) {
  return dtype == at::kBFloat16 ? bf16_kernels() : kernels();
}

// Whether sample r has weight 0: its action is neither checked nor read
// (padding may carry any action, e.g. -100).
template <typename w_t>
bool zero_weight(const w_t* w, int64_t r) {
  return w != nullptr && w[r] == w_t(0);
}

// Checked before any kernel reads a logit, so an out-of-range action can never
// address memory outside its row.
void check_actions(const RowInputs& in) {
  const int64_t* a = in.action.const_data_ptr<int64_t>();
  const bool is_double = in.weight.defined() && in.weight.scalar_type() == at::kDouble;
  const float* wf = in.weight.defined() && !is_double ? in.weight.const_data_ptr<float>() : nullptr;
  const double* wd = is_double ? in.weight.const_data_ptr<double>() : nullptr;
  for (int64_t r = 0; r < in.rows; ++r) {
    if (C10_UNLIKELY(a[r] < 0 || a[r] >= in.n) && !zero_weight(wf, r) && !zero_weight(wd, r)) {
      // the value the caller passed, not its int64 conversion
      const bool wrapped = in.action_dtype == at::kUInt64 && a[r] < 0;
      throw_action_out_of_range(c10::str(
          user_op_name(), ": action ", wrapped ? std::to_string(static_cast<uint64_t>(a[r])) : std::to_string(a[r]),
          " (sample ", r, ") is out of range for N = ", in.n, " classes; expected 0 <= action < ", in.n));
    }
  }
}

// Sums per-sample terms in float64 in a fixed order: sample i goes to partial
// sum i % kLanes, and the partial sums are added pairwise at the end. The
// result depends neither on the thread count nor on how rows were split, and
// the adds of a lane do not wait on the other lanes' (one running sum made
// this loop a fifth of a (256, 2) forward).
template <typename scalar_t>
double ordered_sum_typed(const scalar_t* p, int64_t n) {
  constexpr int64_t kLanes = 8;
  double lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      lane[k] += static_cast<double>(p[i + k]);
    }
  }
  for (int64_t k = 0; i < n; ++i, ++k) {
    lane[k] += static_cast<double>(p[i]);
  }
  for (int64_t width = kLanes / 2; width > 0; width /= 2) {
    for (int64_t k = 0; k < width; ++k) {
      lane[k] += lane[k + width];
    }
  }
  return lane[0];
}

double ordered_sum(const at::Tensor& rows) {
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "pg_error_sum", [&] {
    total = ordered_sum_typed(rows.const_data_ptr<scalar_t>(), rows.numel());
  });
  return total;
}

at::Tensor reduce_rows(const at::Tensor& rows, Reduction red, at::IntArrayRef shape, at::ScalarType dtype) {
  if (red == Reduction::None) {
    return rows.view(shape).to(dtype);
  }
  double total = ordered_sum(rows);
  if (red == Reduction::Mean) {
    total /= static_cast<double>(rows.numel());  // 0 / 0 = NaN: the mean of an empty batch
  }
  // Written in place rather than by at::scalar_tensor, whose dispatched fill
  // costs as much as a small batch's kernel.
  at::Tensor loss = empty_cpu({}, rows.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "pg_error_loss", [&] {
    *loss.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(total);
  });
  return loss;
}

// A few float64 operations per row, for rows of one tile: one thread.
void merge_row_stats(ShardRows& running, const ShardRows& part) {
  double* m = running.max.mutable_data_ptr<double>();
  double* s = running.sum_exp.mutable_data_ptr<double>();
  double* u = running.shifted_sum.mutable_data_ptr<double>();
  double* xa = running.action_logit.mutable_data_ptr<double>();
  const int64_t rows = running.max.numel();
  AT_DISPATCH_FLOATING_TYPES(part.max.scalar_type(), "pg_merge_row_stats_", [&] {
    const scalar_t* pm = part.max.const_data_ptr<scalar_t>();
    const scalar_t* ps = part.sum_exp.const_data_ptr<scalar_t>();
    const scalar_t* pu = part.shifted_sum.const_data_ptr<scalar_t>();
    const scalar_t* pxa = part.action_logit.const_data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; ++r) {
      math::merge_part(m[r], s[r], u[r], xa[r], pm[r], ps[r], pu[r], pxa[r]);
    }
  });
}

// The CPU backend of BackendOps (backend_ops.h).
struct CpuBackend {
  struct Guard {
    explicit Guard(const c10::Device&) {}
  };

  static void check_actions(const RowInputs& in) {
    cpu::check_actions(in);
  }

  static void forward(const RowInputs& in, ForwardRows& out) {
    kernels(in.logit.scalar_type()).forward(in, out);
  }

  static void row_stats(const RowInputs& in, int64_t vocab_start, ShardRows& out) {
    kernels(in.logit.scalar_type()).row_stats(in, vocab_start, out);
  }

  static void backward(const RowInputs& in, const BackwardRows& rows, at::Tensor& grad_logit) {
    kernels(in.logit.scalar_type()).backward(in, rows, grad_logit);
  }

  static void merge_row_stats(ShardRows& running, const ShardRows& part) {
    cpu::merge_row_stats(running, part);
  }

  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return empty_cpu(sizes, options);
  }

  static at::Tensor empty_logit_sized(int64_t rows, int64_t n, const at::TensorOptions& options) {
    return cpu::empty_logit_sized(rows, n, options);
  }

  // A 0-d gradient of a floating dtype stays as it is: BackwardSource reads
  // its one value on the host, where converting it to a float tensor would
  // cost an allocation per loss (a bfloat16 loss's gradient is bfloat16).
  static at::Tensor upstream_grad(const at::Tensor& grad, int64_t rows, at::ScalarType acc) {
    if (grad.dim() == 0 && at::isFloatingType(grad.scalar_type())) {
      return grad;
    }
    return rows_of_grad(grad, rows, acc);
  }

  static std::pair<at::Tensor, at::Tensor> reduce(
      const at::Tensor& policy,
      const at::Tensor& entropy_weighted,
      Reduction red,
      at::IntArrayRef shape,
      at::ScalarType dtype) {
    return {reduce_rows(policy, red, shape, dtype), reduce_rows(entropy_weighted, red, shape, dtype)};
  }
};

}  // namespace

const char* active_capability(at::ScalarType dtype) {
  return kernels(dtype).name();
}

TORCH_LIBRARY_IMPL(pgext, CPU, m) {
  PGEXT_REGISTER_BACKEND_OPS(m, CpuBackend);
}

}  // namespace cpu
}  // namespace pgext
