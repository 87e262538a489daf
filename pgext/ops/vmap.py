"""Batching rules of pgext's ops for ``torch.func.vmap``.

Without them vmap runs each op once per batch entry (PyTorch's fallback, which
warns about it). The ops already take any number of leading dimensions, so a
vmapped call is one call on the whole batch: the vmapped dimension moves to the
front (inputs that do not have it are expanded) and becomes one more leading
dimension of the samples.

Reduction 'none' maps to itself. 'mean' and 'sum' reduce over all samples, so
they map to 'none' followed by a sum per batch entry: in float64, of per-sample
terms in the accumulation dtype (``return_`` and ``weight`` are promoted to it,
which makes the per-sample outputs that dtype), then divided by the sample
count and rounded once, as the op's own reduction does. Only the summation
order differs from one op call per entry. The backward ops map 'mean' and
'sum' to 'none' with the upstream gradient of each entry spread over its
samples (divided by the count for 'mean').

ppo_surrogate has no reduction 'none': its kernel returns only means over all
samples. Its rule forms the per-sample terms with ATen ops as the CPU kernel
does (accumulation dtype, float64 sums, rounded once) and takes one mean of
each per entry, approx_kl and clipfrac included; autograd differentiates those
ops, which follow the same conventions as the op's own gradients. Under
``vmap(grad(f))`` the op's C++ autograd runs inside vmap and calls
ppo_surrogate_forward, whose rule makes one kernel call on the whole batch for
the per-sample derivatives. ppo_value (PPO's value loss, also a mean over
all samples) and ppo_value_forward map the same way.

The fused output layer (linear_log_prob_entropy) batches in one call where
the layer is shared by the entries (the vmapped dimension is one more leading
dimension of input and action). A layer per entry, or a weight or bias
gradient per entry, is one call per entry: each is a vocabulary-sized GEMM,
so the loop costs nothing measurable.

Registered on import of pgext, for the installed and the JIT-loaded library.
"""
from __future__ import annotations

import functools
import math

import torch

_REDUCED = ("mean", "sum")


def _front(t, bdim, size):
    """t with the vmapped dimension first: moved there, or added by expanding
    (a view, no copy) when t does not have it."""
    if t is None:
        return None
    if bdim is None:
        return t.expand(size, *t.shape)
    return t.movedim(bdim, 0)


def _fronts(info, in_dims, tensors):
    """_front of each tensor. Trailing arguments left at their defaults do not
    reach a rule (nor have an in_dim), so in_dims may be shorter."""
    in_dims = tuple(in_dims) + (None,) * (len(tensors) - len(in_dims))
    return tuple(_front(t, d, info.batch_size) for t, d in zip(tensors, in_dims))


def _aligned(t, action):
    """A per-sample tensor (return_, weight) with the vmapped dimension first,
    padded with size-1 dimensions after it to action's rank: the ops broadcast
    it against action from the trailing dimension, and the vmapped dimension
    must meet action's."""
    if t is None or t.dim() == action.dim():
        return t
    return t.reshape(t.shape[:1] + (1,) * (action.dim() - t.dim()) + t.shape[1:])


def _acc_dtype(logit_dtype):
    return torch.float64 if logit_dtype == torch.float64 else torch.float32


def _at_least(t, dtype):
    return None if t is None else t.to(torch.promote_types(t.dtype, dtype))


def _reduce(rows, reduction, count, dtype):
    """Per-entry sum (or mean) of rows (B, *samples), in float64, rounded to dtype."""
    # flattened first: sum(dim=()) of entries of 0-d samples would sum over the batch too
    total = rows.reshape(rows.shape[0], math.prod(rows.shape[1:])).sum(dim=1, dtype=torch.float64)
    if reduction == "mean":
        total = total / count  # 0 / 0 = NaN: the mean of no samples
    return total.to(dtype)


def _loss_dtype(logit, ret, weight):
    dtype = torch.promote_types(logit.dtype, ret.dtype)
    return dtype if weight is None else torch.promote_types(dtype, weight.dtype)


def _samples_per_entry(action):
    return math.prod(action.shape[1:])


