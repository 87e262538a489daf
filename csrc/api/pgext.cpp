// pgext's public C++ API (include/pgext/pgext.h). Part of libpgext, which
// holds no Python: the calls go through the dispatcher op pgext::pg_error, so
// C++ callers get the same kernels, autograd and errors as Python's.
#include "core/ops.h"
#include "core/version.h"
#include "include/pgext/pgext.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <string>

#ifndef PGEXT_WITH_CUDA
#define PGEXT_WITH_CUDA 0
#endif

namespace pgext {

// From core/cpu/pg_cpu_kernel.h and core/checks.h, which cannot be included here:
// checks.h's internal Reduction enum is the public one's twin.
namespace cpu {
const char* active_capability(at::ScalarType dtype);
}  // namespace cpu
bool is_supported_float(at::ScalarType t);
[[noreturn]] void throw_action_out_of_range(const std::string& message);

namespace {
std::atomic<detail::ActionErrorHandler> action_error_handler{nullptr};
}  // namespace

void throw_action_out_of_range(const std::string& message) {
  if (const auto handler = action_error_handler.load()) {
    handler(message);  // throws
  }
  TORCH_CHECK_INDEX(false, message);
}

const char* reduction_name(Reduction reduction) {
  switch (reduction) {
    case Reduction::Mean:
      return "mean";
    case Reduction::Sum:
      return "sum";
    case Reduction::None:
      return "none";
  }
  TORCH_CHECK_VALUE(
      false, "pgext::pg_error: reduction must be Reduction::Mean, Sum or None, got the value ",
      static_cast<int64_t>(reduction));
}

PgLoss pg_error(const PgData& data, const PgOptions& options) {
  // Undefined tensors would reach the dispatcher with no key to dispatch on.
  TORCH_CHECK_VALUE(
      data.logit.defined() && data.action.defined() && data.return_.defined(),
      "pg_error: logit, action and return_ must be tensors");
  const char* reduction = reduction_name(options.reduction);
  // An empty optional and an optional holding an undefined tensor both mean
  // "no weight"; the op sees None either way.
  const std::optional<at::Tensor> weight =
      options.weight.has_value() && options.weight->defined() ? options.weight : std::nullopt;
  auto [policy_loss, entropy_loss] =
      ops::pg_error(data.logit, data.action, data.return_, weight, reduction, options.temperature);
  return {std::move(policy_loss), std::move(entropy_loss)};
}

LogProbEntropy log_prob_entropy(
    const at::Tensor& logit, const at::Tensor& action, const LogProbEntropyOptions& options) {
  TORCH_CHECK_VALUE(logit.defined() && action.defined(), "log_prob_entropy: logit and action must be tensors");
  auto [log_prob, entropy] = ops::log_prob_entropy(logit, action, options.ignore_index, options.temperature);
  return {std::move(log_prob), std::move(entropy)};
}

const char* version() {
  return PGEXT_VERSION;
}

bool cuda_compiled() {
  return PGEXT_WITH_CUDA != 0;
}

const char* cpu_capability(at::ScalarType logit_dtype) {
  TORCH_CHECK_TYPE(
      is_supported_float(logit_dtype),
      "pgext::cpu_capability: logits are float16, bfloat16, float32 or float64, got ", logit_dtype);
  return cpu::active_capability(logit_dtype);
}

namespace detail {
void set_action_error_handler(ActionErrorHandler handler) noexcept {
  action_error_handler.store(handler);
}

int64_t link_anchor() noexcept {
  return 1;
}
}  // namespace detail

}  // namespace pgext
