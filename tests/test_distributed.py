"""pgext.distributed.pg_error on Gloo process groups, against pgext.pg_error on the gathered logits.

Spawning ranks costs seconds, so each world size is spawned once and runs
every case (tests/distributed_worker.py); the tests here only compare what
the ranks saved with what this process computes on the full logits.
"""
from __future__ import annotations

import datetime
import math
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed_worker as W
import pgext
import pgext.distributed
from conftest import (
    ROOT,
    TOL,
    acc_dtype,
    assert_close,
    evaluate,
    grad_scales,
    least_precise,
    make_inputs,
    pgext_fn,
    subprocess_env,
    value_scale,
)

pytestmark = pytest.mark.slow
CASES = {c.name: c for c in W.cases(2)}


def _spawn(world, out_dir, scenario="main", timeout=60.0, events=None):
    os.makedirs(out_dir, exist_ok=True)
    store = os.path.join(out_dir, "store")
    mp.spawn(W.worker, args=(world, store, str(out_dir), scenario, timeout, events), nprocs=world, join=True)
    ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    for r, res in enumerate(ranks):
        assert "crash" not in res, f"rank {r} crashed:\n{res.get('crash')}"
    return ranks


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """One spawned group per world size, shared by every test of the module."""
    runs = {}

    def run(world):
        if world not in runs:
            runs[world] = _spawn(world, tmp_path_factory.mktemp(f"world{world}"))
        return runs[world]
    return run