def _losses_rule(op, outputs: int):
    """The rule of pg_error (op returns the two losses) or pg_error_forward
    (and the per-sample lse and entropy, passed on as they are)."""
    out_dims = (0,) * outputs

    def rule(info, in_dims, logit, action, return_, weight=None, reduction="mean", temperature=1.0):
        logit, action, return_, weight = _fronts(info, in_dims, (logit, action, return_, weight))
        return_, weight = _aligned(return_, action), _aligned(weight, action)
        if reduction not in _REDUCED:
            return tuple(op(logit, action, return_, weight, reduction, temperature)), out_dims
        dtype = _loss_dtype(logit, return_, weight)
        acc = _acc_dtype(logit.dtype)
        policy, entropy, *per_sample = op(logit, action, _at_least(return_, acc), _at_least(weight, acc), "none",
                                          temperature)
        count = _samples_per_entry(action)
        return (_reduce(policy, reduction, count, dtype), _reduce(entropy, reduction, count, dtype),
                *per_sample), out_dims

    return rule


def _per_sample_grad(grad, reduction, action):
    """A reduced loss's upstream gradient (B,) as per-sample gradients of the
    actions' shape (B, *samples): what reduction 'none' takes."""
    if reduction not in _REDUCED:
        return grad
    if reduction == "mean":
        grad = grad / _samples_per_entry(action)
    return grad.reshape(grad.shape + (1,) * (action.dim() - 1)).expand(action.shape)


def _grad_args(info, in_dims, args, reduction):
    grad_policy, grad_entropy, logit, action, return_, weight, lse, entropy = _fronts(info, in_dims, args)
    return_, weight = _aligned(return_, action), _aligned(weight, action)
    if reduction in _REDUCED:
        grad_policy = _per_sample_grad(grad_policy, reduction, action)
        grad_entropy = _per_sample_grad(grad_entropy, reduction, action)
        reduction = "none"
    return (grad_policy, grad_entropy, logit, action, return_, weight, lse, entropy, reduction)


def _pg_error_backward(info, in_dims, grad_policy, grad_entropy, logit, action, return_, weight, lse, entropy,
                       reduction, temperature=1.0):
    args = (grad_policy, grad_entropy, logit, action, return_, weight, lse, entropy)
    return torch.ops.pgext.pg_error_backward(*_grad_args(info, in_dims, args, reduction), temperature), 0


def _pg_grad_from_stats(info, in_dims, grad_policy, grad_entropy, logit, action, return_, weight, lse, entropy,
                        reduction, vocab_start, temperature=1.0):
    args = (grad_policy, grad_entropy, logit, action, return_, weight, lse, entropy)
    return torch.ops.pgext.pg_grad_from_stats(*_grad_args(info, in_dims, args, reduction), vocab_start,
                                              temperature), 0


def _pg_row_stats(info, in_dims, logit, action, vocab_start=0, temperature=1.0):
    logit, action = _fronts(info, in_dims, (logit, action))
    return tuple(torch.ops.pgext.pg_row_stats(logit, action, vocab_start, temperature)), (0, 0, 0, 0)


def _surrogate_means(log_prob, old_log_prob, entropy, adv, weight, clip_ratio, dual_clip):
    """ppo_surrogate's four results per entry (B,), from inputs (B, *samples).
    Its kernel returns only means over all samples, so the per-sample terms
    are ATen ops here, formed as the CPU kernel forms them (in the
    accumulation dtype, summed in float64, rounded once): DI-engine's formula,
    whose autograd is the op's (the fused gradients follow it, ties included)."""
    tensors = (log_prob, old_log_prob, entropy, adv) + (() if weight is None else (weight,))
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    acc = _acc_dtype(dtype)
    lp, old, ent, a = (t.to(acc) for t in tensors[:4])
    ratio = torch.exp(lp - old)
    lo, hi = 1.0 - clip_ratio, 1.0 + clip_ratio
    objective = torch.minimum(ratio * a, ratio.clamp(lo, hi) * a)
    if dual_clip is not None:
        objective = torch.where(a < 0, torch.maximum(objective, dual_clip * a), objective)
    policy = -objective
    if weight is not None:
        w = weight.to(acc)
        policy, ent = policy * w, ent * w
    count = _samples_per_entry(log_prob)
    # approx_kl and clipfrac are statistics, without gradient in the op too
    with torch.no_grad():
        approx_kl = _reduce(old - lp, "mean", count, dtype)
        clipfrac = _reduce((ratio > hi) | (ratio < lo), "mean", count, torch.float32)
    return _reduce(policy, "mean", count, dtype), _reduce(ent, "mean", count, dtype), approx_kl, clipfrac


