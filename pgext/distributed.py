"""pg_error over logits split by class across a process group (vocabulary parallel).

Each rank of ``group`` holds the columns ``[vocab_start, vocab_start + N_local)``
of the logits, as a Megatron-style column-parallel output layer produces them,
and the same actions, returns and weights. Every rank gets the loss of the
whole vocabulary; backward gives each rank the gradient of its own shard::

    loss = pgext.distributed.pg_error(pg_data(logit_shard, action, return_), group)

Collectives per forward, all from ``torch.distributed`` (NCCL, Gloo, ...):

1. an all-gather of a 13-integer header per rank (``_shard_check``): every
   rank validates the shards' layout and inputs before any data-sized
   collective, and all ranks raise alike on bad input;
2. an all-reduce (MAX) of each row's maximum logit;
3. an all-reduce (SUM) of each shard's ``sum exp(x - max)`` and
   ``sum exp(x - max) * (x - max)``, rescaled to the global max, packed with
   the action's logit (0 on the shards that do not hold it).

Backward runs no collective: the global log-sum-exp and entropy saved by
forward are all that a shard's gradient needs (``pg_grad_from_stats``). On
CUDA, reading the header back is one host synchronization per call.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.distributed as dist

from ._args import require_device, require_tensors
from .losses.policy_gradient import _check_call
from ._distributed_linear import linear_log_prob_entropy
from ._shard_check import build_header, check_headers
from ._temperature import check_temperature
from ._types import pg_data, pg_loss

__all__ = ["pg_error", "log_prob_entropy", "linear_log_prob_entropy"]


def pg_error(data, group=None, *, vocab_start: Optional[int] = None, weight: Optional[torch.Tensor] = None,
             reduction: str = "mean", temperature: float = 1.0) -> pg_loss:
    """``pgext.pg_error`` of the gathered logits, computed from this rank's shard.

    Args:
        data: ``pg_data(logit, action, return_)``: ``logit`` is this rank's
            shard ``(..., N_local)``; ``action`` holds *global* class ids in
            ``[0, N)`` with ``N`` the sum of the shards' sizes; ``action``,
            ``return_`` (and ``weight``) must be the same on every rank.
        group: the process group the classes are split over (default: the
            default group).
        vocab_start: this shard's first class id; default ``rank * N_local``
            (equal shards in rank order). Shards of different sizes need it.
        weight, reduction, temperature: as in ``pgext.pg_error`` (every rank
            must pass the same temperature).

    Returns:
        ``pg_loss(policy_loss, entropy_loss)``, the same on every rank.

    Raises on every rank of the group alike: ``pgext.ActionOutOfRangeError``
    (an ``IndexError`` and a ``ValueError``) for an action outside ``[0, N)``
    (samples of weight 0 excepted); ``ValueError`` when the shards do not tile ``[0, N)``
    or the ranks disagree on samples, dtype, reduction, actions, returns or
    weights; a rank whose own inputs fail pg_error's checks (or whose logit
    is on meta, with no data to send) raises that error and the others a
    ``ValueError`` that names it.
    """
    group, rank = _group_and_rank(group)
    local_error = None
    logit = action = return_ = None
    try:
        logit, action, return_ = _check_call(data, weight, reduction)
        if logit.is_meta:
            raise ValueError("pg_error: logit is on meta, which holds no data for the other ranks")
        temperature = check_temperature("pg_error", temperature)
        if logit.dim() and logit.shape[-1] == 0:
            raise ValueError(
                f"pg_error: rank {rank}'s logit shard {tuple(logit.shape)} holds no classes: every rank of the "
                "group must hold at least one (with fewer classes than ranks, use a smaller group)")
        vocab_start = _vocab_start(vocab_start, rank, logit)
        loss_dtype = _check_tensors(logit, action, return_, weight, reduction)
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks have been told
        local_error = e
    device = logit.device if isinstance(logit, torch.Tensor) and not logit.is_meta else _group_device(group)
    header = build_header(logit, action, return_, weight, vocab_start, reduction, device, local_error is None)
    table = [torch.empty_like(header) for _ in range(dist.get_world_size(group))]
    _collective("the all-gather of the shard headers", dist.all_gather, table, header, group=group)
    check_headers(torch.stack(table).tolist(), rank, local_error, action, weight)

    policy, entropy = _ShardPgError.apply(
        logit, return_, weight, action, vocab_start, reduction, group, loss_dtype, temperature)
    return pg_loss(policy, entropy)


def log_prob_entropy(logit: torch.Tensor, action: torch.Tensor, group=None, *, vocab_start: Optional[int] = None,
                     temperature: float = 1.0, ignore_index: Optional[int] = None):
    """``pgext.log_prob_entropy`` of the gathered logits, from this rank's
    shard of classes: ``(log_prob, entropy)`` of the actions' shape, the same
    on every rank; backward gives each rank its shard's gradient.

    It is ``pg_error`` with a return of -1 and reduction ``'none'`` (the same
    collectives and checks); ``temperature`` and ``ignore_index`` as in
    ``pgext.log_prob_entropy`` (every rank must pass the same temperature).
    """
    require_tensors("log_prob_entropy", (("logit", logit), ("action", action)))
    temperature = check_temperature("log_prob_entropy", temperature)
    acc = _acc(logit) if logit.is_floating_point() else torch.float32
    minus_one = torch.full((), -1.0, dtype=acc, device=logit.device)
    if ignore_index is None:
        return tuple(pg_error(pg_data(logit, action, minus_one), group, vocab_start=vocab_start, reduction="none",
                              temperature=temperature))
    keep = action != ignore_index  # weight 0: the ignored actions are neither checked nor read
    log_prob, entropy = pg_error(pg_data(logit, action, minus_one), group, vocab_start=vocab_start, weight=keep,
                                 reduction="none", temperature=temperature)
    return torch.where(keep, log_prob, 0), torch.where(keep, entropy, 0)


def _group_and_rank(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "pgext.distributed.pg_error needs an initialized process group: call "
            "torch.distributed.init_process_group first")
    group = group if group is not None else dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("pgext.distributed.pg_error: this process is not a member of the given group")
    return group, rank


def _group_device(group) -> torch.device:
    # Only for a rank whose logit is not a tensor, or one on meta: the header
    # still has to go where the backend can send it.
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _vocab_start(vocab_start, rank: int, logit: torch.Tensor) -> int:
    if vocab_start is None:
        return rank * (logit.shape[-1] if logit.dim() else 0)
    if isinstance(vocab_start, bool):
        raise TypeError("pg_error: vocab_start must be an int, got bool")
    try:
        value = operator.index(vocab_start)
    except TypeError:
        raise TypeError(f"pg_error: vocab_start must be an int, got {type(vocab_start).__name__}") from None
    if not 0 <= value < 2**63:  # it travels to the other ranks as an int64
        raise ValueError(f"pg_error: vocab_start must be in [0, 2**63), got {value}")
    return value


def _check_tensors(logit, action, return_, weight, reduction: str) -> torch.dtype:
    """pg_error's own shape and dtype checks, run by its Meta kernel (no data
    is read); returns the losses' dtype."""
    require_device("pg_error", ("logit", logit), (("action", action), ("return_", return_), ("weight", weight)))

    def meta(t):
        return None if t is None else torch.empty_like(t, device="meta")

    policy = torch.ops.pgext.pg_error_forward(meta(logit), meta(action), meta(return_), meta(weight), reduction)[0]
    return policy.dtype


