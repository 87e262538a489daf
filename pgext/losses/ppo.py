"""PPO's clipped surrogate for categorical policies, with DI-engine's API.

``ppo_policy_error``, ``ppo_value_error`` and ``ppo_error`` take and return
``ding.rl_utils``' namedtuples (exported by ``pgext``) with its argument names,
defaults and semantics: each sample's term is multiplied by ``weight``, then
averaged; the dual clip applies only where ``adv < 0``; the value loss is
clipped around ``value_old`` with the same ratio. The log-probabilities and
the entropy come from ``log_prob_entropy`` (one fused pass over the logits
forward, one backward), never from ``Categorical``'s logit-sized
intermediates.

Two differences, both for speed on GPUs and large vocabularies:

- ``ppo_info``'s ``approx_kl`` and ``clipfrac`` are 0-d tensors, not Python
  floats: ``.item()`` on CUDA would wait for the GPU every step. Call
  ``float(info.approx_kl)`` where a number is needed.
- ``logit_old`` may be the old policy's per-sample log-probabilities (the
  actions' shape, what LLM RL stores) instead of its logits (one more
  dimension, the classes). Old logits are read once, without gradient.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from .._args import broadcasts, require_broadcast, require_device, require_float_result, require_tensors
from ..ops.primitive import log_prob_entropy
from ..reference import eager_surrogate, eager_value
from .._types import ppo_data, ppo_info, ppo_loss, ppo_policy_data, ppo_policy_loss, ppo_value_data

__all__ = ["ppo_policy_error", "ppo_value_error", "ppo_error"]


def old_log_prob(logit_old: torch.Tensor, action: torch.Tensor, logit_new: torch.Tensor) -> torch.Tensor:
    """The old policy's log-probability of each action, without gradient:
    ``logit_old`` itself when it has the actions' shape (stored
    log-probabilities), else from the old logits ``(..., N)``."""
    require_device("ppo", ("logit_new", logit_new), (("logit_old", logit_old),))
    if logit_old.dim() == action.dim():
        if logit_old.shape != action.shape:
            raise ValueError(f"ppo: old log-probabilities must have the actions' shape {tuple(action.shape)}, got "
                             f"{tuple(logit_old.shape)}")
        return logit_old.detach()
    with torch.no_grad():
        return log_prob_entropy(logit_old, action)[0]


def _check_dual_clip(dual_clip: Optional[float]) -> None:
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"ppo: dual_clip must be greater than 1.0 (or None), got {dual_clip}")


def _require_policy_tensors(op: str, logit_new, logit_old, action, adv, weight) -> None:
    require_tensors(op, (("logit_new", logit_new), ("logit_old", logit_old), ("action", action), ("adv", adv)),
                    (("weight", weight),))


def ppo_policy_error(data: ppo_policy_data, clip_ratio: float = 0.2,
                     dual_clip: Optional[float] = None) -> Tuple[ppo_policy_loss, ppo_info]:
    """PPO's clipped policy loss and entropy bonus (arXiv:1707.06347), with the
    dual clip of arXiv:1912.09729 where ``dual_clip`` is given.

    Args:
        data: ``ppo_policy_data(logit_new, logit_old, action, adv, weight)``:
            logits ``(B, N)`` (any leading dims), integer actions ``(B,)``,
            advantages and weights ``(B,)`` (``weight`` may be None).
            ``logit_old`` may be old log-probabilities of the actions' shape.
            Multi-agent data as in DI-engine: ``(B, A, N)`` logits with a
            ``(B,)`` advantage average the ratio and entropy over the agents.
        clip_ratio: the ratio's clip, ``[1 - clip_ratio, 1 + clip_ratio]``.
        dual_clip: the dual clip's ``c > 1``, or None.

    Returns:
        ``(ppo_policy_loss(policy_loss, entropy_loss), ppo_info(approx_kl, clipfrac))``,
        all 0-d tensors; the losses are differentiable.

    Raises:
        TypeError: a field that is not a tensor (``weight`` may be None).
        ValueError: shapes that DI-engine's surrogate cannot combine, or
            tensors on different devices.
    """
    _check_dual_clip(dual_clip)
    logit_new, logit_old, action, adv, weight = data
    _require_policy_tensors("ppo_policy_error", logit_new, logit_old, action, adv, weight)
    return _policy(logit_new, logit_old, action, adv, weight, clip_ratio, dual_clip)


def _policy(logit_new, logit_old, action, adv, weight, clip_ratio, dual_clip) -> Tuple[ppo_policy_loss, ppo_info]:
    logp_new, entropy = log_prob_entropy(logit_new, action)
    return clipped_surrogate(logp_new, old_log_prob(logit_old, action, logit_new), entropy, adv, weight, clip_ratio,
                             dual_clip)


def _require_surrogate_shapes(logp_new: torch.Tensor, adv: torch.Tensor, weight: Optional[torch.Tensor]) -> None:
    """ValueError, naming the shapes, where DI-engine's eager surrogate would
    fail on them. The entropy keeps the actions' shape where the weight (the
    advantage when there is none) has it, the ratio where the advantage has
    it; otherwise each loses dim 1, the agents' (averaged over). What results
    must broadcast with the advantage and the weight."""
    shape = logp_new.shape
    weight_shape = adv.shape if weight is None else weight.shape
    agents = shape[:1] + shape[2:] if len(shape) >= 2 else None
    entropy = shape if shape == weight_shape else agents
    ratio = shape if shape == adv.shape else agents
    # None: no dim 1 to average over
    if entropy is None or ratio is None or not (
            broadcasts(entropy, weight_shape) and broadcasts(ratio, adv.shape, weight_shape)):
        given = f"adv {tuple(adv.shape)}" + ("" if weight is None else f" and weight {tuple(weight_shape)}")
        shared = "" if agents is None else (
            f", or broadcast with {tuple(agents)}, that shape without dim 1, where several agents share them")
        raise ValueError(f"ppo: {given} must have the actions' shape {tuple(shape)}{shared}")


def clipped_surrogate(logp_new: torch.Tensor, logp_old: torch.Tensor, entropy: torch.Tensor, adv: torch.Tensor,
                      weight: Optional[torch.Tensor], clip_ratio: float,
                      dual_clip: Optional[float]) -> Tuple[ppo_policy_loss, ppo_info]:
    """DI-engine's policy loss, entropy loss and info from the per-sample
    log-probabilities and entropy: one ``torch.ops.pgext.ppo_surrogate`` call
    (one pass forward, one multiply per input backward) where they all have
    one shape, DI-engine's eager ops for several agents sharing an advantage."""
    if weight is not None and not weight.is_floating_point():
        weight = weight.to(adv.dtype)  # a mask, promoted as eager multiplication would
    same = logp_new.shape == adv.shape and (weight is None or weight.shape == adv.shape)
    if same and entropy.shape == adv.shape and logp_old.shape == adv.shape:
        policy_loss, entropy_loss, approx_kl, clipfrac = torch.ops.pgext.ppo_surrogate(
            logp_new, logp_old, entropy, adv, weight, clip_ratio, dual_clip)
    else:
        # eager arithmetic takes a 0-d CPU tensor beside tensors of any device
        require_device("ppo", ("logit_new", logp_new), (("adv", adv), ("weight", weight)), cpu_scalars=True)
        _require_surrogate_shapes(logp_new, adv, weight)
        policy_loss, entropy_loss, approx_kl, clipfrac = eager_surrogate(
            logp_new, logp_old, entropy, adv, weight, clip_ratio, dual_clip)
    return ppo_policy_loss(policy_loss, entropy_loss), ppo_info(approx_kl, clipfrac)


