"""The fused output layer under PyTorch's transforms: compiled autograd
records its backward node, autocast runs its GEMMs in the autocast dtype as
F.linear's would run, and torch.func.vmap batches it with one kernel call
where the layer is shared (compared with a loop over the entries)."""
import math

import pytest
import torch
from torch.func import grad, vmap

import pgext
from conftest import compiled_autograd_captures

ENTRIES = 3


def _layer(rows, H, V, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, H, generator=g, dtype=dtype)
    w = (torch.randn(V, H, generator=g, dtype=dtype) * 3 / math.sqrt(H))
    b = torch.randn(V, generator=g, dtype=dtype)
    a = torch.randint(0, V, rows, generator=g)
    a.view(-1)[::4] = -100
    return x, w, b, a


def _loss(x, w, b, a):
    lp, ent = pgext.linear_log_prob_entropy(x, w, a, linear_bias=b, temperature=1.2, ignore_index=-100,
                                            chunk_size=7)
    return (lp * torch.linspace(-1, 1, lp.shape[-1])).sum() + 0.1 * ent.sum()


def test_compiled_autograd_records_the_node():
    x, w, b, a = _layer((2, 6), 8, 20)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    want = torch.autograd.grad(_loss(*leaves, a), leaves)
    loss = _loss(*leaves, a)
    assert compiled_autograd_captures(loss) == 1
    for leaf, w_ in zip(leaves, want):
        assert torch.equal(leaf.grad, w_)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_casts_the_layer_like_f_linear(dtype):
    """Under autocast the result is the fused op on the operands cast to the
    autocast dtype, bit for bit, and the float32 leaves get float32
    gradients through the casts."""
    x, w, b, a = _layer((10,), 16, 40)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    with torch.autocast("cpu", dtype=dtype):
        got = pgext.linear_log_prob_entropy(*leaves[:2], a, linear_bias=leaves[2], ignore_index=-100)
    (got[0].sum() + got[1].sum()).backward()
    cast = [t.clone().to(dtype).requires_grad_() for t in (x, w, b)]
    want = pgext.linear_log_prob_entropy(*cast[:2], a, linear_bias=cast[2], ignore_index=-100)
    (want[0].sum() + want[1].sum()).backward()
    for g_, w_ in zip(got, want):
        assert g_.dtype == torch.float32 and torch.equal(g_, w_)
    for leaf, c in zip(leaves, cast):
        assert leaf.grad.dtype == torch.float32
        assert torch.equal(leaf.grad, c.grad.float())


def test_autocast_leaves_float64_alone():
    x, w, b, a = _layer((5,), 8, 12, torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = pgext.linear_log_prob_entropy(x, w, a, linear_bias=b, ignore_index=-100)
    want = pgext.linear_log_prob_entropy(x, w, a, linear_bias=b, ignore_index=-100)
    assert got[0].dtype == torch.float64 and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def _loop(fn, in_dims, *args):
    outs = [fn(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims))) for i in range(ENTRIES)]
    if isinstance(outs[0], torch.Tensor):
        return torch.stack(outs)
    return tuple(torch.stack(parts) for parts in zip(*outs))


class _Calls(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "pgext":
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_vmap_over_a_shared_layer_is_one_call():
    x, w, b, a = _layer((ENTRIES, 7), 8, 30, torch.float64)

    def fn(x_, a_):
        return pgext.linear_log_prob_entropy(x_, w, a_, linear_bias=b, temperature=0.8, ignore_index=-100,
                                             chunk_size=9)

    want = _loop(fn, (0, 1), x, a.t().contiguous())
    with _Calls() as mode:
        got = vmap(fn, in_dims=(0, 1))(x, a.t().contiguous())
    assert mode.calls == ["linear_log_prob_entropy_forward.default"]
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-12, atol=1e-12)


def test_vmap_over_a_layer_per_entry():
    x, w, b, a = _layer((7,), 8, 30, torch.float64)
    ws = torch.stack([w * (1 + 0.2 * i) for i in range(ENTRIES)])

    def fn(w_, b_):
        return pgext.linear_log_prob_entropy(x, w_, a, linear_bias=b_, ignore_index=-100, chunk_size=9)

    bs = torch.stack([b - i for i in range(ENTRIES)], 1)
    got = vmap(fn, in_dims=(0, 1))(ws, bs)
    want = _loop(fn, (0, 1), ws, bs)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("argnums", [0, 1, (0, 1, 2)])
def test_vmap_of_grad_matches_a_loop(argnums):
    """Per-sample gradients (torch.func.grad differentiates with create_graph,
    so the node's differentiable path runs): one call of each kernel op for
    all the entries."""
    x, w, b, a = _layer((ENTRIES, 7), 8, 30, torch.float64)
    f = grad(_loss, argnums=argnums)
    with _Calls() as mode:
        got = vmap(f, in_dims=(0, None, None, 0))(x, w, b, a)
    assert mode.calls == ["linear_log_prob_entropy_forward.default", "pg_error_backward.default"]
    want = _loop(f, (0, None, None, 0), x, w, b, a)
    for g_, w_ in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(g_, w_, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mask", [(True, False, False), (True, True, True), (False, True, False)])
def test_vmap_of_the_backward_op(mask):
    """The backward kernel op batched: one call when only the input's
    gradient is asked for, else one per entry (each entry's weight gradient
    is its own); the same gradients as a loop either way."""
    x, w, b, a = _layer((ENTRIES, 7), 8, 30, torch.float64)
    ops = torch.ops.pgext
    lp, ent, lse = ops.linear_log_prob_entropy_forward(x, w, a, b, 1.3, -100, 9)
    ups = torch.randn(2, ENTRIES, 7, dtype=torch.float64)

    def fn(g_lp, g_ent, x_, a_, lse_, ent_):
        return ops.linear_log_prob_entropy_backward(g_lp, g_ent, x_, w, a_, b, lse_, ent_, 1.3, -100, 9, list(mask))

    args = (ups[0], ups[1], x, a, lse, ent)
    with _Calls() as mode:
        got = vmap(fn)(*args)
    assert mode.calls.count("linear_log_prob_entropy_backward.default") == (1 if mask == (True, False, False)
                                                                             else ENTRIES)
    want = _loop(fn, (0,) * 6, *args)
    for wanted, g_, w_ in zip(mask, got, want):
        if wanted:
            torch.testing.assert_close(g_, w_, rtol=1e-12, atol=1e-12)
        else:
            assert g_.shape == (ENTRIES, 0)