def _collective(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        if hasattr(e, "add_note"):  # Python 3.11+
            e.add_note(f"pgext.distributed.pg_error: {what} failed (a rank left, crashed, skipped the call, "
                       "or the group's timeout passed)")
        raise


def _global_row_stats(logit, action, vocab_start: int, group, temperature: float):
    """The whole rows' lse (float64), entropy and log-probability of the
    action (accumulation dtype) of logit / temperature, from this shard and
    two all-reduces; pg_math.md has the algebra."""
    local_max, sum_exp, shifted_sum, action_logit = torch.ops.pgext.pg_row_stats(
        logit, action, vocab_start, temperature)
    row_max = local_max.clone()
    _collective("the all-reduce (MAX) of the row maxima", dist.all_reduce, row_max, dist.ReduceOp.MAX, group)

    # A shard whose row is all -inf (max -inf, sums 0) contributes nothing; a
    # row masked on every shard gets no rescaling at all (-inf - -inf is NaN).
    # The where() keeps 0 * -inf out of the sums; NaN logits still propagate.
    shift = local_max - row_max
    scale = torch.exp(shift)
    empty = (scale == 0) | (row_max == float("-inf"))
    packed = torch.stack((
        torch.where(empty, 0.0, scale * sum_exp),
        torch.where(empty, 0.0, scale * (shifted_sum + shift * sum_exp)),
        action_logit,
    ))
    _collective("the all-reduce (SUM) of the rescaled sums", dist.all_reduce, packed, dist.ReduceOp.SUM, group)
    total, shifted, x_action = packed.unbind(0)
    log_total = torch.log(total)
    # the kernels' form (row_math.h): log p(a) = (x_a - max) - log S, and the
    # lse saved for backward in float64, exact whatever the logits' magnitude
    log_prob = (x_action - row_max) - log_total
    lse = row_max.double() + log_total.double()
    return lse, log_total - shifted / total, log_prob


def _reduce(rows: torch.Tensor, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    if reduction == "none":
        return rows.to(dtype)
    if rows.numel() == 0:
        total = rows.new_zeros((), dtype=torch.float64)
    else:
        # sample order in float64: every rank gets the same bits whatever its
        # thread count
        total = rows.reshape(-1).double().cumsum(0)[-1]
    if reduction == "mean":
        total = total / rows.numel()
    return total.to(dtype)


class _ShardPgError(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logit, return_, weight, action, vocab_start, reduction, group, loss_dtype, temperature):
        if action.numel():
            lse, entropy, log_prob = _global_row_stats(logit, action, vocab_start, group, temperature)
        else:  # every rank has checked that all ranks are empty: no collective
            entropy = log_prob = torch.empty(action.shape, dtype=_acc(logit), device=logit.device)
            lse = torch.empty(action.shape, dtype=torch.float64, device=logit.device)
        acc = entropy.dtype
        w = weight.to(acc) if weight is not None else torch.ones((), dtype=acc, device=lse.device)
        # the kernels' association, -w * R * log_prob
        policy_rows = -w * return_.to(acc) * log_prob
        entropy_rows = w * entropy
        ctx.save_for_backward(logit, action, return_, weight, lse, entropy, log_prob)
        ctx.vocab_start, ctx.reduction, ctx.temperature = vocab_start, reduction, temperature
        return _reduce(policy_rows, reduction, loss_dtype), _reduce(entropy_rows, reduction, loss_dtype)

    @staticmethod
    def backward(ctx, grad_policy, grad_entropy):
        if torch.is_grad_enabled():
            # A second derivative would need the other shards (lse couples
            # them) and so collectives inside backward: refuse rather than
            # hand back a gradient that silently acts as a constant.
            raise RuntimeError(
                "pgext.distributed.pg_error does not support create_graph=True (second-order gradients); "
                "pgext.pg_error on unsharded logits does")
        logit, action, return_, weight, lse, entropy, log_prob = ctx.saved_tensors
        need_logit, need_ret, need_weight = ctx.needs_input_grad[:3]
        grad_logit = grad_ret = grad_weight = None
        if need_logit:
            grad_logit = torch.ops.pgext.pg_grad_from_stats(
                grad_policy, grad_entropy, logit, action, return_, weight, lse, entropy, ctx.reduction,
                ctx.vocab_start, ctx.temperature)
        if need_ret or need_weight:
            # as pgext.pg_error's C++ autograd, summed back to the shape of a
            # broadcast return_ or weight
            acc = entropy.dtype
            g_pol = _per_sample(grad_policy.to(acc), ctx.reduction, action)
            if need_ret:
                w = weight.to(acc) if weight is not None else torch.ones((), dtype=acc, device=lse.device)
                grad_ret = (-g_pol * w * log_prob).sum_to_size(return_.shape).to(return_.dtype)
            if need_weight:
                g_ent = _per_sample(grad_entropy.to(acc), ctx.reduction, action)
                grad_weight = (-g_pol * return_.to(acc) * log_prob + g_ent * entropy).sum_to_size(
                    weight.shape).to(weight.dtype)
        return grad_logit, grad_ret, grad_weight, None, None, None, None, None, None


def _per_sample(grad: torch.Tensor, reduction: str, action: torch.Tensor) -> torch.Tensor:
    return grad / action.numel() if reduction == "mean" else grad


def _acc(logit: torch.Tensor) -> torch.dtype:
    return torch.float64 if logit.dtype == torch.float64 else torch.float32