_VALUE_NAMES = ("value_new", "value_old", "return_")


def ppo_value_error(data: ppo_value_data, clip_ratio: float = 0.2, use_value_clip: bool = True) -> torch.Tensor:
    """PPO's value loss, ``0.5 * mean(weight * (return_ - value)^2)``, with
    the value clipped to ``value_old +- clip_ratio`` (the larger of the two
    squared errors) where ``use_value_clip``: one ``torch.ops.pgext.ppo_value``
    call (one pass forward, one multiply backward) where the tensors have one
    shape, DI-engine's eager ops where they broadcast.

    Raises:
        TypeError: a field that is not a tensor (``weight`` may be None), or
            no floating-point value among them.
        ValueError: shapes that do not broadcast, or tensors on different
            devices (but for 0-d CPU tensors, as in eager arithmetic).
    """
    value_new, value_old, return_, weight = data
    require_tensors("ppo_value_error", zip(_VALUE_NAMES, (value_new, value_old, return_)), (("weight", weight),))
    return _value("ppo_value_error", value_new, value_old, return_, weight, clip_ratio, use_value_clip)


def _value(op: str, value_new, value_old, return_, weight, clip_ratio, use_value_clip) -> torch.Tensor:
    values = (value_new, value_old, return_)
    if weight is not None and not weight.is_floating_point():
        # a mask, promoted as eager multiplication would: to the values' dtype
        weight = weight.to(functools.reduce(torch.promote_types, (t.dtype for t in values)))
    tensors = values if weight is None else values + (weight,)
    if all(t.is_floating_point() and t.shape == value_new.shape and t.device == value_new.device for t in tensors):
        return torch.ops.pgext.ppo_value(value_new, value_old, return_, weight, clip_ratio, use_value_clip)
    named = tuple(zip(_VALUE_NAMES, values)) + (("weight", weight),)
    require_device(op, named[0], named[1:], cpu_scalars=True)
    require_float_result(op, named)
    require_broadcast(op, tuple((name, t.shape) for name, t in named if t is not None))
    return eager_value(value_new, value_old, return_, weight, clip_ratio, use_value_clip)


def ppo_error(data: ppo_data, clip_ratio: float = 0.2, use_value_clip: bool = True,
              dual_clip: Optional[float] = None) -> Tuple[ppo_loss, ppo_info]:
    """PPO's policy, value and entropy losses: ``ppo_policy_error`` and
    ``ppo_value_error`` of ``ppo_data(logit_new, logit_old, action,
    value_new, value_old, adv, return_, weight)``."""
    _check_dual_clip(dual_clip)
    logit_new, logit_old, action, value_new, value_old, adv, return_, weight = data
    _require_policy_tensors("ppo_error", logit_new, logit_old, action, adv, weight)
    require_tensors("ppo_error", zip(_VALUE_NAMES, (value_new, value_old, return_)))
    policy, info = _policy(logit_new, logit_old, action, adv, weight, clip_ratio, dual_clip)
    value_loss = _value("ppo_error", value_new, value_old, return_, weight, clip_ratio, use_value_clip)
    return ppo_loss(policy.policy_loss, value_loss, policy.entropy_loss), info
