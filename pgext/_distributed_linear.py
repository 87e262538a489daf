"""pgext.distributed.linear_log_prob_entropy: a column-parallel output layer
fused with the per-token log-probability and entropy.

Each rank of the group holds the whole input ``(..., H)`` and the rows
``[vocab_start, vocab_start + V_local)`` of the output layer's weight (and
bias), as Megatron's column-parallel linear does. The logits exist only a
chunk of tokens at a time, ``(chunk, V_local)`` per rank; backward computes
them again. Per chunk, forward merges the shards' row statistics with
``pgext.distributed``'s two all-reduces; backward runs one all-reduce, of the
input's gradient, after its last chunk.
"""
from __future__ import annotations

import math
import numbers
import operator
import struct
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from ._args import require_dense, require_tensors
from ._shard_check import _DTYPES, _INT_VIEW, FIELDS, _fold31, _mix31, build_header, check_headers

_NAME = "linear_log_prob_entropy"
# The default chunk holds about this many logits per rank (64 MiB in float32):
# large enough for efficient matrix products, small next to a (tokens, V) block.
DEFAULT_CHUNK_ELEMENTS = 1 << 24
# The input's fingerprint is summed over pieces of this many elements, so that
# its int64 temporaries stay small next to the input.
_FINGERPRINT_ELEMENTS = 1 << 22
# This module's fields, appended to pgext.distributed's header (_shard_check).
_EXTRA = ("hidden", "input_fp", "temperature", "has_ignore", "ignore_index", "chunk_size", "input_grad",
          "has_bias")


