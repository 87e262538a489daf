"""What the spawned ranks of tests/test_distributed.py run.

The cases are a pure function of (world size, case name), so the parent test
process rebuilds exactly the full logits that the ranks split, computes the
single-device result itself and compares. A rank saves what it got (losses,
gradients, or the exception it raised) to ``<out>/rank<r>.pt``; all
assertions are made in the parent.
"""
from __future__ import annotations

import datetime
import math
import os
import time
import traceback
import zlib
from typing import NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist

import pgext
import pgext.distributed
from conftest import Inputs, evaluate, make_inputs

N = 20
# uneven on purpose, and a one-class shard for world 3; the equal splits go with the default vocab_start
SPLITS = {1: [N], 2: [7, 13], 3: [1, 12, 7]}
EQUAL = {1: [N], 2: [10, 10], 3: [7, 7, 7]}  # 21 classes for world 3


class Case(NamedTuple):
    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype
    reduction: str
    weight: bool = True
    equal: bool = False    # equal shards and the default vocab_start
    mask: str = "shards"   # "", "shards" (30% -inf, a row fully masked in each of two shards), "all_row"
    offset: float = 0.0    # added to the last shard: its max dominates the others' by far
    broadcast: bool = False  # return_ (B, 1) and weight (1, A) against (B, A) actions


def cases(world: int):
    out = []
    for dtype in (torch.float32, torch.float64):
        d = str(dtype).replace("torch.", "")
        for red in ("mean", "sum", "none"):
            out.append(Case(f"{d}-{red}-weighted-uneven", (6, 4), dtype, red))
            out.append(Case(f"{d}-{red}-default-start", (2, 3, 4), dtype, red, weight=False, equal=True, mask=""))
    out += [
        Case("float64-none-masked-row", (9,), torch.float64, "none", mask="all_row"),
        Case("float32-mean-masked-row", (9,), torch.float32, "mean", mask="all_row"),
        Case("float32-sum-large-logits", (8,), torch.float32, "sum", offset=1e4),
        Case("float32-mean-broadcast", (6, 4), torch.float32, "mean", broadcast=True),
        Case("float64-none-broadcast", (6, 4), torch.float64, "none", broadcast=True),
        Case("bfloat16-mean", (5, 3), torch.bfloat16, "mean"),
        Case("float32-mean-empty", (0, 3), torch.float32, "mean"),
        Case("float64-none-empty", (0,), torch.float64, "none"),
    ]
    return out


def layout(world: int, case: Optional[Case] = None):
    splits = (EQUAL if case is not None and case.equal else SPLITS)[world]
    starts = [sum(splits[:i]) for i in range(world)]
    return splits, starts


def case_inputs(case: Case, world: int) -> Inputs:
    """The full (unsplit) inputs of a case: actions fall in every shard, and
    a row fully masked in one shard keeps its action in another."""
    splits, starts = layout(world, case)
    n = sum(splits)
    inp = make_inputs(case.shape, n, torch.float64, seed=zlib.crc32(case.name.encode()) % 1000, mask=case.mask == "shards",
                      weight=case.weight)
    logit = inp.logit.clone().reshape(-1, n)
    action = inp.action.clone().reshape(-1)
    rows = action.numel()
    for r in range(rows):
        s = r % world
        action[r] = starts[s] + (3 * r) % splits[s]
        logit[r, action[r]] = 0.5 * r - 1
    if case.mask == "shards" and world > 1 and rows >= 2:
        for r, s in ((0, 1), (1, 0)):  # row 0's action is in shard 0, row 1's in shard 1
            logit[r, starts[s]:starts[s] + splits[s]] = -math.inf
    if case.mask == "all_row":
        logit[rows - 1] = -math.inf
    if case.offset:
        logit[:, starts[-1]:] += case.offset
        logit[:, :starts[-1]] += case.offset - 30
    cast = (lambda t: None if t is None else t.to(case.dtype))
    ret, weight = inp.return_, inp.weight
    if case.broadcast:
        ret, weight = ret[:, :1].clone(), weight[:1].clone()
    return Inputs(cast(logit.reshape(inp.logit.shape)), action.reshape(inp.action.shape), cast(ret), cast(weight))


