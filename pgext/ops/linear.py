"""The output layer fused in: ``linear_log_prob_entropy``, the op wrapper
(``pgext.losses.linear_policy_gradient`` builds ``linear_pg_error`` on it).

It runs the dispatcher ops ``torch.ops.pgext.linear_*`` (C++ tile loops,
C++ autograd, Meta kernels): the ``(tokens, V)`` logits of
``input @ linear_weight.T + linear_bias`` are formed a class slice (and, for many
rows, a row tile) at a time and never exist in full, forward or backward (docs/fused-head.md).
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Optional, Tuple

import torch

from .._args import require_tensors

__all__ = ["linear_log_prob_entropy"]


def _check_options(op, temperature, chunk_size):
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"{op}: temperature must be a float, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{op}: temperature must be a finite number > 0, got {temperature}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool):
            raise TypeError(f"{op}: chunk_size must be an int or None, got bool")
        try:
            chunk_size = operator.index(chunk_size)
        except TypeError:
            raise TypeError(f"{op}: chunk_size must be an int or None, got {type(chunk_size).__name__}") from None
        if chunk_size <= 0:
            raise ValueError(f"{op}: chunk_size must be > 0 (or None), got {chunk_size}")
    return temperature, chunk_size


def linear_log_prob_entropy(input: torch.Tensor, linear_weight: torch.Tensor, action: torch.Tensor, *,
                            linear_bias: Optional[torch.Tensor] = None, temperature: float = 1.0,
                            ignore_index: Optional[int] = None,
                            chunk_size: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``pgext.log_prob_entropy(F.linear(input, linear_weight, linear_bias) / temperature, action)``
    without the logits.

    Args:
        input: ``(..., H)`` hidden states, float16, bfloat16, float32 or float64.
        linear_weight: ``(V, H)`` output layer of input's dtype and device.
        action: integer actions of shape ``input.shape[:-1]``.
        linear_bias: optional ``(V,)`` bias.
        temperature: divides the logits (finite, > 0); folded into the GEMMs.
        ignore_index: samples whose action equals it get log_prob 0, entropy
            0 and no gradient, and are not range-checked.
        chunk_size: classes (vocabulary entries) per slice of logits formed
            at a time; ``None``: as many as fit in about 8 MiB (32 MiB on a
            GPU) for all the rows, at least 256 (rows are then tiled so that
            a 256-class slice fits in that budget).

    Returns:
        ``(log_prob, entropy)`` of the actions' shape, float32 (float64 for
        float64 input), differentiable with respect to input, linear_weight
        and linear_bias for any upstream gradients of either (double backward
        too, through an unfused per-chunk formula).

    Raises:
        ActionOutOfRangeError: an action outside ``[0, V)`` that is not
            ``ignore_index`` (on CUDA: a device-side assert).
    """
    op = "linear_log_prob_entropy"
    require_tensors(op, (("input", input), ("linear_weight", linear_weight), ("action", action)),
                    (("linear_bias", linear_bias),))
    if ignore_index is not None:
        if isinstance(ignore_index, bool):
            raise TypeError(f"{op}: ignore_index must be an int or None, got bool")
        try:
            ignore_index = operator.index(ignore_index)
        except TypeError:
            raise TypeError(f"{op}: ignore_index must be an int or None, got {type(ignore_index).__name__}") from None
    temperature, chunk_size = _check_options(op, temperature, chunk_size)
    return torch.ops.pgext.linear_log_prob_entropy(input, linear_weight, action, linear_bias, temperature,
                                                   ignore_index, chunk_size)
