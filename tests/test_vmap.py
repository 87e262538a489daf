"""torch.func.vmap over pgext: batching rules (pgext/ops/vmap.py) instead of
PyTorch's per-entry fallback. Every vmapped result is compared with a Python
loop over the batch entries; the fallback is turned off (an op without a rule
raises) and its "performance drop" warning fails the test."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.func import grad, jacfwd, jacrev, vmap

import pgext
from conftest import (HALF_DTYPES, REDUCTIONS, assert_close, dtype_id, make_inputs, ppo_surrogate_inputs,
                      ppo_value_inputs)

ENTRIES = 3


def losses(logit, action, return_, weight=None, reduction="mean"):
    return tuple(pgext.pg_error(pgext.pg_data(logit, action, return_), weight=weight, reduction=reduction))


def entry(t, dim, i):
    return t if dim is None else t.select(dim, i)


def loop(fn, in_dims, *args):
    """fn over the batch entries, stacked: what vmap(fn, in_dims) must return."""
    outs = [fn(*(entry(a, d, i) for a, d in zip(args, in_dims))) for i in range(ENTRIES)]
    return tuple(torch.stack(parts) for parts in zip(*outs))


def batched(t, dim):
    """ENTRIES different copies of t, stacked along dim."""
    if t.is_floating_point():
        return torch.stack([t * (1 + 0.25 * i) - 0.1 * i for i in range(ENTRIES)], dim)
    n = int(t.max()) + 1
    return torch.stack([(t + i) % n for i in range(ENTRIES)], dim)


# which arguments carry the vmapped dimension, and where (None: shared by all entries)
LAYOUTS = {
    "all": (0, 0, 0, 0),
    "logit_only": (0, None, None, None),  # an ensemble of policies on one batch
    "moved_dims": (2, 1, None, 0),
    "return_only": (None, None, 0, None),
}


def vmap_inputs(layout, dtype, shape=(4, 5), n=7, seed=0):
    inp = make_inputs(shape, n, dtype, seed=seed, mask=0.2, weight=True)
    dims = LAYOUTS[layout]
    args = [t if d is None else batched(t, d) for t, d in zip((inp.logit, inp.action, inp.return_, inp.weight), dims)]
    return args, dims


@pytest.fixture(autouse=True)
def no_fallback():
    # the fallback's warning reaches Python only sometimes: where C++ calls
    # the op (ppo_surrogate's autograd its forward op) it goes to stderr. So
    # the fallback itself is turned off, and an op without a rule raises
    enabled = torch._C._functorch._is_vmap_fallback_enabled()
    torch._C._functorch._set_vmap_fallback_enabled(False)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*performance drop.*")
            yield
    finally:
        torch._C._functorch._set_vmap_fallback_enabled(enabled)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
def test_losses_match_a_loop(dtype, reduction, layout):
    args, dims = vmap_inputs(layout, dtype)

    def fn(logit, action, return_, weight):
        return losses(logit, action, return_, weight, reduction)

    got = vmap(fn, in_dims=dims)(*args)
    want = loop(fn, dims, *args)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        if reduction == "none":
            assert torch.equal(g, w)  # the same kernel on the same rows
        else:
            # the same per-sample terms, summed in float64 in another order
            assert_close(g, w, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
def test_gradients_match_a_loop(dtype, reduction, layout):
    """vmap(grad): pg_error's autograd runs inside vmap, so the forward and
    backward kernel ops are the ones batched."""
    args, dims = vmap_inputs(layout, dtype)
    upstream = torch.tensor(-0.01)

    def total(logit, return_, weight, action):
        policy, entropy = losses(logit, action, return_, weight, reduction)
        return (policy + upstream * entropy).sum()

    grads = grad(total, argnums=(0, 1, 2))
    order = (0, 2, 3, 1)
    got = vmap(grads, in_dims=tuple(dims[i] for i in order))(*(args[i] for i in order))
    want = loop(grads, tuple(dims[i] for i in order), *(args[i] for i in order))
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 8e-3}[dtype]
        # 'mean' divides the upstream gradient by the count before the kernel
        # rather than inside it: a last-bit difference
        assert_close(g, w, scale=w.abs().max(), rtol=tol, atol=tol)


def test_ensemble_over_shared_data_is_one_kernel_call():
    """The point of the rules: an ensemble of E policies on one batch is one
    call on E x rows rows, not E calls (the fallback's loop)."""
    inp = make_inputs((64,), 18, seed=3)
    logits = batched(inp.logit, 0)
    calls = []

    class Count(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "pgext":
                calls.append(str(func))
            return func(*args, **(kwargs or {}))

    with Count():
        vmap(lambda x: losses(x, inp.action, inp.return_), in_dims=(0,))(logits)
    # below autograd, where dispatch modes see it: one forward kernel call
    assert calls == ["pgext.pg_error_forward.default"]


def test_nested_vmap_matches_a_double_loop():
    inp = make_inputs((2, 3, 5), 6, seed=4)

    def fn(logit, action, return_):
        return losses(logit, action, return_)

    got = vmap(vmap(fn))(inp.logit, inp.action, inp.return_)
    for k in range(2):
        want = [torch.stack([torch.stack(fn(inp.logit[i, j], inp.action[i, j], inp.return_[i, j]))
                             for j in range(3)]) for i in range(2)]
        want = torch.stack(want)[..., k]
        assert_close(got[k], want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, *HALF_DTYPES], ids=dtype_id)
def test_jacobians(dtype):
    """jacrev is vmap over vjp (only the upstream gradient is batched), jacfwd
    vmap over jvp: both equal the reference's Jacobian."""
    inp = make_inputs((4,), 5, dtype, seed=5, mask=0.2)

    def policy(logit, fn):
        return fn(pgext.pg_data(logit, inp.action, inp.return_), reduction="none").policy_loss

    want = torch.autograd.functional.jacobian(
        lambda x: policy(x, pgext.reference.pg_error), inp.logit.double())
    for transform in (jacrev, jacfwd):
        got = transform(lambda x: policy(x, pgext.pg_error))(inp.logit)
        assert got.shape == (4, 4, 5)
        assert_close(got.double(), want, rtol=1e-9 if dtype == torch.float64 else 2e-2, atol=1e-3)


def test_hessian_is_symmetric_and_matches_the_reference():
    inp = make_inputs((3,), 4, torch.float64, seed=6)

    def total(logit, fn):
        loss = fn(pgext.pg_data(logit, inp.action, inp.return_))
        return loss.policy_loss - 0.01 * loss.entropy_loss

    got = torch.func.hessian(lambda x: total(x, pgext.pg_error))(inp.logit)
    want = torch.autograd.functional.hessian(lambda x: total(x, pgext.reference.pg_error), inp.logit)
    assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_shard_ops_match_a_loop():
    inp = make_inputs((ENTRIES, 5), 12, seed=7, weight=True)
    ops = torch.ops.pgext
    start = 4
    shard = inp.logit[..., start:start + 5]
    got = vmap(lambda x, a: ops.pg_row_stats(x, a, start))(shard, inp.action)
    want = loop(lambda x, a: ops.pg_row_stats(x, a, start), (0, 0), shard, inp.action)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    _, _, lse, entropy = ops.pg_error_forward(inp.logit, inp.action, inp.return_, inp.weight, "none")
    for reduction in REDUCTIONS:
        g = torch.Generator().manual_seed(9)
        gp = torch.randn(ENTRIES, *(inp.action.shape[1:] if reduction == "none" else ()), generator=g)
        ge = torch.randn(gp.shape, generator=g)

        def shard_grad(gp, ge, x, a, r, w, lse, ent):
            return (ops.pg_grad_from_stats(gp, ge, x, a, r, w, lse, ent, reduction, start),)

        args = (gp, ge, shard, inp.action, inp.return_, inp.weight, lse, entropy)
        (got,) = vmap(shard_grad)(*args)
        (want,) = loop(shard_grad, (0,) * 8, *args)
        assert_close(got, want, scale=want.abs().max(), rtol=1e-6, atol=1e-6)


def test_bad_input_raises_under_vmap():
    inp = make_inputs((3, 4), 5, seed=8)
    action = inp.action.clone()
    action[1, 2] = 5
    with pytest.raises(pgext.ActionOutOfRangeError, match="action 5"):
        vmap(losses)(inp.logit, action, inp.return_)
    with pytest.raises(ValueError, match="reduction"):
        vmap(lambda *a: losses(*a, reduction="avg"))(inp.logit, inp.action, inp.return_)
    with pytest.raises(ValueError, match="shape"):
        vmap(losses, in_dims=(0, 0, None))(inp.logit, inp.action, inp.return_[:, :2])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradient_of_a_vmapped_loss(reduction):
    """grad(vmap): the rules run inside autograd, their 'none' call and sums
    are differentiated as any ATen ops are (float64 gradcheck too)."""
    inp = make_inputs((ENTRIES, 4), 5, torch.float64, seed=9, weight=True)

    def vmapped(logit):
        policy, entropy = vmap(lambda x, a, r, w: losses(x, a, r, w, reduction))(
            logit, inp.action, inp.return_, inp.weight)
        return (policy - 0.3 * entropy).sum()

    def looped(logit):
        terms = [losses(logit[i], inp.action[i], inp.return_[i], inp.weight[i], reduction) for i in range(ENTRIES)]
        return sum((p - 0.3 * e).sum() for p, e in terms)

    assert_close(grad(vmapped)(inp.logit), grad(looped)(inp.logit), rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(vmapped, (inp.logit.clone().requires_grad_(),))


# ppo_surrogate: log_prob, old_log_prob, entropy, adv, weight, all of one shape
SURROGATE_LAYOUTS = {
    "all": (0, 0, 0, 0, 0),
    "log_prob_only": (0, None, None, None, None),  # an ensemble of policies on one batch
    "moved_dims": (1, 0, None, 1, 0),
    "adv_only": (None, None, None, 0, None),
}
SURROGATE = torch.ops.pgext.ppo_surrogate
SURROGATE_TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 8e-3}


def surrogate_inputs(layout, dtype, weighted, shape=(4, 6), seed=10):
    lp, old, ent, adv, w = ppo_surrogate_inputs(shape, seed, dtype, weighted)
    dims = SURROGATE_LAYOUTS[layout][:4] + ((SURROGATE_LAYOUTS[layout][4],) if weighted else (None,))
    args = [None if t is None else t if d is None else batched(t, d) for t, d in zip((lp, old, ent, adv, w), dims)]
    return args, dims


def assert_surrogate_close(got, want, dtype):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        # the same per-sample terms, summed in float64 in another order (and
        # their exp ATen's rather than the kernel's: a last bit in float32)
        tol = SURROGATE_TOL[dtype]
        assert_close(g, w, scale=w.abs().max().clamp(min=1), rtol=tol, atol=tol)


@pytest.mark.parametrize("layout", SURROGATE_LAYOUTS)
@pytest.mark.parametrize("dual_clip", [None, 2.0])
@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
def test_surrogate_matches_a_loop(dtype, weighted, dual_clip, layout):
    """All four results, approx_kl and clipfrac included, are one per entry."""
    args, dims = surrogate_inputs(layout, dtype, weighted)

    def fn(lp, old, ent, adv, w):
        return tuple(SURROGATE(lp, old, ent, adv, w, 0.2, dual_clip))

    got = vmap(fn, in_dims=dims)(*args)
    want = loop(fn, dims, *args)
    assert want[3].dtype == torch.float32 and want[3].shape == (ENTRIES,)
    assert_surrogate_close(got, want, dtype)


@pytest.mark.parametrize("layout", SURROGATE_LAYOUTS)
@pytest.mark.parametrize("dual_clip", [None, 2.0])
@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
def test_surrogate_gradients_match_a_loop(dtype, weighted, dual_clip, layout):
    """vmap(grad): the op's C++ autograd runs inside vmap, so its forward
    kernel op is the one batched; its derivatives are rescaled from the
    batch's sample count to an entry's."""
    args, dims = surrogate_inputs(layout, dtype, weighted)

    def total(lp, ent, old, adv, w):
        policy, entropy, *_ = SURROGATE(lp, old, ent, adv, w, 0.2, dual_clip)
        return policy - 0.01 * entropy

    grads = grad(total, argnums=(0, 1))
    order = (0, 2, 1, 3, 4)
    odims = tuple(dims[i] for i in order)
    got = vmap(grads, in_dims=odims)(*(args[i] for i in order))
    want = loop(grads, odims, *(args[i] for i in order))
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        # the kernel's derivatives over the whole batch, times the entries: a last bit
        tol = SURROGATE_TOL[dtype]
        assert_close(g, w, scale=w.abs().max(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dual_clip", [None, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_surrogate_forward_kernel_op_matches_a_loop(dtype, dual_clip):
    """The per-sample derivatives too, which functorch's autograd (always
    create_graph) recomputes for log_prob rather than reads."""
    for layout in SURROGATE_LAYOUTS:
        args, dims = surrogate_inputs(layout, dtype, True)

        def fn(*a):
            return tuple(torch.ops.pgext.ppo_surrogate_forward(*a, 0.2, dual_clip))

        got = vmap(fn, in_dims=dims)(*args)
        want = loop(fn, dims, *args)
        assert len(got) == 6
        assert_surrogate_close(got, want, dtype)


def test_surrogate_ensemble_is_one_kernel_call():
    args, dims = surrogate_inputs("log_prob_only", torch.float32, True, shape=(64,))
    calls = []

    class Count(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "pgext":
                calls.append((str(func), tuple(args[0].shape)))
            return func(*args, **(kwargs or {}))

    def policy(lp, old, ent, adv, w):
        return SURROGATE(lp, old, ent, adv, w)[0]

    with Count():
        vmap(grad(policy), in_dims=dims)(*args)
    assert calls == [("pgext.ppo_surrogate_forward.default", (ENTRIES, 64))]


@pytest.mark.parametrize("logit_old_kind", ["logits", "log_probs"])
@pytest.mark.parametrize("dual_clip", [None, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_ppo_policy_error_per_sample_gradients(dtype, dual_clip, logit_old_kind):
    """vmap(grad) through pgext.ppo_policy_error (mean over the samples): an
    ensemble of policies on one batch, its losses and info per policy."""
    inp = make_inputs((8,), 5, dtype, seed=11, weight=True)
    logits = batched(inp.logit, 0)
    old = inp.logit + 0.3 * torch.randn(inp.logit.shape, generator=torch.Generator().manual_seed(12), dtype=dtype)
    if logit_old_kind == "log_probs":
        old = torch.log_softmax(old, -1).gather(-1, inp.action.unsqueeze(-1)).squeeze(-1)
    adv = inp.return_

    def step(logit):
        loss, info = pgext.ppo_policy_error(pgext.ppo_policy_data(logit, old, inp.action, adv, inp.weight),
                                            dual_clip=dual_clip)
        return loss.policy_loss - 0.01 * loss.entropy_loss, (loss.policy_loss, loss.entropy_loss, *info)

    got_grad, got_aux = vmap(grad(step, has_aux=True))(logits)
    results = [grad(step, has_aux=True)(logits[i]) for i in range(ENTRIES)]
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    want_grad = torch.stack([r[0] for r in results])
    assert_close(got_grad, want_grad, scale=want_grad.abs().max(), rtol=tol, atol=tol)
    want_aux = [torch.stack(parts) for parts in zip(*(r[1] for r in results))]
    assert_surrogate_close(got_aux, want_aux, dtype)


@pytest.mark.parametrize("dual_clip", [None, 2.0])
def test_gradient_of_a_vmapped_surrogate(dual_clip):
    """grad(vmap): the rule's ATen ops are differentiated, in every input as
    the op's eager fallback is; approx_kl and clipfrac have no gradient."""
    args, dims = surrogate_inputs("all", torch.float64, True)

    def vmapped(lp, old, ent, adv, w):
        policy, entropy, kl, clipfrac = vmap(lambda *a: SURROGATE(*a, 0.2, dual_clip))(lp, old, ent, adv, w)
        assert not kl.requires_grad and not clipfrac.requires_grad
        return (policy - 0.3 * entropy).sum()

    def looped(lp, old, ent, adv, w):
        terms = [SURROGATE(lp[i], old[i], ent[i], adv[i], w[i], 0.2, dual_clip) for i in range(ENTRIES)]
        return sum(p - 0.3 * e for p, e, *_ in terms)

    argnums = tuple(range(5))
    for g, w in zip(grad(vmapped, argnums)(*args), grad(looped, argnums)(*args)):
        assert_close(g, w, scale=w.abs().max(), rtol=1e-12, atol=1e-12)
    leaves = [a.clone().requires_grad_() for a in args]
    assert torch.autograd.gradcheck(vmapped, tuple(leaves))


def test_surrogate_nested_vmap_jacobians_and_hessian():
    args, _ = surrogate_inputs("all", torch.float64, True, shape=(2, 5))
    got = vmap(vmap(SURROGATE))(*args)
    for k in range(4):
        want = torch.stack([torch.stack([SURROGATE(*(a[i, j] for a in args))[k] for j in range(2)])
                            for i in range(ENTRIES)])
        assert_close(got[k], want, rtol=1e-12, atol=1e-15)
    lp, old, ent, adv, w = (a[0, 0] for a in args)

    def losses_of(x, fn):
        return torch.stack(tuple(fn(x, old, ent, adv, w, 0.2, 2.0))[:2])

    want = torch.autograd.functional.jacobian(lambda x: losses_of(x, pgext.reference.eager_surrogate), lp)
    for transform in (jacrev, jacfwd):
        assert_close(transform(lambda x: losses_of(x, SURROGATE))(lp), want, rtol=1e-12, atol=1e-15)
    got = torch.func.hessian(lambda x: losses_of(x, SURROGATE)[0])(lp)
    want = torch.autograd.functional.hessian(lambda x: losses_of(x, pgext.reference.eager_surrogate)[0], lp)
    assert_close(got, want, rtol=1e-12, atol=1e-15)


def test_zero_dim_samples_per_entry():
    """vmap over a 1-D batch: each entry has one 0-d sample, whose mean is
    itself (not the batch's)."""
    args, _ = surrogate_inputs("all", torch.float64, True, shape=(ENTRIES,))
    dims = (0,) * 5
    got = vmap(lambda *a: tuple(SURROGATE(*a)))(*args)
    want = loop(lambda *a: tuple(SURROGATE(*a)), dims, *args)
    assert_surrogate_close(got, want, torch.float64)
    inp = make_inputs((ENTRIES,), 5, torch.float64, seed=13)
    for reduction in REDUCTIONS:
        fn = lambda x, a, r: losses(x, a, r, reduction=reduction)  # noqa: E731
        got = vmap(fn)(inp.logit, inp.action, inp.return_)
        want = loop(fn, (0, 0, 0), inp.logit, inp.action, inp.return_)
        for g, w in zip(got, want):
            assert_close(g, w, rtol=1e-12, atol=0)


def test_bad_surrogate_input_raises_under_vmap():
    args, _ = surrogate_inputs("all", torch.float32, True)
    lp, old, ent, adv, w = args
    with pytest.raises(ValueError, match="adv must have log_prob's shape"):
        vmap(SURROGATE, in_dims=(0, 0, 0, None, 0))(lp, old, ent, adv[0, :3], w)
    with pytest.raises(ValueError, match="clip_ratio"):
        vmap(lambda *a: SURROGATE(*a, -0.1))(lp, old, ent, adv, w)
    with pytest.raises(ValueError, match="dual_clip"):
        vmap(lambda *a: SURROGATE(*a, 0.2, 1.0))(lp, old, ent, adv, w)
    with pytest.raises(TypeError, match="weight must be float"):
        vmap(SURROGATE)(lp, old, ent, adv, (w > 0.5).int())


# ppo_value: value_new, value_old, return_, weight, all of one shape
VALUE_LAYOUTS = {
    "all": (0, 0, 0, 0),
    "value_new_only": (0, None, None, None),  # an ensemble of critics on one batch
    "moved_dims": (1, 0, None, 1),
    "return_only": (None, None, 0, None),
}
VALUE = torch.ops.pgext.ppo_value


def value_inputs(layout, dtype, weighted, shape=(4, 6), seed=20):
    vn, vo, ret, w = ppo_value_inputs(shape, seed, dtype, weighted)
    dims = VALUE_LAYOUTS[layout][:3] + ((VALUE_LAYOUTS[layout][3],) if weighted else (None,))
    args = [None if t is None else t if d is None else batched(t, d) for t, d in zip((vn, vo, ret, w), dims)]
    return args, dims


@pytest.mark.parametrize("layout", VALUE_LAYOUTS)
@pytest.mark.parametrize("use_value_clip", [True, False], ids=["clip", "no_clip"])
@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
def test_value_loss_matches_a_loop(dtype, weighted, use_value_clip, layout):
    """One loss per entry, and (vmap(grad)) one gradient of value_new per
    entry: the op's C++ autograd runs inside vmap, its forward kernel op is
    the one batched."""
    args, dims = value_inputs(layout, dtype, weighted)

    def loss(vn, vo, ret, w):
        return VALUE(vn, vo, ret, w, 0.2, use_value_clip)

    tol = SURROGATE_TOL[dtype]
    got, want = vmap(loss, in_dims=dims)(*args), loop(lambda *a: (loss(*a),), dims, *args)[0]
    assert got.dtype == want.dtype == dtype and got.shape == want.shape == (ENTRIES,)
    assert_close(got, want, scale=want.abs().max(), rtol=tol, atol=tol)
    got = vmap(grad(loss), in_dims=dims)(*args)
    want = loop(lambda *a: (grad(loss)(*a),), dims, *args)[0]
    assert got.dtype == want.dtype and got.shape == want.shape
    assert_close(got, want, scale=want.abs().max(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_value_forward_kernel_op_matches_a_loop(dtype):
    for layout in VALUE_LAYOUTS:
        args, dims = value_inputs(layout, dtype, True)

        def fn(*a):
            return tuple(torch.ops.pgext.ppo_value_forward(*a, 0.2, True))

        got = vmap(fn, in_dims=dims)(*args)
        want = loop(fn, dims, *args)
        assert len(got) == 2
        assert_surrogate_close(got, want, dtype)


def test_gradient_of_a_vmapped_value_loss():
    """grad(vmap): the rule's ATen ops are differentiated, in every input as
    the op's eager fallback is."""
    args, _ = value_inputs("all", torch.float64, True)

    def vmapped(vn, vo, ret, w):
        return (vmap(VALUE)(vn, vo, ret, w) * torch.tensor([1.0, -2.0, 0.5], dtype=vn.dtype)).sum()

    def looped(vn, vo, ret, w):
        return sum(VALUE(vn[i], vo[i], ret[i], w[i]) * c for i, c in enumerate((1.0, -2.0, 0.5)))

    argnums = tuple(range(4))
    for g, w in zip(grad(vmapped, argnums)(*args), grad(looped, argnums)(*args)):
        assert_close(g, w, scale=w.abs().max(), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(vmapped, tuple(a.clone().requires_grad_() for a in args))


@pytest.mark.parametrize("use_value_clip", [True, False])
def test_ppo_error_per_critic_gradients(use_value_clip):
    """vmap(grad) through pgext.ppo_error over an ensemble of policies and
    critics on one batch: each member's losses and gradients."""
    inp = make_inputs((8,), 5, torch.float64, seed=21, weight=True)
    vn, vo, ret, _ = ppo_value_inputs(8, 22)
    logits, values = batched(inp.logit, 0), batched(vn, 0)
    old = inp.logit + 0.3 * torch.randn(inp.logit.shape, generator=torch.Generator().manual_seed(23),
                                        dtype=torch.float64)

    def step(logit, value):
        loss, _ = pgext.ppo_error(pgext.ppo_data(logit, old, inp.action, value, vo, inp.return_, ret, inp.weight),
                                  0.2, use_value_clip)
        return loss.policy_loss + 0.5 * loss.value_loss - 0.01 * loss.entropy_loss, tuple(loss)

    got_grads, got_losses = vmap(grad(step, argnums=(0, 1), has_aux=True))(logits, values)
    results = [grad(step, argnums=(0, 1), has_aux=True)(logits[i], values[i]) for i in range(ENTRIES)]
    for k, got in enumerate(got_grads):
        want = torch.stack([r[0][k] for r in results])
        assert_close(got, want, scale=want.abs().max(), rtol=1e-12, atol=1e-12)
    for k, got in enumerate(got_losses):
        want = torch.stack([r[1][k] for r in results])
        assert_close(got, want, scale=want.abs().max(), rtol=1e-12, atol=1e-12)
    assert not torch.equal(got_losses[1][0], got_losses[1][1])


def test_bad_value_input_raises_under_vmap():
    args, _ = value_inputs("all", torch.float32, True)
    vn, vo, ret, w = args
    with pytest.raises(ValueError, match="return_ must have value_new's shape"):
        vmap(VALUE, in_dims=(0, 0, None, 0))(vn, vo, ret[0, :3], w)
    with pytest.raises(ValueError, match="clip_ratio"):
        vmap(lambda *a: VALUE(*a, -0.1))(vn, vo, ret, w)
    with pytest.raises(TypeError, match="weight must be float"):
        vmap(VALUE)(vn, vo, ret, (w > 0.5).int())