def _same(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _compare(got, case, world, inp=None):
    """Every rank's result (W.evaluate's Result) against pgext.pg_error on the full logits."""
    inp = inp if inp is not None else W.case_inputs(case, world)
    want = evaluate(pgext_fn, inp, reduction=case.reduction, wrt=W.wrt(case))
    acc = acc_dtype(inp.logit.dtype)
    # two float32 computations, each within TOL of the truth
    loose = {k: 2 * v for k, v in TOL[least_precise(want.policy.dtype, acc)].items() if k != "floor"}
    for r, res in enumerate(got):
        for name in ("policy", "entropy"):
            a, e = getattr(res, name), getattr(want, name)
            assert _same(a, getattr(got[0], name)), f"rank {r}'s {name} differs from rank 0's"
            assert a.dtype == e.dtype and a.shape == e.shape
            assert_close(a, e, scale=value_scale(inp, case.reduction), what=f"rank {r} {name}_loss", **loose)
    scales = grad_scales(inp, case.reduction, want.upstream)
    _, starts = W.layout(world, case)
    order = sorted(range(world), key=lambda r: starts[r])
    grad_logit = torch.cat([got[r].grads["logit"] for r in order], -1)
    for name, e in want.grads.items():
        tol = {k: 2 * v for k, v in TOL[least_precise(getattr(inp, name).dtype, acc)].items() if k != "floor"}
        for r, res in enumerate(got):
            a = grad_logit if name == "logit" else res.grads[name]
            assert a.dtype == e.dtype, f"grad of {name}: {a.dtype} != {e.dtype}"
            assert_close(a, e, scale=scales[name], floor=scales.get(name + "_floor"), what=f"rank {r} grad of {name}",
                         **tol)


# ---------------------------------------------------------------------- values and gradients
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("world", [2, 3])
def test_matches_single_device(world, name, spawned):
    _compare([res["values"][name] for res in spawned(world)], CASES[name], world)


@pytest.mark.parametrize("temperature", W.TEMPERATURES)
@pytest.mark.parametrize("world", [2, 3])
def test_log_prob_entropy_matches_single_device(world, temperature, spawned):
    """pgext.distributed.log_prob_entropy (padding ignored, at a sampling
    temperature) against pgext.log_prob_entropy on the gathered logits:
    values and each shard's gradient."""
    logit, action, ups = W.log_prob_entropy_inputs(world)
    full = logit.clone().requires_grad_()
    want = pgext.log_prob_entropy(full, action, ignore_index=-100, temperature=temperature)
    torch.autograd.backward(list(want), [ups[0], ups[1]])
    if temperature != 1.0:  # the temperature reaches the shards: not the values at 1
        plain = pgext.log_prob_entropy(logit, action, ignore_index=-100)[1]
        assert (plain - want[1]).abs().max() > 1e-3
    splits, starts = W.layout(world)
    for rank, res in enumerate(spawned(world)):
        log_prob, entropy, grad = res["log_prob_entropy"][temperature]
        torch.testing.assert_close(log_prob, want[0].detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(entropy, want[1].detach(), rtol=1e-5, atol=1e-5)
        assert log_prob[0, 1] == 0 and entropy[3, 3] == 0
        # float32 rounding of x / T - lse: the gradient carries 1 / T
        tol = 1 / min(temperature, 1.0)
        torch.testing.assert_close(grad, full.grad[..., starts[rank]:starts[rank] + splits[rank]], rtol=1e-5 * tol,
                                   atol=1e-6 * tol)


@pytest.mark.parametrize("world", [2, 3])
def test_masked_rows_are_exercised(world):
    # the inputs really have what the cases claim: a row with no finite logit in one shard
    # (but a finite action logit), actions in every shard, and a row masked everywhere
    splits, starts = W.layout(world)
    inp = W.case_inputs(CASES["float32-mean-weighted-uneven"], world)
    rows = inp.logit.reshape(-1, W.N)
    action = inp.action.reshape(-1)
    owner = [max(s for s in range(world) if starts[s] <= a) for a in action.tolist()]
    assert set(owner) == set(range(world))
    assert torch.isneginf(rows[0, starts[1]:starts[1] + splits[1]]).all() and torch.isfinite(rows[0, action[0]])
    assert torch.isneginf(rows).any(-1).float().mean() > 0.5
    masked = W.case_inputs(CASES["float64-none-masked-row"], world).logit
    assert torch.isneginf(masked[-1]).all() and torch.isfinite(masked[:-1]).any(-1).all()


@pytest.mark.parametrize("world", [2, 3])
def test_fully_masked_row_is_nan_like_single_device(world, spawned):
    got = spawned(world)[0]["values"]["float64-none-masked-row"]
    assert torch.isnan(got.policy[-1]) and torch.isnan(got.entropy[-1])
    assert torch.isfinite(got.policy[:-1]).all() and torch.isfinite(got.entropy[:-1]).all()


@pytest.mark.parametrize("world", [2, 3])
def test_group_still_in_step_after_errors(world, spawned):
    case = W.cases(world)[0]
    _compare([res["after_errors"] for res in spawned(world)], case, world)


# ---------------------------------------------------------------------- bad input
def _everywhere(kind, pattern):
    return lambda rank, world: (kind, pattern)


def _one_rank(rank_of, kind, pattern):
    """The rank at fault raises its own error; the others say which rank it was."""
    def expect(rank, world):
        bad = rank_of(world)
        if rank == bad:
            return kind, pattern
        return "ValueError", rf"rank\(s\) \[{bad}\] of the group rejected their inputs"
    return expect


ERRORS = {
    "rows": _everywhere("ValueError", r"same samples .*samples per rank \[6, (6, )?5\]"),
    "default_start_uneven": _everywhere("ValueError", r"must tile the classes .*pass vocab_start="),
    "overlap": _everywhere("ValueError", r"without gaps or overlaps, got rank 0: \[0, "),
    "action_too_big": _everywhere("ActionOutOfRangeError", r"action 20 \(sample 4\) is out of range for N = 20 classes"),
    "action_negative": _everywhere("ActionOutOfRangeError", r"action -3 \(sample 2\) is out of range for N = 20 classes"),
    "actions_differ": _everywhere("ValueError", r"action must be identical on every rank"),
    "returns_differ": _everywhere("ValueError", r"return_ must be identical on every rank"),
    "weight_on_one_rank": _everywhere("ValueError", r"weight \(given or None\) must be identical"),
    "dtype_differs": _everywhere("ValueError", r"same dtype on every rank, got \[float32, .*float64\]"),
    "reduction_differs": _everywhere("ValueError", r"same reduction, got \[mean, .*sum\]"),
    "bad_reduction": _everywhere("ValueError", r"reduction must be 'mean', 'sum' or 'none', got 'avg'"),
    "bad_temperature": _one_rank(lambda w: w - 1, "ValueError", r"temperature must be a finite number > 0, got 0.0"),
    "local_shape_error": _one_rank(lambda w: w - 1, "ValueError", r"return_ must have the shape of action \[6\]"),
    "local_type_error": _one_rank(lambda w: w - 1, "TypeError", r"logit must be a torch.Tensor, got str"),
    "meta_logit": _one_rank(lambda w: w - 1, "ValueError", r"logit is on meta, which holds no data"),
    "negative_vocab_start": _one_rank(lambda w: 0, "ValueError", r"vocab_start must be in \[0, 2\*\*63\), got -1"),
    "huge_vocab_start": _one_rank(lambda w: w - 1, "ValueError",
                                  r"vocab_start must be in \[0, 2\*\*63\), got 9223372036854775808"),
}


@pytest.mark.parametrize("name", list(ERRORS))
@pytest.mark.parametrize("world", [2, 3])
def test_bad_input_raises_on_every_rank(world, name, spawned):
    for rank, res in enumerate(spawned(world)):
        outcome = res["errors"][name]
        assert outcome is not None, f"rank {rank}: {name} raised nothing"
        kind, pattern = ERRORS[name](rank, world)
        assert outcome[0] == kind, f"rank {rank}: {outcome}"
        assert re.search(pattern, outcome[1]), f"rank {rank}: {outcome[1]!r} does not match {pattern!r}"


def test_process_group_failure_is_an_error_within_the_timeout(tmp_path):
    timeout = 3.0
    ctx = mp.get_context("spawn")
    events = (ctx.Event(), ctx.Event())
    res = _spawn(2, tmp_path, "failure", timeout, events)[0]["failure"]
    for name in ("skipped", "exited"):  # rank 1 alive but not calling; rank 1 gone
        outcome, elapsed = res[name]
        assert outcome is not None, f"{name}: no error"
        assert "RuntimeError" in outcome[2], outcome
        assert "the all-gather of the shard headers failed" in outcome[1], outcome[1]
        assert elapsed < timeout + 10, f"{name}: error after {elapsed:.1f} s"
    assert res["skipped"][1] >= timeout * 0.8  # it was the timeout that ended the wait


def test_fingerprints_tell_values_and_their_order_apart():
    """The cross-rank check compares action, return_ and weight by an int64
    fingerprint: a changed value or two swapped values must change it (a
    linear checksum with small coefficients missed swaps 1021 rows apart)."""
    from pgext._shard_check import _fingerprint

    assert _fingerprint(torch.tensor([3, 5, 1, 1])) != _fingerprint(torch.tensor([5, 4, 1, 1]))
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 1000, (3000,), generator=g)
    seen = {int(_fingerprint(base))}
    for i in range(300):
        changed = base.clone()
        changed[i * 10] = (changed[i * 10] + 1 + i) % 1000
        swapped = base.clone()
        j, k = i, (i + 1 + 7 * i) % 3000
        if swapped[j] == swapped[k]:
            continue
        swapped[j], swapped[k] = base[k], base[j]
        for t in (changed, swapped):
            digest = int(_fingerprint(t))
            assert digest not in seen, (i, digest)
            seen.add(digest)
    swap_1021 = torch.arange(1100)
    swap_1021[[0, 1021]] = swap_1021[[1021, 0]]
    assert _fingerprint(swap_1021) != _fingerprint(torch.arange(1100))
    for dtype in (torch.float16, torch.float32, torch.float64):
        x = torch.randn(7, 5, generator=g).to(dtype)
        assert _fingerprint(x.t()) == _fingerprint(x.t().contiguous())  # values in flat order, not memory
        assert _fingerprint(torch.zeros(3, dtype=dtype)) != _fingerprint(-torch.zeros(3, dtype=dtype))  # bits
    big = torch.full((1 << 20,), -1, dtype=torch.long)  # every term near 2**31: the sum stays exact
    assert 0 < int(_fingerprint(big)) < (1 << 20) * (1 << 31)


# ---------------------------------------------------------------------- data parallel
def test_ddp_two_processes_match_one_process_on_the_whole_batch(spawned):
    ranks = spawned(2)
    model, obs, action, return_ = W.ddp_problem()
    W.ddp_loss(model, obs, action, return_).backward()
    want = [p.grad for p in model.parameters()]
    for rank, res in enumerate(ranks):
        assert len(res["ddp"]) == len(want) == 2
        for i, (g, e) in enumerate(zip(res["ddp"], want)):
            assert_close(g, e, rtol=1e-12, atol=1e-14, what=f"rank {rank} DDP gradient {i}")
            assert torch.equal(g, ranks[0]["ddp"][i])


# ---------------------------------------------------------------------- one rank, in this process
@pytest.fixture
def world1(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=30))
    yield
    dist.destroy_process_group()


