#pragma once
// PPO's clipped surrogate on per-sample log-probabilities (ppo_surrogate.cpp):
// the ATen forms shared by the op's kernels, its autograd and the C++ losses.
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace pgext {

// DI-engine's policy loss, entropy loss, approx_kl and clipfrac as eager ATen
// ops, differentiable in every input (old_log_prob, adv and weight too). The
// fused op falls back to it where such a gradient or a tangent is asked for,
// and the losses use it for several agents sharing one advantage (log_prob of
// shape (B, A) against adv of shape (B,)). weight may be undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ppo_surrogate_eager(
    const at::Tensor& log_prob,
    const at::Tensor& old_log_prob,
    const at::Tensor& entropy,
    const at::Tensor& adv,
    const at::Tensor& weight,
    double clip_ratio,
    std::optional<double> dual_clip);

}  // namespace pgext
