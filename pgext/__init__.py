"""pgext: the policy-gradient loss and its entropy bonus in one fused op.

Drop-in for the notebook's ``pg_error``::

    from pgext import pg_data, pg_loss, pg_error
    loss = pg_error(pg_data(logit, action, return_))
    total = loss.policy_loss - entropy_weight * loss.entropy_loss

The work is done by dispatcher ops (``torch.ops.pgext.*``) with CPU and CUDA
kernels and C++ autograd. They live in libpgext (``pgext/lib/libpgext.so``, no
Python in it), which C++ programs link too; this module only loads them
(through ``pgext._C``, which links libpgext) and keeps the API.

C++ and CMake: ``pgext.cmake_prefix_path``, like
``torch.utils.cmake_prefix_path``, points ``find_package(pgext)`` at the
library, headers and CMake package shipped in this package.

``pgext.distributed.pg_error`` computes the same loss from logits split by
class across a torch.distributed process group.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from . import _vmap, reference
from ._cmake import cmake_prefix_path
from ._errors import ActionOutOfRangeError
from ._temperature import check_temperature
from ._types import (a2c_data, a2c_loss, pg_data, pg_loss, ppo_data, ppo_info, ppo_loss, ppo_policy_data,
                     ppo_policy_loss, ppo_value_data)

__all__ = ["pg_data", "pg_loss", "pg_error", "log_prob_entropy", "ppo_policy_error", "ppo_value_error", "ppo_error",
           "a2c_error", "ppo_policy_data", "ppo_data", "ppo_value_data", "ppo_policy_loss", "ppo_loss", "ppo_info",
           "a2c_data", "a2c_loss", "ActionOutOfRangeError", "build_mode", "reference", "cmake_prefix_path",
           "__version__", "linear_log_prob_entropy", "linear_pg_error"]


def _load_extension():
    # PGEXT_JIT=1: compile the sources in this checkout instead of importing
    # the installed build (the two must never load together: both register
    # the pgext op library).
    if os.environ.get("PGEXT_JIT", "0") == "1":
        from . import jit

        return jit.load(), "jit"
    rebuild = ("pgext runs with the torch minor release it was built against only (its C++ ABI); rebuild it "
               "with this torch: `make build` in a checkout, or `pip install --no-build-isolation .`")
    try:
        from . import _C
    except ImportError as exc:
        raise ImportError(f"pgext's compiled part did not load ({exc}), with torch {torch.__version__}. "
                          f"{rebuild}") from exc
    built, running = (".".join(v.split("+")[0].split(".")[:2]) for v in (_C.torch_version(), torch.__version__))
    if built != running:
        raise ImportError(f"pgext was built against torch {_C.torch_version()}, this is torch {torch.__version__}. "
                          f"{rebuild}")
    return _C, "installed"


_C, _BUILD_MODE = _load_extension()
_C._set_action_error_type(ActionOutOfRangeError)

from ._primitives import log_prob_entropy  # noqa: E402 - the ops are registered above
from ._linear import linear_log_prob_entropy, linear_pg_error  # noqa: E402
from .a2c import a2c_error  # noqa: E402
from .ppo import ppo_error, ppo_policy_error, ppo_value_error  # noqa: E402
_vmap.register()
__version__: str = _C.__version__
_pg_error_op = torch.ops.pgext.pg_error.default
_pg_error_direct = _C.pg_error
_is_compiling = torch.compiler.is_compiling
_REDUCTIONS = ("mean", "sum", "none")


def __getattr__(name):
    # pgext.distributed imports torch.distributed: loaded on first use only
    if name == "distributed":
        import importlib

        return importlib.import_module(".distributed", __name__)
    raise AttributeError(f"module 'pgext' has no attribute {name!r}")


def build_mode() -> str:
    """'installed' for the compiled package, 'jit' under PGEXT_JIT=1."""
    return _BUILD_MODE


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
    for name, value in (("logit", logit), ("action", action), ("return_", return_)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"pg_error: {name} must be a torch.Tensor, got {type(value).__name__}")
    if weight is not None and not isinstance(weight, torch.Tensor):
        raise TypeError(f"pg_error: weight must be a torch.Tensor or None, got {type(weight).__name__}")
    for name, value in (("logit", logit), ("action", action), ("return_", return_), ("weight", weight)):
        # the ops say the same (check_dense); pgext.distributed's checks come first
        if value is not None and (value.layout != torch.strided or value.is_nested or value.is_quantized):
            kind = "a nested tensor" if value.is_nested else "a quantized tensor" if value.is_quantized \
                else f"layout {value.layout}"
            raise TypeError(f"pg_error: {name} must be a dense (strided) tensor, got {kind}")
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
