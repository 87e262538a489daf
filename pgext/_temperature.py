"""The sampling temperature argument, checked as the ops check it (the ops
take a float and would turn a bool into 1.0 and a tensor into an error that
names no argument)."""
from __future__ import annotations

import math
import numbers


def check_temperature(op: str, temperature) -> float:
    """``temperature`` as a float: TypeError unless it is a real number (bool
    is not one here), ValueError unless it is finite and > 0."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"{op}: temperature must be a float, got {type(temperature).__name__}")
    value = float(temperature)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{op}: temperature must be a finite number > 0, got {temperature!r}")
    return value
