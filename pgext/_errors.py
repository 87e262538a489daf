"""pgext's own exception types."""


class ActionOutOfRangeError(IndexError, ValueError):
    """An action outside ``[0, N)``.

    Both an ``IndexError`` (an index past the classes) and a ``ValueError``
    (what ``torch.distributions.Categorical``'s argument validation raises, so
    code written against the notebook catches it). Raised by ``pg_error``, the
    ``torch.ops.pgext`` ops on the CPU and ``pgext.distributed``; C++ callers
    get ``c10::IndexError``. On CUDA the range check is a device-side assert
    (a ``RuntimeError``, as for every CUDA kernel).
    """


# Shown, pickled and documented as pgext.ActionOutOfRangeError, its public name.
ActionOutOfRangeError.__module__ = "pgext"
