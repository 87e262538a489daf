// Autocast for pg_error: the op runs on its inputs as given, whatever the
// autocast dtype, like PyTorch's own losses keep their precision under
// autocast (they are never downcast to float16 / bfloat16).
//
// Why as given, rather than one of autocast's cast policies:
//  * no downcast ("lower_precision_fp"): pg_error is a log-softmax, an
//    entropy and a mean over a vocabulary; the kernels accumulate in float32
//    anyway, and casting float32 logits to bfloat16 would only add rounding
//    and a cast kernel that reads 4 and writes 2 bytes per logit, more memory
//    traffic than the op saves.
//  * no upcast ("fp32", what nll_loss and cross_entropy get): the kernels
//    already accumulate bfloat16 / float16 logits in float32, and the
//    gradient keeps the logits' dtype; an upcast would add a float32 copy of
//    the logits and a float32 gradient to cast back, about 4x the bytes moved
//    (24 instead of 6 per bfloat16 logit for forward + backward), for no
//    accuracy gain.
// The losses have the dtype of logit, return_ and weight promoted, as without
// autocast.
//
// The kernel excludes its autocast key and redispatches, as ATen's autocast
// wrappers do, so the ops pg_error calls (its forward and backward kernels)
// do not pass through autocast again. It is registered for CUDA and CPU and
// compiled into every build (CPU-only ones included).
#include "core/ops.h"

#include <c10/core/DispatchKey.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace pgext {
namespace {

template <c10::DispatchKey kAutocastKey>
std::tuple<at::Tensor, at::Tensor> pg_error_autocast(
    const at::Tensor& logit,
    const at::Tensor& action,
    const at::Tensor& ret,
    const std::optional<at::Tensor>& weight,
    c10::string_view reduction,
    double temperature) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(kAutocastKey);
  return ops::pg_error(logit, action, ret, weight, reduction, temperature);
}

}  // namespace

TORCH_LIBRARY_IMPL(pgext, AutocastCUDA, m) {
  m.impl("pg_error", &pg_error_autocast<c10::DispatchKey::AutocastCUDA>);
}

TORCH_LIBRARY_IMPL(pgext, AutocastCPU, m) {
  m.impl("pg_error", &pg_error_autocast<c10::DispatchKey::AutocastCPU>);
}

}  // namespace pgext
