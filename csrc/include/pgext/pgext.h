#pragma once
// pgext's C++ API: the policy-gradient loss and entropy bonus of a categorical
// policy in one fused op, for programs linking libtorch (no Python needed).
//
//   #include <pgext/pgext.h>
//
//   pgext::PgLoss loss = pgext::pg_error({logit, action, return_});
//   (loss.policy_loss - 0.01 * loss.entropy_loss).backward();  // fills logit.grad()
//
// pgext::pg_error calls the dispatcher op pgext::pg_error, the very op that
// Python's pgext.pg_error and torch.ops.pgext.pg_error call: same kernels
// (CPU, and CUDA when libpgext was built with them), same C++ autograd, same
// errors (c10::ValueError, c10::TypeError, c10::IndexError, all c10::Error).
//
// CMake:  find_package(pgext CONFIG REQUIRED)
//         target_link_libraries(app PRIVATE pgext::pgext)
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>

#if defined(_WIN32)
#if defined(PGEXT_BUILDING_LIBRARY)
#define PGEXT_API __declspec(dllexport)
#else
#define PGEXT_API __declspec(dllimport)
#endif
#else
#define PGEXT_API __attribute__((visibility("default")))
#endif

namespace pgext {

// The notebook's pg_data: logits (..., N) of any floating dtype, integer
// actions of shape logit.shape[:-1], and returns of the actions' shape or one
// that broadcasts to it without changing it (a (B, 1) return against (B, A)
// actions; gradients are summed back to the return's shape).
struct PgData {
  at::Tensor logit;
  at::Tensor action;
  at::Tensor return_;
};

// The notebook's pg_loss: policy_loss = -(return_ * log_prob(action)) and
// entropy_loss = entropy, each reduced (or per-sample for Reduction::None).
struct PgLoss {
  at::Tensor policy_loss;
  at::Tensor entropy_loss;
};

// How the per-sample terms are reduced. The values are those of the library's
// internal enum (csrc/core/checks.h); keep the two definitions token-identical.
enum class Reduction : int64_t { None = 0, Mean = 1, Sum = 2 };

// Options of pg_error. An aggregate, so C++20 designated initializers read
// like Python's keywords:  pgext::pg_error(data, {.weight = w, .reduction = pgext::Reduction::Sum})
struct PgOptions {
  // Per-sample weight (or mask) of the actions' shape (or broadcasting to it
  // as return_ does), multiplying each sample's policy and entropy terms.
  // Differentiable.
  std::optional<at::Tensor> weight = std::nullopt;
  Reduction reduction = Reduction::Mean;
  // Sampling temperature T (a finite number > 0): the losses of logit / T,
  // divided as the kernels read each logit (no scaled copy); gradients are
  // with respect to logit. c10::ValueError for any other value.
  double temperature = 1.0;
};

// Policy-gradient loss and entropy of a categorical policy; differentiable
// with respect to logit, return_ and weight. Throws c10::TypeError (dtypes),
// c10::ValueError (shapes, devices, options) and c10::IndexError (an action
// outside [0, N)).
PGEXT_API PgLoss pg_error(const PgData& data, const PgOptions& options = {});

// The per-sample log-probability of the action and entropy of a categorical
// policy, both of action's shape (float32 for half-type logits, float64 for
// float64), differentiable for any upstream gradients of either: what PPO,
// A2C and token-level GRPO losses are built from. pg_error's fused kernels
// (one pass forward, one backward), 12 bytes saved per sample.
struct LogProbEntropy {
  at::Tensor log_prob;
  at::Tensor entropy;
};

struct LogProbEntropyOptions {
  // Samples whose action equals it (LLM padding, -100 by convention) get
  // log_prob 0, entropy 0 and no gradient, and are not range-checked.
  std::optional<int64_t> ignore_index = std::nullopt;
  // Sampling temperature T (a finite number > 0): log_prob and entropy of
  // Categorical(logits=logit / T), without a scaled copy of the logits;
  // gradients are with respect to logit. c10::ValueError for any other value.
  double temperature = 1.0;
};

PGEXT_API LogProbEntropy log_prob_entropy(
    const at::Tensor& logit, const at::Tensor& action, const LogProbEntropyOptions& options = {});

// DI-engine's PPO and A2C losses (ding.rl_utils; Python: pgext.ppo_policy_error,
// pgext.ppo_error, pgext.a2c_error), on log_prob_entropy. Each sample's term
// is multiplied by weight (none: 1), then averaged; the dual clip (> 1)
// applies only where adv < 0; logit_old may be the old policy's per-sample
// log-probabilities (action's shape) instead of its logits. Differentiable
// with respect to the new logits and the values; the info is 0-d tensors (no
// host synchronization). Throws c10::ValueError for a dual clip <= 1, and,
// naming the argument, for shapes DI-engine's eager ops cannot combine and
// tensors on different devices (docs/losses.md), as the Python losses do.
struct PpoPolicyData {
  at::Tensor logit_new;
  at::Tensor logit_old;
  at::Tensor action;
  at::Tensor adv;
  std::optional<at::Tensor> weight = std::nullopt;
};

struct PpoData {
  at::Tensor logit_new;
  at::Tensor logit_old;
  at::Tensor action;
  at::Tensor value_new;
  at::Tensor value_old;
  at::Tensor adv;
  at::Tensor return_;
  std::optional<at::Tensor> weight = std::nullopt;
};

struct A2cData {
  at::Tensor logit;
  at::Tensor action;
  at::Tensor value;
  at::Tensor adv;
  at::Tensor return_;
  std::optional<at::Tensor> weight = std::nullopt;
};

struct PpoOptions {
  double clip_ratio = 0.2;
  std::optional<double> dual_clip = std::nullopt;
  bool use_value_clip = true;  // ppo_error only
};

struct PpoPolicyLoss {
  at::Tensor policy_loss;
  at::Tensor entropy_loss;
};

struct PpoLoss {
  at::Tensor policy_loss;
  at::Tensor value_loss;
  at::Tensor entropy_loss;
};

struct PpoInfo {
  at::Tensor approx_kl;
  at::Tensor clipfrac;
};

struct A2cLoss {
  at::Tensor policy_loss;
  at::Tensor value_loss;
  at::Tensor entropy_loss;
};

PGEXT_API std::pair<PpoPolicyLoss, PpoInfo> ppo_policy_error(const PpoPolicyData& data, const PpoOptions& options = {});
PGEXT_API std::pair<PpoLoss, PpoInfo> ppo_error(const PpoData& data, const PpoOptions& options = {});
PGEXT_API A2cLoss a2c_error(const A2cData& data);

// "mean", "sum" or "none": the reduction argument of the dispatcher op.
PGEXT_API const char* reduction_name(Reduction reduction);

// Build information of the libpgext that is loaded.
PGEXT_API const char* version();        // PGEXT_VERSION of the library, e.g. "0.1.0"
PGEXT_API bool cuda_compiled();         // were the CUDA kernels compiled in?
// The CPU kernel build used for logits of `logit_dtype`: DEFAULT, AVX2 or
// AVX512 (ATen's choice for this CPU), or AVX512_BF16 for bfloat16 logits
// where AVX512 is in use and the CPU has the AVX512_BF16 instructions.
PGEXT_API const char* cpu_capability(at::ScalarType logit_dtype = at::kFloat);

namespace detail {
// How an action outside [0, N) is reported: a c10::IndexError, unless a
// handler is set. pgext's Python module sets one that raises
// pgext.ActionOutOfRangeError (an IndexError and a ValueError) instead. The
// handler must throw; nullptr restores the default.
using ActionErrorHandler = void (*)(const std::string& message);
PGEXT_API void set_action_error_handler(ActionErrorHandler handler) noexcept;

// Defined in libpgext; does nothing but exist (returns 1).
PGEXT_API int64_t link_anchor() noexcept;

// Why this exists: the ops are registered by static initializers inside
// libpgext (TORCH_LIBRARY). A program that reaches them only through the
// dispatcher (torch::jit::load of a scripted module, torch.ops) references no
// symbol of libpgext, so a linker running with --as-needed (the default of
// many distributions' GCC) drops it from DT_NEEDED, the library never loads
// and the op is "not found" at run time. Every translation unit including
// this header defines this inline variable, whose dynamic initializer calls
// an exported function of libpgext: the reference is in the object file
// whatever the linker flags or the build system (CMake or not), and the
// library is loaded, its registrations run, before main(). An
// INTERFACE_LINK_OPTIONS "-Wl,--no-as-needed" on the CMake target would only
// help CMake users, and only where the option lands before libpgext on the
// link line; this does not depend on either.
[[maybe_unused]] inline const int64_t library_loaded = link_anchor();
}  // namespace detail

}  // namespace pgext

// The fused output layer: pgext::linear_log_prob_entropy, pgext::linear_pg_error.
#include "linear.h"
