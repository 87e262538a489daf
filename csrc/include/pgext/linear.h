#pragma once
// The fused output layer (included by pgext/pgext.h): log_prob_entropy and
// pg_error on logits = (input @ linear_weight.T + linear_bias) / temperature,
// computed in class slices (and row tiles) so that the (tokens, V) logits and their
// gradient never exist. Python: pgext.linear_log_prob_entropy and
// pgext.linear_pg_error, the same dispatcher ops.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace pgext {

struct LinearOptions {
  // (V,) bias of the layer; differentiable.
  std::optional<at::Tensor> linear_bias = std::nullopt;
  // Divides the logits (finite, > 0).
  double temperature = 1.0;
  // linear_log_prob_entropy only: samples whose action equals it get 0 for
  // both outputs and no gradient, and are not range-checked.
  std::optional<int64_t> ignore_index = std::nullopt;
  // Classes per slice; nullopt: about 8 MiB of logits per slice (32 MiB on a GPU).
  std::optional<int64_t> chunk_size = std::nullopt;
};

// input (..., H), linear_weight (V, H) of input's dtype, integer action of
// shape input.shape[:-1]: log p(action) and the entropy, of action's shape
// (float32 for half types, float64 for float64), differentiable with respect
// to input, linear_weight and linear_bias for any upstream gradients.
PGEXT_API LogProbEntropy linear_log_prob_entropy(
    const at::Tensor& input, const at::Tensor& linear_weight, const at::Tensor& action,
    const LinearOptions& options = {});

struct LinearPgOptions {
  std::optional<at::Tensor> linear_bias = std::nullopt;
  // Per-sample weight (or mask), as PgOptions::weight.
  std::optional<at::Tensor> weight = std::nullopt;
  Reduction reduction = Reduction::Mean;
  double temperature = 1.0;
  std::optional<int64_t> chunk_size = std::nullopt;
};

// pg_error's losses on the fused layer; differentiable with respect to input,
// linear_weight, linear_bias, return_ and weight.
PGEXT_API PgLoss linear_pg_error(
    const at::Tensor& input, const at::Tensor& linear_weight, const at::Tensor& action, const at::Tensor& return_,
    const LinearPgOptions& options = {});

}  // namespace pgext
