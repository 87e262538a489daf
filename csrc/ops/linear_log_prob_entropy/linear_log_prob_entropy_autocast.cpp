// Autocast for the fused output layer: the layer's operands (input,
// linear_weight, linear_bias) are cast to the autocast dtype, as F.linear's
// are, so the fused head runs the GEMMs the unfused `lm_head(h)` would run
// under autocast, in the same precision. The loss part needs no policy: the
// row kernels accumulate half-type logits in float32 and the outputs are
// float32 either way. float64 operands are left as they are (autocast never
// casts them). The casts are autocast's cached ones, so a weight reused
// across calls in one autocast region is cast once.
//
// The kernel excludes its autocast key and redispatches, as ATen's autocast
// wrappers do. linear_pg_error needs no entry: it is composite over
// linear_log_prob_entropy, which autocast reaches from inside it.
#include "ops/linear_log_prob_entropy/linear_log_prob_entropy.h"

#include <ATen/autocast_mode.h>
#include <c10/core/DispatchKey.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace pgext {
namespace {

template <c10::DispatchKey kAutocastKey, c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor> linear_log_prob_entropy_autocast(
    const at::Tensor& input,
    const at::Tensor& linear_weight,
    const at::Tensor& action,
    const std::optional<at::Tensor>& linear_bias,
    double temperature,
    std::optional<int64_t> ignore_index,
    std::optional<int64_t> chunk_size) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(kAutocastKey);
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(kDevice);
  return ops::linear_log_prob_entropy(
      at::autocast::cached_cast(dtype, input, kDevice), at::autocast::cached_cast(dtype, linear_weight, kDevice),
      action, at::autocast::cached_cast(dtype, linear_bias, kDevice), temperature, ignore_index, chunk_size);
}

}  // namespace

TORCH_LIBRARY_IMPL(pgext, AutocastCUDA, m) {
  m.impl("linear_log_prob_entropy",
         &linear_log_prob_entropy_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>);
}

TORCH_LIBRARY_IMPL(pgext, AutocastCPU, m) {
  m.impl("linear_log_prob_entropy",
         &linear_log_prob_entropy_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>);
}

}  // namespace pgext
