"""pgext.distributed.linear_log_prob_entropy on Gloo process groups, against
pgext.log_prob_entropy(F.linear(input, W, b) / T, action) on the whole layer.

Each world size is spawned once (tests/distributed_linear_worker.py) and runs
every case; the tests compare what the ranks saved with what this process
computes on the gathered weight.
"""
from __future__ import annotations

import datetime
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import distributed_linear_worker as W
import pgext
import pgext.distributed

pytestmark = pytest.mark.slow
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-5)}


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    runs = {}

    def run(world):
        if world not in runs:
            out = tmp_path_factory.mktemp(f"linear_world{world}")
            mp.spawn(W.worker, args=(world, str(out / "store"), str(out)), nprocs=world, join=True)
            ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
            for r, res in enumerate(ranks):
                assert "crash" not in res, f"rank {r} crashed:\n{res['crash']}"
            runs[world] = ranks
        return runs[world]
    return run


def _reference(case, world):
    """Values and gradients of the single-device composition on the whole layer."""
    x, weight, bias, action, ups = W.inputs(case, world)
    x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    bias = None if bias is None else bias.clone().requires_grad_()
    out = pgext.log_prob_entropy(F.linear(x, weight, bias) / case.temperature, action,
                                 ignore_index=W.IGNORE if case.ignore else None)
    torch.autograd.backward(list(out), [ups[0], ups[1]])
    return out, x.grad, weight.grad, None if bias is None else bias.grad, action


def _compare(got, case, world):
    (log_prob, entropy), grad_x, grad_w, grad_b, action = _reference(case, world)
    splits, starts = W.layout(world, case.equal)
    tol = TOL[case.dtype]
    for rank, res in enumerate(got):
        for name, want in (("log_prob", log_prob), ("entropy", entropy)):
            assert torch.equal(res[name], got[0][name]), f"rank {rank}'s {name} differs from rank 0's"
            assert res[name].dtype == want.dtype and res[name].shape == want.shape
            torch.testing.assert_close(res[name], want.detach(), **tol, msg=lambda m: f"rank {rank} {name}: {m}")
        rows = slice(starts[rank], starts[rank] + splits[rank])
        grads = [("input", grad_x), ("weight", grad_w[rows])] + ([("bias", grad_b[rows])] if case.bias else [])
        for name, want in grads:
            torch.testing.assert_close(res[name], want, **tol, msg=lambda m: f"rank {rank} grad of {name}: {m}")
        assert res["bias"] is None or case.bias
    if case.ignore:
        ignored = action == W.IGNORE
        assert ignored.sum() == 3
        assert (got[0]["log_prob"][ignored] == 0).all() and (got[0]["entropy"][ignored] == 0).all()


@pytest.mark.parametrize("name", [c.name for c in W.CASES])
@pytest.mark.parametrize("world", [2, 3])
def test_matches_single_device(world, name, spawned):
    case = next(c for c in W.CASES if c.name == name)
    _compare([res["values"][name] for res in spawned(world)], case, world)


@pytest.mark.parametrize("world", [2, 3])
def test_group_still_in_step_after_errors(world, spawned):
    _compare([res["after_errors"] for res in spawned(world)], W.CASES[0], world)


def _everywhere(kind, pattern):
    return lambda rank, world: (kind, pattern)


def _last_rank(kind, pattern):
    """The rank at fault raises its own error; the others say which rank it was."""
    def expect(rank, world):
        if rank == world - 1:
            return kind, pattern
        return "ValueError", rf"rank\(s\) \[{world - 1}\] of the group rejected their inputs"
    return expect


ERRORS = {
    "hidden_mismatch": _last_rank("ValueError", r"linear_weight must have shape \(V_local, H\) with H = input"
                                                r".shape\[-1\] = 12, got \(\d+, 11\)"),
    "bias_shape": _last_rank("ValueError", r"linear_bias must have shape \(V_local,\) = \(\d+,\), got \(\d+,\)"),
    "chunk_size_zero": _everywhere("ValueError", r"chunk_size must be a positive int, got 0"),
    "temperature_zero": _everywhere("ValueError", r"temperature must be positive and finite, got 0.0"),
    "temperature_nan": _everywhere("ValueError", r"temperature must be positive and finite, got nan"),
    "temperature_differs": _everywhere("ValueError", r"same temperature, got \[1.0, (1.0, )?2.0\]"),
    "chunk_size_differs": _everywhere("ValueError", r"same chunk_size .*got \[4, (4, )?5\]"),
    "bias_on_one_rank": _everywhere("ValueError", r"linear_bias must be given on every rank or on none"),
    "input_differs": _everywhere("ValueError", r"input must be identical on every rank"),
    "action_too_big": _everywhere("ActionOutOfRangeError",
                                  r"^linear_log_prob_entropy: action 20 \(sample 8\) is out of range for N = 20"),
    "tiling": _everywhere("ValueError", r"^linear_log_prob_entropy: the linear_weight shards must tile"),
}