def _ppo_surrogate(info, in_dims, log_prob, old_log_prob, entropy, adv, weight=None, clip_ratio=0.2,
                   dual_clip=None):
    tensors = _fronts(info, in_dims, (log_prob, old_log_prob, entropy, adv, weight))
    # the op's own checks (shapes, dtypes, devices, clip bounds) and messages,
    # on no entry: the ATen ops below would broadcast or raise other errors
    with torch.no_grad():
        torch.ops.pgext.ppo_surrogate(*(None if t is None else t[:0] for t in tensors), clip_ratio, dual_clip)
    return _surrogate_means(*tensors, clip_ratio, dual_clip), (0, 0, 0, 0)


def _ppo_surrogate_forward(info, in_dims, log_prob, old_log_prob, entropy, adv, weight, clip_ratio, dual_clip):
    tensors = _fronts(info, in_dims, (log_prob, old_log_prob, entropy, adv, weight))
    *_, grad_log_prob, grad_entropy = torch.ops.pgext.ppo_surrogate_forward(*tensors, clip_ratio, dual_clip)
    # the kernel divides each sample's derivative by the whole batch's sample
    # count; an entry's mean divides by its own
    scale = info.batch_size
    return (*_surrogate_means(*tensors, clip_ratio, dual_clip), grad_log_prob * scale,
            grad_entropy * scale), (0,) * 6


def _value_means(value_new, value_old, return_, weight, clip_ratio, use_value_clip):
    """ppo_value's loss per entry (B,), from inputs (B, *samples): DI-engine's
    per-sample terms in the accumulation dtype, as the CPU kernel forms them,
    one mean per entry (summed in float64, rounded once); their autograd is
    the op's."""
    tensors = (value_new, value_old, return_) + (() if weight is None else (weight,))
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    acc = _acc_dtype(dtype)
    v_new, v_old, ret = (t.to(acc) for t in tensors[:3])
    err = (ret - v_new).pow(2)
    if use_value_clip:
        err = torch.max(err, (ret - (v_old + (v_new - v_old).clamp(-clip_ratio, clip_ratio))).pow(2))
    if weight is not None:
        err = err * weight.to(acc)
    return _reduce(0.5 * err, "mean", _samples_per_entry(value_new), dtype)


def _ppo_value(info, in_dims, value_new, value_old, return_, weight=None, clip_ratio=0.2, use_value_clip=True):
    tensors = _fronts(info, in_dims, (value_new, value_old, return_, weight))
    # the op's own checks and messages, on no entry (as _ppo_surrogate)
    with torch.no_grad():
        torch.ops.pgext.ppo_value(*(None if t is None else t[:0] for t in tensors), clip_ratio, use_value_clip)
    return _value_means(*tensors, clip_ratio, use_value_clip), 0


def _ppo_value_forward(info, in_dims, value_new, value_old, return_, weight, clip_ratio, use_value_clip):
    tensors = _fronts(info, in_dims, (value_new, value_old, return_, weight))
    _, grad_value_new = torch.ops.pgext.ppo_value_forward(*tensors, clip_ratio, use_value_clip)
    # the kernel divides by the whole batch's sample count; an entry's mean by its own
    return (_value_means(*tensors, clip_ratio, use_value_clip), grad_value_new * info.batch_size), (0, 0)


