"""``linear_pg_error``: pg_error's two losses on the fused output layer
(``torch.ops.pgext.linear_pg_error``, composite over the fused
``linear_log_prob_entropy``), so the ``(tokens, V)`` logits never exist."""
from __future__ import annotations

from typing import Optional

import torch

from .._types import pg_loss
from .._args import require_tensors
from ..ops.linear import _check_options

__all__ = ["linear_pg_error"]

_REDUCTIONS = ("mean", "sum", "none")


def linear_pg_error(input: torch.Tensor, linear_weight: torch.Tensor, action: torch.Tensor, return_: torch.Tensor,
                    *, linear_bias: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                    reduction: str = "mean", temperature: float = 1.0, chunk_size: Optional[int] = None) -> pg_loss:
    """``pgext.pg_error(pg_data(F.linear(input, linear_weight, linear_bias) / temperature, action, return_))``
    without the logits.

    ``policy_loss = -(return_ * log_prob) * weight`` and ``entropy_loss =
    entropy * weight``, reduced by ``reduction`` ('mean' over samples, 'sum'
    or 'none'). return_ and weight have the actions' shape or broadcast to it
    without changing it, and get gradients. Unlike ``pg_error``, samples of
    weight 0 are range-checked like any other. Other arguments as
    :func:`linear_log_prob_entropy`.
    """
    op = "linear_pg_error"
    require_tensors(op, (("input", input), ("linear_weight", linear_weight), ("action", action), ("return_", return_)),
                    (("linear_bias", linear_bias), ("weight", weight)))
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    temperature, chunk_size = _check_options(op, temperature, chunk_size)
    policy_loss, entropy_loss = torch.ops.pgext.linear_pg_error(
        input, linear_weight, action, return_, linear_bias, weight, reduction, temperature, chunk_size)
    return pg_loss(policy_loss, entropy_loss)
