"""Pure-PyTorch references of pgext's functions: ``Categorical`` math.

They are the yardstick for pgext's tests and benchmarks. ``pg_error`` stays
exactly the notebook's computation (``weight`` and ``reduction`` applied on
top of the per-sample terms the way pgext defines them); the PPO and A2C
losses are DI-engine's (``ding.rl_utils``) with their log-probabilities and
entropies from ``Categorical`` and PPO's clipped surrogate as DI-engine's
eager ops (``eager_surrogate``), PPO's value loss as DI-engine's eager ops
(``eager_value``); pgext computes each in one fused op.
"""
from __future__ import annotations

from typing import Optional

import torch

import torch.nn.functional as F

from ._types import a2c_loss, pg_data, pg_loss, ppo_info, ppo_loss, ppo_policy_loss

__all__ = ["pg_error", "pg_data", "pg_loss", "log_prob_entropy", "ppo_policy_error", "eager_surrogate", "eager_value",
           "ppo_error", "a2c_error"]


def pg_error(data, *, weight: Optional[torch.Tensor] = None, reduction: str = "mean",
             temperature: float = 1.0) -> pg_loss:
    logit, action, return_ = data
    dist = torch.distributions.categorical.Categorical(logits=logit / temperature)
    log_prob = dist.log_prob(action)
    policy = -(return_ * log_prob)
    entropy = dist.entropy()
    if weight is not None:
        policy = policy * weight
        entropy = entropy * weight
    if reduction == "mean":
        return pg_loss(policy.mean(), entropy.mean())
    if reduction == "sum":
        return pg_loss(policy.sum(), entropy.sum())
    if reduction == "none":
        return pg_loss(policy, entropy)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def log_prob_entropy(logit, action, *, temperature=1.0, ignore_index=None):
    """``Categorical``'s log_prob and entropy per sample (ignored samples 0),
    of the logits divided by the temperature (a scaled copy)."""
    keep = None if ignore_index is None else action != ignore_index
    if keep is not None:
        action = torch.where(keep, action, 0)
    dist = torch.distributions.categorical.Categorical(logits=logit / temperature)
    log_prob, entropy = dist.log_prob(action), dist.entropy()
    if keep is not None:
        log_prob, entropy = torch.where(keep, log_prob, 0), torch.where(keep, entropy, 0)
    return log_prob, entropy


def ppo_policy_error(data, clip_ratio: float = 0.2, dual_clip: Optional[float] = None):
    logit_new, logit_old, action, adv, weight = data
    dist_new = torch.distributions.categorical.Categorical(logits=logit_new)
    logp_new = dist_new.log_prob(action)
    if logit_old.dim() == action.dim():  # stored old log-probabilities
        logp_old = logit_old
    else:
        logp_old = torch.distributions.categorical.Categorical(logits=logit_old).log_prob(action)
    policy_loss, entropy_loss, approx_kl, clipfrac = eager_surrogate(
        logp_new, logp_old, dist_new.entropy(), adv, weight, clip_ratio, dual_clip)
    return ppo_policy_loss(policy_loss, entropy_loss), ppo_info(approx_kl, clipfrac)


def eager_surrogate(logp_new: torch.Tensor, logp_old: torch.Tensor, entropy: torch.Tensor, adv: torch.Tensor,
                    weight: Optional[torch.Tensor], clip_ratio: float,
                    dual_clip: Optional[float]):
    """DI-engine's PPO policy loss, entropy loss, approx_kl and clipfrac from
    per-sample log-probabilities and entropies, as its eager ops compute them
    (several agents sharing one advantage: ratio and entropy averaged over
    them)."""
    if weight is None:
        weight = torch.ones_like(adv)
    if entropy.shape != weight.shape:  # several agents sharing one advantage
        entropy = entropy.mean(dim=1)
    entropy_loss = (entropy * weight).mean()
    ratio = torch.exp(logp_new - logp_old)
    if ratio.shape != adv.shape:
        ratio = ratio.mean(dim=1)
    surr1 = ratio * adv
    surr2 = ratio.clamp(1 - clip_ratio, 1 + clip_ratio) * adv
    if dual_clip is not None:
        clip1 = torch.min(surr1, surr2)
        clip2 = torch.max(clip1, dual_clip * adv)
        policy_loss = -(torch.where(adv < 0, clip2, clip1) * weight).mean()
    else:
        policy_loss = (-torch.min(surr1, surr2) * weight).mean()
    with torch.no_grad():
        approx_kl = (logp_old - logp_new).mean()
        clipfrac = (ratio.gt(1 + clip_ratio) | ratio.lt(1 - clip_ratio)).float().mean()
    return policy_loss, entropy_loss, approx_kl, clipfrac


def eager_value(value_new: torch.Tensor, value_old: torch.Tensor, return_: torch.Tensor,
                weight: Optional[torch.Tensor], clip_ratio: float, use_value_clip: bool) -> torch.Tensor:
    """DI-engine's PPO value loss as its eager ops compute it: half the
    weighted mean squared error of the new values, the larger of it and the
    error of the values clipped to ``value_old +- clip_ratio`` where
    ``use_value_clip``."""
    if weight is None:
        weight = torch.ones_like(value_old)
    if use_value_clip:
        value_clip = value_old + (value_new - value_old).clamp(-clip_ratio, clip_ratio)
        v1 = (return_ - value_new).pow(2)
        v2 = (return_ - value_clip).pow(2)
        return 0.5 * (torch.max(v1, v2) * weight).mean()
    return 0.5 * ((return_ - value_new).pow(2) * weight).mean()


def ppo_error(data, clip_ratio: float = 0.2, use_value_clip: bool = True, dual_clip: Optional[float] = None):
    logit_new, logit_old, action, value_new, value_old, adv, return_, weight = data
    policy, info = ppo_policy_error((logit_new, logit_old, action, adv, weight), clip_ratio, dual_clip)
    value_loss = eager_value(value_new, value_old, return_, weight, clip_ratio, use_value_clip)
    return ppo_loss(policy.policy_loss, value_loss, policy.entropy_loss), info


def a2c_error(data):
    logit, action, value, adv, return_, weight = data
    if weight is None:
        weight = torch.ones_like(value)
    dist = torch.distributions.categorical.Categorical(logits=logit)
    logp = dist.log_prob(action)
    entropy_loss = (dist.entropy() * weight).mean()
    policy_loss = -(logp * adv * weight).mean()
    value_loss = (F.mse_loss(return_, value, reduction="none") * weight).mean()
    return a2c_loss(policy_loss, value_loss, entropy_loss)
