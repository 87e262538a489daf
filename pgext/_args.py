"""Argument checks shared by pgext's Python entry points.

Each raises what the guide promises for bad input (TypeError or ValueError
naming the argument and the offending value) where the call would otherwise
fail later, inside an op or an eager expression, with an AttributeError or a
RuntimeError that names neither.
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch

Named = Iterable[Tuple[str, Optional[torch.Tensor]]]


def require_tensors(op: str, named: Named, optional: Named = ()) -> None:
    """TypeError unless each value of `named` is a tensor and each of `optional` a tensor or None."""
    for name, value in named:
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    for name, value in optional:
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(value).__name__}")


def require_dense(op: str, named: Named) -> None:
    """TypeError for a sparse, nested or quantized tensor among `named` (None is skipped)."""
    for name, value in named:
        if value is not None and (value.layout != torch.strided or value.is_nested or value.is_quantized):
            kind = "a nested tensor" if value.is_nested else "a quantized tensor" if value.is_quantized \
                else f"layout {value.layout}"
            raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got {kind}")


def require_device(op: str, anchor: Tuple[str, torch.Tensor], named: Named, cpu_scalars: bool = False) -> None:
    """ValueError unless every tensor of `named` is on the anchor's device.
    With `cpu_scalars`, a 0-d CPU tensor may sit on another device, as eager
    arithmetic allows (where the check guards such arithmetic)."""
    anchor_name, anchor_tensor = anchor
    device = anchor_tensor.device
    for name, value in named:
        if value is None or value.device == device:
            continue
        if cpu_scalars and value.dim() == 0 and value.device.type == "cpu":
            continue
        raise ValueError(f"{op}: {name} is on {value.device} but {anchor_name} is on {device}")


def broadcasts(*shapes: Tuple[int, ...]) -> bool:
    """Whether the shapes broadcast together: torch.broadcast_shapes without
    its RuntimeError, in Python over the sizes (torch's costs about 25 us, a
    tenth of a small batch's A2C step)."""
    if all(shape == shapes[0] for shape in shapes):
        return True
    ndim = max(len(shape) for shape in shapes)
    result = [1] * ndim
    for shape in shapes:
        for i, size in enumerate(shape, ndim - len(shape)):
            if size != 1 and size != result[i]:
                if result[i] != 1:
                    return False
                result[i] = size
    return True


def require_broadcast(op: str, shapes: Iterable[Tuple[str, torch.Size]]) -> None:
    """ValueError, naming each shape, unless the named `shapes` broadcast together."""
    shapes = tuple(shapes)
    if not broadcasts(*(shape for _, shape in shapes)):
        listed = ", ".join(f"{name} {tuple(shape)}" for name, shape in shapes)
        raise ValueError(f"{op}: the shapes {listed} do not broadcast together")


def require_float_result(op: str, named: Named) -> None:
    """TypeError unless `named` promote to a floating-point dtype (a loss is a
    mean): one of them floating-point and none complex."""
    tensors = [(name, value) for name, value in named if value is not None]
    if any(value.is_floating_point() for _, value in tensors) and not any(value.is_complex() for _, value in tensors):
        return
    listed = ", ".join(f"{name} {value.dtype}" for name, value in tensors)
    raise TypeError(f"{op}: needs a real floating-point tensor among {listed}")
