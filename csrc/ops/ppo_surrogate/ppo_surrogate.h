#pragma once
// PPO's clipped surrogate on per-sample log-probabilities: what its kernels
// (ppo_surrogate.cpp), its autograd (ppo_surrogate_autograd.cpp) and the C++
// losses share.
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace pgext {

// ppo_surrogate_forward's results: the four of ppo_surrogate, then each
// sample's d policy_loss / d log_prob and d entropy_loss / d entropy.
using SurrogateForward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// ValueError / TypeError naming the offending argument: every tensor of
// log_prob's shape, dtype and device; clip_ratio >= 0, dual_clip > 1.
// weight may be undefined.
void check_surrogate_inputs(
    const at::Tensor& log_prob,
    const at::Tensor& old_log_prob,
    const at::Tensor& entropy,
    const at::Tensor& adv,
    const at::Tensor& weight,
    double clip_ratio,
    std::optional<double> dual_clip);

// d(clipped objective)/d(ratio) per sample, with eager autograd's tie rules,
// as ATen ops on values without gradient: piecewise constant in the
// log-probabilities, so the gradient's own derivative comes from the ratio
// it multiplies.
at::Tensor objective_slope(
    const at::Tensor& ratio, const at::Tensor& adv, double clip_ratio, std::optional<double> dual_clip);

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