def test_needs_an_initialized_group():
    assert not dist.is_initialized()
    inp = make_inputs((3,), 5)
    with pytest.raises(RuntimeError, match="init_process_group"):
        pgext.distributed.pg_error(inp.data)


def test_one_rank_is_the_single_device_op(world1):
    for shape, N, dtype, red in (((4,), 9, torch.float32, "mean"), ((2, 3), 5, torch.float64, "none"),
                                 ((), 6, torch.float64, "sum"), ((3,), 1, torch.float16, "mean")):
        inp = make_inputs(shape, N, dtype, seed=N, mask=0.3, weight=True)
        case = W.Case("one-rank", shape, dtype, red)
        got = evaluate(lambda d, **kw: pgext.distributed.pg_error(pgext.pg_data(*d), **kw), inp, reduction=red)
        _compare([got], case, 1, inp)


def test_double_backward_is_refused(world1):
    inp = make_inputs((4,), 6, torch.float64)
    logit = inp.logit.requires_grad_()
    loss = pgext.distributed.pg_error((logit, inp.action, inp.return_)).policy_loss
    with pytest.raises(RuntimeError, match="does not support create_graph=True"):
        torch.autograd.grad(loss, logit, create_graph=True)
    (g,) = torch.autograd.grad(loss, logit)  # the graph is intact: first order still works
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("bad, kind", [(True, TypeError), (1.5, TypeError), ("0", TypeError), (-2, ValueError)])
def test_vocab_start_is_checked(world1, bad, kind):
    inp = make_inputs((4,), 6)
    with pytest.raises(kind, match="vocab_start"):
        pgext.distributed.pg_error(inp.data, vocab_start=bad)


