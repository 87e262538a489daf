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

import torch

from . import reference
from ._cmake import cmake_prefix_path
from ._errors import ActionOutOfRangeError
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

# The op wrappers (pgext.ops) and the losses on them (pgext.losses) need the
# ops registered above.
from .ops import linear_log_prob_entropy, log_prob_entropy  # noqa: E402
from .losses import (a2c_error, linear_pg_error, pg_error, ppo_error, ppo_policy_error,  # noqa: E402
                     ppo_value_error)
__version__: str = _C.__version__


def __getattr__(name):
    # pgext.distributed imports torch.distributed: loaded on first use only
    if name == "distributed":
        import importlib

        return importlib.import_module(".distributed", __name__)
    raise AttributeError(f"module 'pgext' has no attribute {name!r}")


def build_mode() -> str:
    """'installed' for the compiled package, 'jit' under PGEXT_JIT=1."""
    return _BUILD_MODE


