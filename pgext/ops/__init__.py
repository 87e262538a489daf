"""Python wrappers of pgext's dispatcher ops (``torch.ops.pgext``): argument
checks and keyword arguments over the op, and the ops' vmap rules. The losses
built on them are in ``pgext.losses``."""
from . import vmap
from .linear import linear_log_prob_entropy
from .primitive import log_prob_entropy

__all__ = ["log_prob_entropy", "linear_log_prob_entropy"]

vmap.register()