def linear_log_prob_entropy(input: torch.Tensor, linear_weight: torch.Tensor, action: torch.Tensor, group=None, *,
                            linear_bias: Optional[torch.Tensor] = None, vocab_start: Optional[int] = None,
                            temperature: float = 1.0, ignore_index: Optional[int] = None,
                            chunk_size: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``pgext.log_prob_entropy(F.linear(input, W, b) / temperature, action)``
    with ``W`` (and ``b``) split by class over ``group``, without the logits.

    Args:
        input: ``(..., H)``, the same on every rank (a replicated activation).
        linear_weight: this rank's ``(V_local, H)`` rows of the output layer,
            the classes ``[vocab_start, vocab_start + V_local)``; ``V_local >= 1``.
        action: global class ids of shape ``input.shape[:-1]``, in ``[0, V)``
            with ``V`` the sum of the shards' sizes; the same on every rank.
        group: the tensor-parallel process group (default: the default group).
        linear_bias: this rank's ``(V_local,)`` bias, or None; given on every
            rank or on none.
        vocab_start: this shard's first class; default ``rank * V_local``
            (equal shards in rank order). Uneven shards need it.
        temperature: positive and finite; the logits are divided by it.
        ignore_index: samples whose action equals it get log_prob 0, entropy 0
            and no gradient, and are not range-checked.
        chunk_size: tokens per chunk; default: as many as keep a chunk's logits
            at about 2**24 elements on the largest shard. Every rank must pass
            the same (each chunk is a pair of collectives).

    Returns:
        ``(log_prob, entropy)`` of the actions' shape, float32 (float64 for a
        float64 input), the same on every rank. Backward gives ``input`` the
        whole gradient on every rank (an all-reduce of the shards' parts) and
        ``linear_weight`` and ``linear_bias`` their shard's; every rank must run
        it, with the same upstream gradients.

    Raises on every rank alike, before any collective on the data: as
    ``pgext.distributed.log_prob_entropy`` for the actions and the shards'
    layout, and ``ValueError`` when the ranks differ in ``input``, H,
    ``temperature``, ``ignore_index``, ``chunk_size``, whether a bias is given
    or whether ``input`` requires grad. A rank whose own arguments are wrong
    (``TypeError`` or ``ValueError`` naming the value) raises that error and
    the others a ``ValueError`` that names it.
    """
    from . import distributed as _d  # here, not above: pgext.distributed imports this module

    group, rank = _d._group_and_rank(group)
    local_error = None
    keep = shard = None
    extra = [0] * len(_EXTRA)
    try:
        _check_local(input, linear_weight, action, linear_bias, temperature, chunk_size)
        ignore_index = _check_ignore_index(ignore_index)
        # what pg_error's header reads of a logit shard: its size and dtype
        shard = torch.empty((0, linear_weight.shape[0]), dtype=linear_weight.dtype, device="meta")
        vocab_start = _d._vocab_start(vocab_start, rank, shard)
        if ignore_index is not None:
            keep = action != ignore_index
        extra = [input.shape[-1], 0, _float_bits(float(temperature)), int(ignore_index is not None),
                 ignore_index or 0, operator.index(chunk_size or 0),
                 int(torch.is_grad_enabled() and input.requires_grad),
                 int(linear_bias is not None)]
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks have been told
        local_error = e
    ok = local_error is None
    device = input.device if ok else _d._group_device(group)
    x = input.reshape(-1, input.shape[-1]) if ok else None
    # pg_error's header with a constant in place of its return_: the input
    # is compared by this module's own field
    header = build_header(shard, action, torch.zeros((), dtype=torch.int64, device=device) if ok else None, keep,
                          vocab_start, "none", device, ok)
    extra = torch.tensor(extra, dtype=torch.int64, device=device)
    if ok and x.numel():
        extra[1] = _fingerprint(x)
    mine = torch.cat((header, extra))
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    _d._collective("the all-gather of the shard headers", dist.all_gather, table, mine, group=group)
    rows = torch.stack(table).tolist()
    base = [r[:len(FIELDS)] for r in rows]
    extras = [dict(zip(_EXTRA, r[len(FIELDS):])) for r in rows]
    if ok and all(h[0] == 0 for h in base):
        _check_agreement(extras)
    try:
        check_headers(base, rank, local_error, action, keep)
    except Exception as e:
        if e is local_error:
            raise
        raise _renamed(e) from None
    if _differs(extras, "input_fp"):
        raise ValueError(
            f"{_NAME}: input must be identical on every rank (the layer is split over classes, not tokens); it "
            f"differs between ranks {[r for r, h in enumerate(extras) if h['input_fp'] != extras[0]['input_fp']]} "
            "and rank 0")
    largest = max(h[FIELDS.index("n_local")] for h in base)
    chunk = operator.index(chunk_size) if chunk_size is not None else max(1, DEFAULT_CHUNK_ELEMENTS // largest)

    log_prob, entropy = _ShardLinearLogProbEntropy.apply(
        x, linear_weight, linear_bias, action.reshape(-1), None if keep is None else keep.reshape(-1), vocab_start,
        float(temperature), chunk, group)
    return log_prob.reshape(action.shape), entropy.reshape(action.shape)


def _check_local(input, weight, action, bias, temperature, chunk_size):
    named = (("input", input), ("linear_weight", weight), ("action", action))
    require_tensors(_NAME, named, (("linear_bias", bias),))
    require_dense(_NAME, named + (("linear_bias", bias),))
    if input.dtype not in _DTYPES:
        raise TypeError(f"{_NAME}: input must be float16, bfloat16, float32 or float64, got {input.dtype}")
    for name, value in (("linear_weight", weight), ("linear_bias", bias)):
        if value is not None and value.dtype != input.dtype:
            raise TypeError(f"{_NAME}: {name} is {value.dtype} but input is {input.dtype}; they must match")
    if action.is_floating_point() or action.is_complex() or action.dtype == torch.bool:
        raise TypeError(f"{_NAME}: action must be an integer tensor, got {action.dtype}")
    for name, value in (("linear_weight", weight), ("action", action), ("linear_bias", bias)):
        if value is not None and value.device != input.device:
            raise ValueError(f"{_NAME}: {name} is on {value.device} but input is on {input.device}")
    if input.dim() < 1:
        raise ValueError(f"{_NAME}: input must have shape (..., H), got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != input.shape[-1]:
        raise ValueError(f"{_NAME}: linear_weight must have shape (V_local, H) with H = input.shape[-1] = "
                         f"{input.shape[-1]}, got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{_NAME}: linear_weight {tuple(weight.shape)} holds no classes: every rank of the group "
                         "must hold at least one (with fewer classes than ranks, use a smaller group)")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{_NAME}: linear_bias must have shape (V_local,) = ({weight.shape[0]},), got "
                         f"{tuple(bias.shape)}")
    if tuple(action.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"{_NAME}: action must have shape input.shape[:-1] = {tuple(input.shape[:-1])}, got "
                         f"{tuple(action.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"{_NAME}: temperature must be a real number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{_NAME}: temperature must be positive and finite, got {temperature}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
            raise TypeError(f"{_NAME}: chunk_size must be an int or None, got {type(chunk_size).__name__}")
        if not 0 < chunk_size < 2**63:
            raise ValueError(f"{_NAME}: chunk_size must be a positive int, got {chunk_size}")


def _check_ignore_index(ignore_index) -> Optional[int]:
    if ignore_index is None:
        return None
    if isinstance(ignore_index, bool):
        raise TypeError(f"{_NAME}: ignore_index must be an int or None, got bool")
    try:
        value = operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"{_NAME}: ignore_index must be an int or None, got {type(ignore_index).__name__}") from None
    if not -2**63 <= value < 2**63:  # compared with int64 actions, and sent to the other ranks as one
        raise ValueError(f"{_NAME}: ignore_index must fit in int64, got {value}")
    return value


def _float_bits(value: float) -> int:
    # the exact value travels, not a rounding of it
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _fingerprint(x: torch.Tensor) -> torch.Tensor:
    """_shard_check's fingerprint of ``x``, summed piece by piece: the same
    digest without int64 temporaries of the input's size."""
    flat = x.detach().reshape(-1)
    if flat.is_floating_point():
        flat = flat.view(_INT_VIEW[flat.element_size()])
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    for lo in range(0, flat.numel(), _FINGERPRINT_ELEMENTS):
        piece = flat[lo:lo + _FINGERPRINT_ELEMENTS]
        value = _mix31(_fold31(piece.long()))
        position = _mix31(_fold31(torch.arange(lo, lo + piece.numel(), device=flat.device)) ^ 0x2545F491)
        total += _mix31(value ^ position).sum()
    return total


def _differs(extras, field: str) -> bool:
    return any(h[field] != extras[0][field] for h in extras)


def _check_agreement(extras):
    """The arguments every rank must share besides pg_error's, checked first:
    the others' meaning depends on them."""
    def per_rank(field, show=lambda v: v):
        return "[" + ", ".join(str(show(h[field])) for h in extras) + "]"

    if _differs(extras, "hidden"):
        raise ValueError(f"{_NAME}: every rank must have the same hidden size H, got {per_rank('hidden')}")
    if _differs(extras, "temperature"):
        show = (lambda b: struct.unpack("<d", struct.pack("<q", b))[0])
        raise ValueError(f"{_NAME}: every rank must pass the same temperature, got {per_rank('temperature', show)}")
    if _differs(extras, "has_ignore") or _differs(extras, "ignore_index"):
        shown = "[" + ", ".join(str(h["ignore_index"]) if h["has_ignore"] else "None" for h in extras) + "]"
        raise ValueError(f"{_NAME}: every rank must pass the same ignore_index, got {shown}")
    if _differs(extras, "chunk_size"):
        raise ValueError(f"{_NAME}: every rank must pass the same chunk_size (each chunk is a pair of "
                         f"collectives), got {per_rank('chunk_size', lambda c: c or None)}")
    if _differs(extras, "has_bias"):
        raise ValueError(f"{_NAME}: linear_bias must be given on every rank or on none, got "
                         f"{per_rank('has_bias', lambda b: 'a bias' if b else 'None')}")
    if _differs(extras, "input_grad"):
        raise ValueError(f"{_NAME}: input must require grad on every rank or on none (its backward is an "
                         f"all-reduce), got {per_rank('input_grad', bool)}")


def _renamed(e: Exception) -> Exception:
    """A cross-rank error of pg_error's header check, in this function's terms."""
    message = str(e)
    if message.startswith("pg_error: "):
        message = f"{_NAME}: " + message[len("pg_error: "):]
    return type(e)(message.replace("the logit shards", "the linear_weight shards"))


def _logits(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], temperature: float):
    z = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
    if temperature != 1.0:
        z.div_(temperature)  # in place: the chunk is the only copy
    return z