def shard(inp: Inputs, start: int, size: int) -> Inputs:
    return inp._replace(logit=inp.logit[..., start:start + size].contiguous())


def wrt(case: Case):
    return ("logit", "return_", "weight") if case.weight else ("logit", "return_")


# ---------------------------------------------------------------------- DDP
def ddp_problem():
    """A linear policy and a batch of 12 observations, seeded."""
    g = torch.Generator().manual_seed(7)
    obs = torch.randn(12, 5, generator=g, dtype=torch.float64)
    action = torch.randint(0, 6, (12,), generator=g)
    return_ = torch.randn(12, generator=g, dtype=torch.float64)
    torch.manual_seed(3)
    model = torch.nn.Linear(5, 6).double()
    return model, obs, action, return_


def ddp_loss(model, obs, action, return_):
    loss = pgext.pg_error(pgext.pg_data(model(obs), action, return_))
    return loss.policy_loss - 0.01 * loss.entropy_loss


# ---------------------------------------------------------------------- the ranks
def _sharded_fn(group, vocab_start):
    def fn(data, *, weight=None, reduction="mean"):
        return pgext.distributed.pg_error(pgext.pg_data(*data), group, vocab_start=vocab_start, weight=weight,
                                          reduction=reduction)
    return fn


def _outcome(call):
    """What a call raised: (type name, message with its notes, names of the
    type's bases); None if it returned."""
    try:
        call()
    except Exception as e:  # noqa: BLE001 - the parent asserts on the type
        message = "\n".join([str(e), *getattr(e, "__notes__", [])])
        return type(e).__name__, message, [c.__name__ for c in type(e).__mro__]
    return None


def _error_cases(rank: int, world: int):
    """Bad calls, each made by every rank at once; the group must stay in step."""
    case = Case("errors", (6,), torch.float32, "mean")
    splits, starts = layout(world)
    inp = case_inputs(case, world)
    mine = shard(inp, starts[rank], splits[rank])
    last = rank == world - 1

    def call(data=None, vocab_start=starts[rank], **kw):
        d = data if data is not None else (mine.logit, mine.action, mine.return_)
        return lambda: pgext.distributed.pg_error(d, vocab_start=vocab_start, **kw)

    big = mine.action.clone()
    big[4] = N
    neg = mine.action.clone()
    neg[2] = -3
    other = mine.action.clone()
    other[5] = (other[5] + 1) % N
    ret = mine.return_.clone()
    ret[1] += 1
    return {
        "rows": call((mine.logit[:-1], mine.action[:-1], mine.return_[:-1]) if last else None),
        "default_start_uneven": call(vocab_start=None),
        "overlap": call(vocab_start=starts[rank] - 1 if last else starts[rank]),
        "action_too_big": call((mine.logit, big, mine.return_)),
        "action_negative": call((mine.logit, neg, mine.return_)),
        "actions_differ": call((mine.logit, other if last else mine.action, mine.return_)),
        "returns_differ": call((mine.logit, mine.action, ret if last else mine.return_)),
        "weight_on_one_rank": call(weight=torch.ones(6) if last else None),
        "local_shape_error": call((mine.logit, mine.action, mine.return_[:3] if last else mine.return_)),
        "local_type_error": call(("no logit", mine.action, mine.return_) if last else None),
        # a meta shard has no data to send: refused before the all-gather, on a device gloo can send
        "meta_logit": call((mine.logit.to("meta"), mine.action.to("meta"), mine.return_.to("meta")) if last else None),
        "dtype_differs": call((mine.logit.double() if last else mine.logit, mine.action, mine.return_)),
        "reduction_differs": call(reduction="sum" if last else "mean"),
        "bad_reduction": call(reduction="avg"),
        "bad_temperature": call(temperature=0.0 if last else 1.0),
        "negative_vocab_start": call(vocab_start=-1 if rank == 0 else starts[rank]),
        # too big for the int64 header: rejected before the all-gather too, the group stays in step
        "huge_vocab_start": call(vocab_start=2**63 if last else starts[rank]),
    }


