"""A2C's losses for categorical policies, with DI-engine's API
(``ding.rl_utils.a2c``): the policy and entropy terms are exactly pg_error's
with the advantage as the return, so they come from one fused pg_error call."""
from __future__ import annotations

import torch.nn.functional as F

from .._args import require_broadcast, require_device, require_float_result, require_tensors
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
    require_tensors("a2c_error", (("logit", logit), ("action", action), ("value", value), ("adv", adv),
                                  ("return_", return_)), (("weight", weight),))
    try:
        loss = pg_error(pg_data(logit, action, adv), weight=weight)
    except (TypeError, ValueError) as e:
        raise _renamed(e) from None
    # the value loss is DI-engine's eager F.mse_loss, which takes no tensor of another device
    named = (("value", value), ("return_", return_), ("weight", weight))
    require_device("a2c_error", ("logit", logit), named)
    require_float_result("a2c_error", named[:2])
    require_broadcast("a2c_error", tuple((name, t.shape) for name, t in named if t is not None))
    squared = F.mse_loss(return_, value, reduction="none")
    value_loss = (squared * weight).mean() if weight is not None else squared.mean()
    return a2c_loss(loss.policy_loss, value_loss, loss.entropy_loss)


def _renamed(error: Exception) -> Exception:
    """pg_error's argument error in a2c_error's names: its return_ is the advantage."""
    message = str(error)
    for theirs, ours in (("pg_error: return_", "a2c_error: adv"), ("pg_error:", "a2c_error:")):
        if message.startswith(theirs):
            return type(error)(ours + message[len(theirs):])
    return error