class _ShardLinearLogProbEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, action, keep, vocab_start, temperature, chunk, group):
        from . import distributed as _d

        rows = x.shape[0]
        acc = _d._acc(x)
        log_prob = torch.empty(rows, dtype=acc, device=x.device)
        entropy = torch.empty(rows, dtype=acc, device=x.device)
        lse = torch.empty(rows, dtype=torch.float64, device=x.device)
        # Autocast off, here and in backward: the products run in the inputs'
        # own dtype, so that backward's recomputed logits are forward's
        # whatever autocast state each runs under.
        with torch.autocast(x.device.type, enabled=False):
            for lo in range(0, rows, chunk):
                hi = min(lo + chunk, rows)
                z = _logits(x[lo:hi], weight, bias, temperature)
                # the chunk already holds logit / temperature
                lse[lo:hi], entropy[lo:hi], log_prob[lo:hi] = _d._global_row_stats(
                    z, action[lo:hi], vocab_start, group, 1.0)
                del z  # before the next chunk's logits exist
        ctx.save_for_backward(x, weight, bias, action, keep, lse, entropy)
        ctx.vocab_start, ctx.temperature, ctx.chunk, ctx.group = vocab_start, temperature, chunk, group
        if keep is not None:
            return torch.where(keep, log_prob, 0), torch.where(keep, entropy, 0)
        return log_prob, entropy.clone()  # entropy is saved: the output must not alias it

    @staticmethod
    def backward(ctx, grad_log_prob, grad_entropy):
        if torch.is_grad_enabled():
            # a second derivative would need collectives inside backward
            raise RuntimeError(
                f"pgext.distributed.{_NAME} does not support create_graph=True (second-order gradients)")
        from . import distributed as _d

        x, weight, bias, action, keep, lse, entropy = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        rows, acc, temperature = x.shape[0], entropy.dtype, ctx.temperature
        # pg_grad_from_stats is linear in the upstream gradients: dividing these
        # (rows,) vectors by the temperature gives the gradient of the logits
        # before it, with no pass over a chunk
        g_lp, g_ent = grad_log_prob.to(acc), grad_entropy.to(acc)
        if temperature != 1.0:
            g_lp, g_ent = g_lp / temperature, g_ent / temperature
        minus_one = torch.full((), -1.0, dtype=acc, device=x.device)
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None
        # half-precision shards accumulate their chunks in float32
        grad_w = torch.zeros(weight.shape, dtype=acc, device=x.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=x.device) if need_b else None
        with torch.autocast(x.device.type, enabled=False):
            for lo in range(0, rows, ctx.chunk):
                hi = min(lo + ctx.chunk, rows)
                xc = x[lo:hi]
                z = _logits(xc, weight, bias, temperature)
                g = torch.ops.pgext.pg_grad_from_stats(
                    g_lp[lo:hi], g_ent[lo:hi], z, action[lo:hi], minus_one, None if keep is None else keep[lo:hi],
                    lse[lo:hi], entropy[lo:hi], "none", ctx.vocab_start)
                del z
                if need_x:
                    torch.mm(g, weight, out=grad_x[lo:hi])
                if need_w:
                    if weight.dtype == acc:
                        grad_w.addmm_(g.t(), xc)
                    else:
                        grad_w += torch.mm(g.t(), xc)
                if need_b:
                    grad_b += g.sum(0, dtype=acc)
        if need_x and rows:
            # the input feeds every shard: its gradient is the sum of theirs
            # (Megatron's column-parallel backward)
            _d._collective(f"the all-reduce (SUM) of {_NAME}'s input gradient", dist.all_reduce, grad_x,
                           dist.ReduceOp.SUM, ctx.group)
        return (grad_x, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None, None)
