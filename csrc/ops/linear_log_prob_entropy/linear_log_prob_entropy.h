#pragma once
// The output layer fused into log_prob_entropy: logits = (input @ W.T + b) / T
// are formed a tile (class slice x rows) at a time and never exist in full.
// Shared by the kernel ops (linear_log_prob_entropy_kernels.cpp), their Meta
// kernels and checks (linear_log_prob_entropy_meta.cpp), the autograd of the
// user op (linear_log_prob_entropy_autograd.cpp) and linear_pg_error.
#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

namespace pgext {

// Rows per chunk of the double-backward path (differentiable ATen ops, which
// need whole rows): the chunk's logits (rows x V in the input's dtype) take
// about this many bytes, never more than `rows` (at least 1).
constexpr int64_t kLinearChunkBytes = int64_t{128} << 20;
int64_t linear_chunk_rows(int64_t rows, int64_t V, at::ScalarType dtype);

// The tiling of the kernel ops' loops: class slices of `classes` classes
// (`chunk_size` when given, else `slice_bytes`' worth of logits of all the
// rows, at least kLinearMinSliceClasses), and row tiles of `rows` rows,
// fewer than all only when the rows are so many that a slice of
// kLinearMinSliceClasses classes would exceed the budget.
//
// On the CPU small slices stay in cache between the GEMM that forms them and
// the row kernel that reads them: at 1024 x 151936 (H = 896) slices of 8 to
// 64 MiB took the same time or more (docs/fused-head.md), and peak memory
// grows with the slice. On a GPU a slice costs about seven launches, tens of
// microseconds of host time, which an 8 MiB slice's GEMMs (about 10 us on an
// H100 in bfloat16) would not cover: the budget grows with the logits, a
// sixteenth of them (so that backward's two slices stay within an eighth),
// up to 32 MiB, which still fits the L2 cache of an A100 or H100. (Chosen on
// paper: no GPU has measured it; docs/fused-head.md.)
constexpr int64_t kLinearSliceBytes = int64_t{8} << 20;
constexpr int64_t kLinearSliceBytesGpuMax = int64_t{32} << 20;
constexpr int64_t kLinearMinSliceClasses = 256;

// The default slice budget for `rows` x `V` logits of `dtype` on `device`.
int64_t linear_slice_bytes(const c10::Device& device, int64_t rows, int64_t V, at::ScalarType dtype);

struct LinearTiles {
  int64_t rows = 1;
  int64_t classes = 1;
};

LinearTiles linear_tiles(
    std::optional<int64_t> chunk_size, int64_t rows, int64_t V, at::ScalarType dtype, int64_t slice_bytes);

// TypeError / ValueError naming the offending shape, dtype, device or
// option. Metadata only (sym sizes): the Meta kernels run it too.
void check_linear_inputs(
    const at::Tensor& input,
    const at::Tensor& linear_weight,
    const at::Tensor& action,
    const std::optional<at::Tensor>& linear_bias,
    double temperature,
    std::optional<int64_t> chunk_size);

// The extra inputs of the backward op: upstream gradients and saved per-row
// statistics, all of action's shape.
void check_linear_backward_inputs(
    const at::Tensor& grad_log_prob,
    const at::Tensor& grad_entropy,
    const at::Tensor& lse,
    const at::Tensor& entropy,
    const at::Tensor& action);

namespace ops {

std::tuple<at::Tensor, at::Tensor> linear_log_prob_entropy(
    const at::Tensor& input,
    const at::Tensor& linear_weight,
    const at::Tensor& action,
    const std::optional<at::Tensor>& linear_bias,
    double temperature,
    std::optional<int64_t> ignore_index,
    std::optional<int64_t> chunk_size);

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_log_prob_entropy_forward(
    const at::Tensor& input,
    const at::Tensor& linear_weight,
    const at::Tensor& action,
    const std::optional<at::Tensor>& linear_bias,
    double temperature,
    std::optional<int64_t> ignore_index,
    std::optional<int64_t> chunk_size);

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_log_prob_entropy_backward(
    const at::Tensor& grad_log_prob,
    const at::Tensor& grad_entropy,
    const at::Tensor& input,
    const at::Tensor& linear_weight,
    const at::Tensor& action,
    const std::optional<at::Tensor>& linear_bias,
    const at::Tensor& lse,
    const at::Tensor& entropy,
    double temperature,
    std::optional<int64_t> ignore_index,
    std::optional<int64_t> chunk_size,
    std::array<bool, 3> output_mask = {true, true, true});

std::tuple<at::Tensor, at::Tensor> linear_pg_error(
    const at::Tensor& input,
    const at::Tensor& linear_weight,
    const at::Tensor& action,
    const at::Tensor& ret,
    const std::optional<at::Tensor>& linear_bias,
    const std::optional<at::Tensor>& weight,
    c10::string_view reduction,
    double temperature,
    std::optional<int64_t> chunk_size);

}  // namespace ops
}  // namespace pgext