@pytest.mark.parametrize("world", [2, 3])
def test_bad_input_raises_on_every_rank(world, spawned):
    for rank, res in enumerate(spawned(world)):
        for name, expect in ERRORS.items():
            outcome = res["errors"][name]
            assert outcome is not None, f"rank {rank}: {name} raised nothing"
            kind, pattern = expect(rank, world)
            assert outcome[0] == kind, f"rank {rank}, {name}: {outcome}"
            assert re.search(pattern, outcome[1]), f"rank {rank}, {name}: {outcome[1]!r} does not match {pattern!r}"


# ---------------------------------------------------------------------- one rank, in this process
@pytest.fixture
def world1(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=30))
    yield
    dist.destroy_process_group()


def test_one_rank_bfloat16_and_no_grad(world1):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 9, 8, generator=g).bfloat16().requires_grad_()
    w = torch.randn(33, 8, generator=g).bfloat16().requires_grad_()
    action = torch.randint(0, 33, (4, 9), generator=g)
    log_prob, entropy = pgext.distributed.linear_log_prob_entropy(x, w, action, temperature=2.0, chunk_size=5)
    (log_prob.sum() + entropy.sum()).backward()
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = pgext.log_prob_entropy(F.linear(xr, wr) / 2.0, action)
    (want[0].sum() + want[1].sum()).backward()
    assert log_prob.dtype == entropy.dtype == torch.float32
    for a, e in ((log_prob, want[0]), (entropy, want[1]), (x.grad, xr.grad), (w.grad, wr.grad)):
        assert a.dtype in (torch.float32, torch.bfloat16)
        torch.testing.assert_close(a.double(), e.detach(), rtol=0.05, atol=0.05)
    with torch.no_grad():
        again = pgext.distributed.linear_log_prob_entropy(x, w, action, temperature=2.0, chunk_size=5)
    assert torch.equal(again[0], log_prob.detach()) and torch.equal(again[1], entropy.detach())


@pytest.mark.parametrize("kwargs, kind, pattern", [
    (dict(linear_bias="b"), TypeError, r"linear_bias must be a torch.Tensor or None, got str"),
    (dict(temperature=True), TypeError, r"temperature must be a real number, got bool"),
    (dict(temperature=-1.0), ValueError, r"temperature must be positive and finite, got -1.0"),
    (dict(temperature=float("inf")), ValueError, r"temperature must be positive and finite, got inf"),
    (dict(chunk_size=2.5), TypeError, r"chunk_size must be an int or None, got float"),
    (dict(chunk_size=-3), ValueError, r"chunk_size must be a positive int, got -3"),
    (dict(ignore_index=1.5), TypeError, r"ignore_index must be an int or None, got float"),
    (dict(action=torch.zeros(3, 4)), TypeError, r"action must be an integer tensor, got torch.float32"),
    (dict(action=torch.zeros(4, 3, dtype=torch.long)), ValueError,
     r"action must have shape input.shape\[:-1\] = \(3, 4\)"),
    (dict(weight=torch.zeros(5, 6, dtype=torch.float64)), TypeError,
     r"linear_weight is torch.float64 but input is torch.float32"),
    (dict(weight=torch.zeros(0, 6)), ValueError, r"holds no classes"),
])
def test_bad_arguments_name_the_value(world1, kwargs, kind, pattern):
    args = dict(input=torch.randn(3, 4, 6), weight=torch.randn(5, 6), action=torch.zeros(3, 4, dtype=torch.long))
    args.update((k, kwargs.pop(k)) for k in ("action", "weight") if k in kwargs)
    with pytest.raises(kind, match=pattern):
        pgext.distributed.linear_log_prob_entropy(args["input"], args["weight"], args["action"], **kwargs)


def test_double_backward_is_refused(world1):
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    log_prob, _ = pgext.distributed.linear_log_prob_entropy(x, w, torch.tensor([0, 3, 6]))
    with pytest.raises(RuntimeError, match="does not support create_graph=True"):
        torch.autograd.grad(log_prob.sum(), x, create_graph=True)


def test_autocast_leaves_the_products_in_the_inputs_dtype(world1):
    """Backward recomputes the logits outside forward's autocast state: both
    run in the inputs' dtype, so autocast changes nothing."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 6, generator=g, requires_grad=True)
    w = torch.randn(9, 6, generator=g, requires_grad=True)
    action = torch.randint(0, 9, (7,), generator=g)
    grads = []
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = pgext.distributed.linear_log_prob_entropy(x, w, action, chunk_size=3)
        grads.append((out, torch.autograd.grad(out[0].sum() + out[1].sum(), (x, w))))
    (plain, plain_grads), (cast, cast_grads) = grads
    for a, b in zip(plain + plain_grads, cast + cast_grads):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
