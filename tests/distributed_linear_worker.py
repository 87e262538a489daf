"""What the spawned ranks of tests/test_distributed_linear.py run.

A case's inputs are a pure function of (case, world size): the parent rebuilds
the whole output layer that the ranks split, computes the single-device
composition itself and compares. Each rank saves its outputs, gradients and
the errors it raised to ``<out>/rank<r>.pt``; the parent asserts.
"""
from __future__ import annotations

import datetime
import os
import traceback
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

import pgext
import pgext.distributed

V = 20
H = 12
SHAPE = (5, 6)  # 30 tokens
IGNORE = -100
# uneven, with a one-class shard for world 3; EQUAL goes with the default vocab_start
SPLITS = {1: [V], 2: [7, 13], 3: [1, 12, 7]}
EQUAL = {1: [V], 2: [10, 10], 3: [7, 7, 7]}  # 21 classes for world 3


class Case(NamedTuple):
    name: str
    dtype: torch.dtype
    bias: bool
    temperature: float
    chunk_size: Optional[int]  # None: the default
    equal: bool = False        # equal shards and the default vocab_start
    ignore: bool = True        # padding with ignore_index=-100


CASES = [
    Case("float64-bias-uneven-chunk7", torch.float64, True, 0.7, 7),
    Case("float32-bias-uneven-chunk4", torch.float32, True, 1.3, 4),
    Case("float32-no-bias-equal-default-chunk", torch.float32, False, 1.0, None, equal=True, ignore=False),
]


def layout(world: int, equal: bool = False):
    splits = (EQUAL if equal else SPLITS)[world]
    return splits, [sum(splits[:i]) for i in range(world)]


def inputs(case: Case, world: int):
    """The whole layer and batch: (input, weight, bias or None, action, upstream gradients of both outputs)."""
    splits, starts = layout(world, case.equal)
    n = sum(splits)
    g = torch.Generator().manual_seed(len(case.name))
    x = torch.randn(*SHAPE, H, generator=g, dtype=torch.float64)
    weight = torch.randn(n, H, generator=g, dtype=torch.float64) * 0.5
    bias = torch.randn(n, generator=g, dtype=torch.float64) if case.bias else None
    action = torch.empty(SHAPE, dtype=torch.long).reshape(-1)
    for r in range(action.numel()):  # every shard holds some actions
        s = r % world
        action[r] = starts[s] + (3 * r) % splits[s]
    action = action.reshape(SHAPE)
    if case.ignore:
        action[0, 1] = action[3, 5] = action[4, 0] = IGNORE
    ups = torch.randn(2, *SHAPE, generator=g, dtype=torch.float64)
    cast = (lambda t: None if t is None else t.to(case.dtype))
    acc = torch.float64 if case.dtype == torch.float64 else torch.float32
    return cast(x), cast(weight), cast(bias), action, ups.to(acc)


def _run(case: Case, rank: int, world: int):
    splits, starts = layout(world, case.equal)
    x, weight, bias, action, ups = inputs(case, world)
    rows = slice(starts[rank], starts[rank] + splits[rank])
    x = x.clone().requires_grad_()
    w = weight[rows].clone().requires_grad_()
    b = None if bias is None else bias[rows].clone().requires_grad_()
    log_prob, entropy = pgext.distributed.linear_log_prob_entropy(
        x, w, action, linear_bias=b, vocab_start=None if case.equal else starts[rank], temperature=case.temperature,
        ignore_index=IGNORE if case.ignore else None, chunk_size=case.chunk_size)
    torch.autograd.backward([log_prob, entropy], [ups[0], ups[1]])
    return {"log_prob": log_prob.detach(), "entropy": entropy.detach(), "input": x.grad, "weight": w.grad,
            "bias": None if b is None else b.grad}


def _outcome(call):
    try:
        call()
    except Exception as e:  # noqa: BLE001 - the parent asserts on the type
        return type(e).__name__, str(e)
    return None


def _errors(rank: int, world: int):
    """Bad calls, each made by every rank at once; the group must stay in step."""
    case = CASES[1]
    splits, starts = layout(world)
    x, weight, bias, action, _ = inputs(case, world)
    rows = slice(starts[rank], starts[rank] + splits[rank])
    w, b = weight[rows], bias[rows]
    last = rank == world - 1

    def call(x=x, w=w, action=action, **kw):
        kw.setdefault("vocab_start", starts[rank])
        kw.setdefault("linear_bias", b)
        kw.setdefault("ignore_index", IGNORE)
        return lambda: pgext.distributed.linear_log_prob_entropy(x, w, action, **kw)

    other_x = x.clone()
    other_x[2, 3, 4] += 1
    big = action.clone()
    big[1, 2] = sum(splits)
    return {
        "hidden_mismatch": call(w=w[:, :-1] if last else w),
        "bias_shape": call(linear_bias=b[:-1] if last else b),
        "chunk_size_zero": call(chunk_size=0),
        "temperature_zero": call(temperature=0.0),
        "temperature_nan": call(temperature=float("nan")),
        "temperature_differs": call(temperature=2.0 if last else 1.0),
        "chunk_size_differs": call(chunk_size=5 if last else 4),
        "bias_on_one_rank": call(linear_bias=None if last else b),
        "input_differs": call(x=other_x if last else x),
        "action_too_big": call(action=big),
        "tiling": call(vocab_start=None),
    }


def worker(rank: int, world: int, store: str, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    result = {}
    try:
        result["values"] = {case.name: _run(case, rank, world) for case in CASES}
        result["errors"] = {name: _outcome(call) for name, call in _errors(rank, world).items()}
        result["after_errors"] = _run(CASES[0], rank, world)  # the same group: still in step
    except Exception:  # noqa: BLE001 - reported to the parent
        result["crash"] = traceback.format_exc()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
    # Everything is saved. Skip the interpreter's teardown: a spawned Gloo rank
    # aborts there about once in twenty runs ("terminate called without an
    # active exception", after the results are written), which mp.spawn would
    # report as a failed rank.
    os._exit(0)
