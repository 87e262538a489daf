"""Pure-PyTorch reference of ``pg_error``: the notebook's ``Categorical`` math.

It is the yardstick for pgext's tests and benchmarks, so it stays exactly the
notebook's computation; ``weight`` and ``reduction`` are applied on top of the
per-sample terms the way pgext defines them.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._types import pg_data, pg_loss

__all__ = ["pg_error", "pg_data", "pg_loss"]


def pg_error(data, *, weight: Optional[torch.Tensor] = None, reduction: str = "mean") -> pg_loss:
    logit, action, return_ = data
    dist = torch.distributions.categorical.Categorical(logits=logit)
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
