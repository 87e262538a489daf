#pragma once
// PPO's value loss on per-sample values: what its kernels (ppo_value.cpp), its
// autograd (ppo_value_autograd.cpp) and the C++ losses share.
#include <ATen/core/Tensor.h>

#include <tuple>

namespace pgext {

// ppo_value_forward's results: the 0-d loss and each sample's
// d value_loss / d value_new.
using ValueForward = std::tuple<at::Tensor, at::Tensor>;

// ValueError / TypeError naming the offending argument: every tensor of
// value_new's shape and device, floating; clip_ratio finite and >= 0. weight
// may be undefined.
void check_value_inputs(
    const at::Tensor& value_new,
    const at::Tensor& value_old,
    const at::Tensor& return_,
    const at::Tensor& weight,
    double clip_ratio);

// Each sample's d value_loss / d value_new, with eager autograd's tie rules,
// as ATen ops on inputs of one dtype. The tie and clip masks are read from
// values without gradient; the rest is linear in value_new, so with a
// value_new that requires grad the result's own derivative is the loss's
// second. weight may be undefined.
at::Tensor value_gradient(
    const at::Tensor& value_new,
    const at::Tensor& value_old,
    const at::Tensor& return_,
    const at::Tensor& weight,
    double clip_ratio,
    bool use_value_clip);

// DI-engine's value loss as eager ATen ops, differentiable in every input
// (value_old, return_ and weight too): the fused op falls back to it where
// such a gradient or a tangent is asked for, and the losses use it for inputs
// of different (broadcast) shapes. weight may be undefined.
at::Tensor ppo_value_eager(
    const at::Tensor& value_new,
    const at::Tensor& value_old,
    const at::Tensor& return_,
    const at::Tensor& weight,
    double clip_ratio,
    bool use_value_clip);

}  // namespace pgext