def _value(case: Case, rank: int, world: int):
    splits, starts = layout(world, case)
    fn = _sharded_fn(None, None if case.equal else starts[rank])
    mine = shard(case_inputs(case, world), starts[rank], splits[rank])
    return evaluate(fn, mine, reduction=case.reduction, wrt=wrt(case))


def log_prob_entropy_inputs(world: int):
    """Full logits (6, 4, N), actions with padding (-100) and upstream gradients."""
    inp = case_inputs(Case("log-prob-entropy", (6, 4), torch.float32, "none"), world)
    action = inp.action.clone()
    action[0, 1] = action[3, 3] = -100
    g = torch.Generator().manual_seed(9)
    ups = torch.randn(2, 6, 4, generator=g)
    return inp.logit, action, ups


#: sampling temperatures of the log_prob_entropy scenario (1: the default)
TEMPERATURES = (1.0, 0.3, 2.5)


def _log_prob_entropy(rank: int, world: int):
    """This rank's (log_prob, entropy, shard gradient) of pgext.distributed.log_prob_entropy,
    per temperature."""
    splits, starts = layout(world)
    logit, action, ups = log_prob_entropy_inputs(world)
    out = {}
    for temperature in TEMPERATURES:
        mine = logit[..., starts[rank]:starts[rank] + splits[rank]].clone().requires_grad_()
        kw = {} if temperature == 1.0 else {"temperature": temperature}
        log_prob, entropy = pgext.distributed.log_prob_entropy(mine, action, vocab_start=starts[rank],
                                                               ignore_index=-100, **kw)
        torch.autograd.backward([log_prob, entropy], [ups[0], ups[1]])
        out[temperature] = (log_prob.detach(), entropy.detach(), mine.grad)
    return out


def _ddp(rank: int, world: int):
    model, obs, action, return_ = ddp_problem()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    rows = slice(rank * 12 // world, (rank + 1) * 12 // world)
    ddp_loss(ddp, obs[rows], action[rows], return_[rows]).backward()
    return [p.grad.clone() for p in model.parameters()]


def _failure(rank: int, world: int, timeout: float, events, save):
    """Rank 0 calls pg_error twice: while rank 1 is alive but skips the call
    (the group's timeout must end the wait), then after rank 1 has exited."""
    timed_out, exited = events
    case = Case("failure", (4,), torch.float32, "mean")
    splits, starts = layout(world)
    mine = shard(case_inputs(case, world), starts[rank], splits[rank])
    spare = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=timeout))
    if rank != 0:
        timed_out.wait(60)
        save({})
        exited.set()
        os._exit(0)
    out = {}
    for name, group in (("skipped", None), ("exited", spare)):
        if name == "exited":
            exited.wait(60)
            time.sleep(0.5)
        t0 = time.monotonic()
        err = _outcome(lambda: pgext.distributed.pg_error((mine.logit, mine.action, mine.return_), group,
                                                          vocab_start=starts[rank]))
        out[name] = (err, time.monotonic() - t0)
        timed_out.set()
    save({"failure": out})
    os._exit(0)  # the groups are broken: do not wait on their teardown


def worker(rank: int, world: int, store: str, out_dir: str, scenario: str, timeout: float = 60.0, events=None):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))
    result = {}

    def save(res):
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))

    try:
        if scenario == "failure":
            _failure(rank, world, timeout, events, save)
        result["values"] = {case.name: _value(case, rank, world) for case in cases(world)}
        result["log_prob_entropy"] = _log_prob_entropy(rank, world)
        result["errors"] = {name: _outcome(call) for name, call in _error_cases(rank, world).items()}
        # the same group, after all those errors: still in step
        result["after_errors"] = _value(cases(world)[0], rank, world)
        if world == 2:
            result["ddp"] = _ddp(rank, world)
    except Exception:  # noqa: BLE001 - reported to the parent
        result["crash"] = traceback.format_exc()
    save(result)
    dist.destroy_process_group()
    # Skip the interpreter's teardown, as tests/distributed_linear_worker.py does
    # (a Gloo rank can abort there after its results are saved).
    os._exit(0)
