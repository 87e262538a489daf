"""The notebook's loss, ``pg_error(pg_data(logit, action, return_))``: the
user-facing call over the dispatcher op ``pgext::pg_error``, with the fast
direct C++ call for plain eager calls."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _C
from .._args import require_dense, require_tensors
from .._temperature import check_temperature
from .._types import pg_loss

__all__ = ["pg_error"]

_pg_error_op = torch.ops.pgext.pg_error.default
_pg_error_direct = _C.pg_error
_is_compiling = torch.compiler.is_compiling
_REDUCTIONS = ("mean", "sum", "none")


def _check_call(data, weight, reduction):
    """The Python-level checks of pg_error's arguments (the op checks shapes,
    dtypes and devices); shared with pgext.distributed. Returns the three
    tensors of ``data``."""
    try:
        logit, action, return_ = data
    except (TypeError, ValueError):
        raise TypeError(
            "pg_error expects pg_data(logit, action, return_) or a 3-tuple of tensors, "
            f"got {type(data).__name__}"
        ) from None
    named = (("logit", logit), ("action", action), ("return_", return_))
    require_tensors("pg_error", named, (("weight", weight),))
    # the ops say the same (check_dense); pgext.distributed's checks come first
    require_dense("pg_error", named + (("weight", weight),))
    if reduction not in _REDUCTIONS:
        raise ValueError(f"pg_error: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return logit, action, return_


def pg_error(data, *, weight: Optional[torch.Tensor] = None, reduction: str = "mean",
             temperature: float = 1.0) -> pg_loss:
    """Policy-gradient loss and entropy of a categorical policy.

    Args:
        data: ``pg_data(logit, action, return_)`` or any 3-tuple: logits
            ``(..., N)``, integer actions ``logit.shape[:-1]`` and returns of
            the actions' shape, or of a shape that broadcasts to it without
            changing it (a ``(B, 1)`` return against ``(B, A)`` actions; its
            gradient is summed back to ``(B, 1)``).
        weight: optional per-sample weight (or mask) of the actions' shape (or
            broadcasting to it, as ``return_``); it multiplies each sample's
            policy and entropy terms.
        reduction: ``'mean'`` (over samples, the notebook's), ``'sum'`` or
            ``'none'`` (per-sample tensors of the actions' shape).
        temperature: sampling temperature ``T`` (a finite number > 0): the
            losses of ``logit / T``, each logit multiplied by ``1 / T`` as the
            kernels read it; gradients are with respect to ``logit``.

    Returns:
        ``pg_loss(policy_loss, entropy_loss)`` with
        ``policy_loss = -(return_ * log_prob(action))`` and
        ``entropy_loss = entropy``, reduced.

    Raises:
        ActionOutOfRangeError: an action outside ``[0, N)`` (an ``IndexError``
            and a ``ValueError``).
    """
    # The common call (plain tensors, no torch function mode, eager) goes
    # straight to the C++ API: the same dispatcher op without the boxed
    # torch.ops call, whose overhead dominates small batches. Under
    # torch.compile, and for whatever the direct call declines (None), the
    # torch.ops call below: Dynamo traces it, __torch_function__ sees it, and
    # it raises the argument errors.
    if temperature != 1.0 or type(temperature) is not float:
        temperature = check_temperature("pg_error", temperature)
    if temperature == 1.0 and not _is_compiling():
        loss = _pg_error_direct(pg_loss, data, weight, reduction)
        if loss is not None:
            return loss
    logit, action, return_ = _check_call(data, weight, reduction)
    if temperature == 1.0:
        policy_loss, entropy_loss = _pg_error_op(logit, action, return_, weight, reduction)
    else:
        policy_loss, entropy_loss = _pg_error_op(logit, action, return_, weight, reduction, temperature)
    return pg_loss(policy_loss, entropy_loss)
