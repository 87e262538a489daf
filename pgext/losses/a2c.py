"""A2C's losses for categorical policies, with DI-engine's API
(``ding.rl_utils.a2c``): the policy and entropy terms are exactly pg_error's
with the advantage as the return, so they come from one fused pg_error call."""
from __future__ import annotations

import torch.nn.functional as F

from .._types import a2c_data, a2c_loss, pg_data

__all__ = ["a2c_error"]


def a2c_error(data: a2c_data) -> a2c_loss:
    """A2C (arXiv:1602.01783): ``policy_loss = -mean(weight * adv * log_prob)``,
    ``value_loss = mean(weight * (return_ - value)^2)``,
    ``entropy_loss = mean(weight * entropy)``, all differentiable 0-d tensors.

    Args:
        data: ``a2c_data(logit, action, value, adv, return_, weight)``: logits
            ``(B, N)`` (any leading dims), integer actions, and value,
            advantage, return and weight (may be None) of the actions' shape.
    """
    from .policy_gradient import pg_error  # the package's user-facing call (direct C++ path)

    logit, action, value, adv, return_, weight = data
    loss = pg_error(pg_data(logit, action, adv), weight=weight)
    squared = F.mse_loss(return_, value, reduction="none")
    value_loss = (squared * weight).mean() if weight is not None else squared.mean()
    return a2c_loss(loss.policy_loss, value_loss, loss.entropy_loss)