def test_a_shard_without_classes_is_refused(world1):
    inp = make_inputs((4,), 6)
    with pytest.raises(ValueError, match=r"rank 0's logit shard \(4, 0\) holds no classes"):
        pgext.distributed.pg_error((inp.logit[:, :0], inp.action, inp.return_))


def test_uint64_action_out_of_range_is_reported_as_passed(world1):
    inp = make_inputs((4,), 6)
    action = inp.action.to(torch.uint64)
    action[1] = 2**64 - 1
    with pytest.raises(pgext.ActionOutOfRangeError, match=r"action 18446744073709551615 \(sample 1\) is out of range for N = 6"):
        pgext.distributed.pg_error((inp.logit, action, inp.return_))


def test_no_grad_gives_the_same_losses(world1):
    inp = make_inputs((5,), 7, torch.float64, weight=True)
    a = pgext.distributed.pg_error(inp.data, weight=inp.weight)
    with torch.no_grad():
        b = pgext.distributed.pg_error(inp.data, weight=inp.weight)
    assert torch.equal(a.policy_loss, b.policy_loss) and torch.equal(a.entropy_loss, b.entropy_loss)
    assert isinstance(a, pgext.pg_loss)


# ---------------------------------------------------------------------- the README's torchrun example
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_example():
    # `torchrun --nproc-per-node 2 examples/vocab_parallel_torchrun.py`, as the README shows it; the
    # port comes through torchrun's own environment variable so that parallel runs do not collide
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "examples/vocab_parallel_torchrun.py"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(PET_MASTER_PORT=_free_port()),
                          capture_output=True, text=True, timeout=240)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-4000:] + out[-2000:]
    assert "rank 0/2: classes [0, 500) of 1000" in out and "rank 1/2: classes [500, 1000) of 1000" in out, out
    for loss in ("policy_loss", "entropy_loss"):
        m = re.search(rf"{loss}: sharded (\S+) single-device (\S+) \|diff\| (\S+)", out)
        assert m, out
        sharded, single, diff = map(float, m.groups())
        assert math.isfinite(sharded) and abs(sharded - single) <= 1e-5 * (1 + abs(single)) and diff < 1e-4
    assert "match: yes" in out, out