def _per_entry(op, info, dims, args):
    """op once per batch entry, outputs stacked: for calls one op call
    cannot batch (a linear_weight per entry; per-entry weight gradients).
    Each call of the fused output layer is a vocabulary-sized GEMM, so the
    loop's per-call overhead is negligible. dims has one entry per arg (a
    list argument's is a list)."""
    def entry(i):
        return (a.select(d, i) if isinstance(a, torch.Tensor) and d is not None else a for a, d in zip(args, dims))

    outs = [op(*entry(i)) for i in range(info.batch_size)]
    return tuple(torch.stack(parts) for parts in zip(*outs))


def _linear_rule(op, outputs: int):
    """linear_log_prob_entropy (and its forward kernel op): with the layer
    shared by the entries, the vmapped dimension is one more leading
    dimension of input and action, one call; a layer per entry loops."""
    out_dims = (0,) * outputs

    def rule(info, in_dims, input, linear_weight, action, linear_bias=None, temperature=1.0, ignore_index=None,
             chunk_size=None):
        args = (input, linear_weight, action, linear_bias, temperature, ignore_index, chunk_size)
        dims = tuple(in_dims) + (None,) * (len(args) - len(in_dims))
        if dims[1] is not None or dims[3] is not None:
            return _per_entry(op, info, dims, args), out_dims
        input, action = _fronts(info, (dims[0], dims[2]), (input, action))
        return tuple(op(input, linear_weight, action, linear_bias, temperature, ignore_index, chunk_size)), out_dims

    return rule


def _linear_backward(info, in_dims, grad_log_prob, grad_entropy, input, linear_weight, action, linear_bias, lse,
                     entropy, temperature, ignore_index, chunk_size, output_mask):
    """Each entry has a weight and bias gradient of its own, so one call
    serves only a shared layer whose input gradient alone is asked for."""
    op = torch.ops.pgext.linear_log_prob_entropy_backward
    args = (grad_log_prob, grad_entropy, input, linear_weight, action, linear_bias, lse, entropy, temperature,
            ignore_index, chunk_size, output_mask)
    dims = tuple(in_dims) + (None,) * (len(args) - len(in_dims))
    if dims[3] is None and dims[5] is None and not output_mask[1] and not output_mask[2]:
        per_row = _fronts(info, dims[:3] + dims[4:5] + dims[6:8],
                          (grad_log_prob, grad_entropy, input, action, lse, entropy))
        g_lp, g_ent, input, action, lse, entropy = per_row
        grads = op(g_lp, g_ent, input, linear_weight, action, linear_bias, lse, entropy, temperature, ignore_index,
                   chunk_size, output_mask)
        # the unasked gradients have shape (0,) per entry
        none = input.new_empty(info.batch_size, 0)
        return (grads[0], none, none.clone()), 0
    return _per_entry(op, info, dims, args), 0


_LIB = None


def register() -> None:
    """Registers the rules once (a library fragment kept alive here)."""
    global _LIB
    if _LIB is not None:
        return
    rules = {  # built here: the ops exist once the extension is loaded
        "pg_error": _losses_rule(torch.ops.pgext.pg_error, 2),
        "pg_error_forward": _losses_rule(torch.ops.pgext.pg_error_forward, 4),
        "pg_error_backward": _pg_error_backward,
        "pg_row_stats": _pg_row_stats,
        "pg_grad_from_stats": _pg_grad_from_stats,
        "ppo_surrogate": _ppo_surrogate,
        "ppo_surrogate_forward": _ppo_surrogate_forward,
        "ppo_value": _ppo_value,
        "ppo_value_forward": _ppo_value_forward,
        "linear_log_prob_entropy": _linear_rule(torch.ops.pgext.linear_log_prob_entropy, 2),
        "linear_log_prob_entropy_forward": _linear_rule(torch.ops.pgext.linear_log_prob_entropy_forward, 3),
        "linear_log_prob_entropy_backward": _linear_backward,
    }
    _LIB = torch.library.Library("pgext", "FRAGMENT")
    for name, rule in rules.items():
        torch.library.register_vmap(f"pgext::{name}", rule, lib=_LIB)


def unregister() -> None:
    """Removes the rules (vmap falls back to one call per entry): for
    benchmarks/vmap_ensemble.py, which compares the two."""
    global _LIB
    if _LIB is not None:
        _LIB._destroy()
        _LIB = None
