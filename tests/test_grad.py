"""Gradients of pgext.pg_error: first order, independent upstreams, second order, gradcheck."""
import pytest
import torch

import pgext
from conftest import (
    FLOAT_DTYPES,
    REDUCTIONS,
    assert_close,
    check_against_reference,
    dtype_id,
    evaluate,
    finite_mask,
    grad_scales,
    least_precise,
    make_inputs,
    pgext_fn,
    reference,
    value_scale,
)

SHAPES = [((4,), 32), ((1,), 1), ((64,), 2), ((3, 5), 7), ((5,), 70001), ((), 9), ((2, 3, 4), 5)]


def shape_id(s):
    lead, N = s
    return "x".join(map(str, (*lead, N)))


@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_grads_match_reference(shape, dtype, reduction, weighted):
    lead, N = shape
    inp = make_inputs(lead, N, dtype, seed=100 + N, weight=weighted)
    got, _ = check_against_reference(inp, reduction)
    assert set(got.grads) == {"logit", "return_"} | ({"weight"} if weighted else set())


@pytest.mark.parametrize(
    "upstream",
    [(3.0, -0.5), (3.0, 0.0), (0.0, -0.5), (3.0, None), (None, -0.5), (-1.0, 2.0), (1.0, 1.0)],
    ids=str,
)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
def test_independent_upstream_gradients(upstream, reduction, dtype):
    """policy_loss and entropy_loss carry their own upstream gradients (None: not used at all)."""
    inp = make_inputs((6, 3), 19, dtype, seed=101, weight=True, mask=0.2)
    check_against_reference(inp, reduction, upstream=upstream)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_zero_upstream_gives_zero_gradient(reduction):
    inp = make_inputs((7,), 13, torch.float32, seed=102, weight=True)
    got = evaluate(pgext_fn, inp, reduction=reduction, upstream=(0.0, 0.0))
    for name, g in got.grads.items():
        assert torch.all(g == 0), name


def test_policy_only_and_entropy_only_add_up():
    """backward(3 P) + backward(-0.5 E) accumulates to backward(3 P - 0.5 E)."""
    inp = make_inputs((5, 2), 31, torch.float64, seed=103, weight=True)
    leaves = [t.clone().requires_grad_() for t in (inp.logit, inp.return_, inp.weight)]
    out = pgext.pg_error((leaves[0], inp.action, leaves[1]), weight=leaves[2])
    (3 * out.policy_loss).backward(retain_graph=True)
    after_policy = [l.grad.clone() for l in leaves]
    (-0.5 * out.entropy_loss).backward()
    ref = reference(inp, upstream=(3.0, -0.5))
    for l, name in zip(leaves, ("logit", "return_", "weight")):
        assert_close(l.grad, ref.grads[name], scale=ref.grads[name].abs().max(), what=name)
    ref_p = reference(inp, upstream=(3.0, None))
    for g, name in zip(after_policy, ("logit", "return_", "weight")):
        assert_close(g, ref_p.grads[name], scale=ref_p.grads[name].abs().max(), what=name)
    # entropy does not depend on return_
    assert torch.equal(leaves[1].grad, after_policy[1])


@pytest.mark.parametrize("wrt", [("logit",), ("return_",), ("weight",), ("return_", "weight"), ("logit", "weight")],
                         ids="+".join)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_requires_grad_subsets(wrt, reduction):
    inp = make_inputs((4, 5), 12, torch.float32, seed=104, weight=True)
    got, _ = check_against_reference(inp, reduction, wrt=wrt)
    assert set(got.grads) == set(wrt)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_masked_entries_get_exactly_zero_gradient(dtype, reduction):
    inp = make_inputs((8, 3), 50, dtype, seed=105, weight=True, mask=0.6)
    got, _ = check_against_reference(inp, reduction)
    g = got.grads["logit"]
    masked = torch.isneginf(inp.logit)
    assert masked.any()
    assert torch.all(g[masked] == 0)
    assert torch.isfinite(g).all()
    assert torch.isfinite(got.grads["return_"]).all() and torch.isfinite(got.grads["weight"]).all()


def test_grad_dtypes_follow_inputs():
    inp = make_inputs((3,), 10, torch.bfloat16, seed=106, weight=True, return_dtype=torch.float32,
                      weight_dtype=torch.float64)
    got = evaluate(pgext_fn, inp)
    assert got.policy.dtype == torch.float64
    assert got.grads["logit"].dtype == torch.bfloat16
    assert got.grads["return_"].dtype == torch.float32
    assert got.grads["weight"].dtype == torch.float64


def test_backward_twice_and_accumulation():
    inp = make_inputs((6,), 21, torch.float32, seed=107, weight=True)
    logit = inp.logit.clone().requires_grad_()
    out = pgext.pg_error((logit, inp.action, inp.return_), weight=inp.weight)
    loss = 3 * out.policy_loss - 0.5 * out.entropy_loss
    loss.backward(retain_graph=True)
    first = logit.grad.clone()
    loss.backward(retain_graph=True)
    assert torch.equal(logit.grad, 2 * first)
    g, = torch.autograd.grad(loss, logit)
    assert torch.equal(g, first)


# ------------------------------------------------------------------------ explicit forward/backward ops
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
def test_forward_backward_ops(dtype, reduction, weighted):
    inp = make_inputs((4, 3), 29, dtype, seed=108, weight=weighted, mask=0.3)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    policy, entropy, lse, ent_rows = torch.ops.pgext.pg_error_forward(
        inp.logit, inp.action, inp.return_, inp.weight, reduction)
    ref = reference(inp, reduction=reduction, wrt=("logit",))
    assert lse.shape == inp.action.shape and ent_rows.shape == inp.action.shape
    assert lse.dtype == torch.float64 and ent_rows.dtype == acc
    x = inp.logit.double()
    assert_close(lse, torch.logsumexp(x, -1), tol_dtype=acc, scale=1 + x.nan_to_num(neginf=0).abs().amax(-1),
                 what="lse")
    H = torch.distributions.Categorical(logits=finite_mask(x)).entropy()
    assert_close(ent_rows, H, tol_dtype=acc, scale=1 + H, what="entropy_rows")
    for name, a, e in (("policy", policy, ref.policy), ("entropy", entropy, ref.entropy)):
        assert a.dtype == inp.return_.dtype
        assert_close(a, e, tol_dtype=least_precise(dtype, acc), scale=value_scale(inp, reduction), what=name)
    # pg_error_backward with the same upstream as the reference
    gP, gE = (u.to(policy.dtype) for u in ref.upstream)
    grad = torch.ops.pgext.pg_error_backward(gP, gE, inp.logit, inp.action, inp.return_, inp.weight, lse,
                                             ent_rows, reduction)
    assert grad.dtype == dtype and grad.shape == inp.logit.shape
    scales = grad_scales(inp, reduction, ref.upstream)
    assert_close(grad, ref.grads["logit"], scale=scales["logit"], floor=scales["logit_floor"],
                 what="pg_error_backward")
    assert torch.all(grad[torch.isneginf(inp.logit)] == 0)
    # and it is what autograd gives through pg_error
    auto = evaluate(pgext_fn, inp, reduction=reduction, wrt=("logit",))
    assert_close(grad, auto.grads["logit"], scale=scales["logit"], floor=scales["logit_floor"],
                 what="autograd vs pg_error_backward")


# ------------------------------------------------------------------------ second order
def _second_order(fn, inp, reduction, cast=None, seed=5):
    """First-order grads with create_graph, then the gradient of <grads, v> w.r.t. every input."""
    names = ["logit", "return_"] + (["weight"] if inp.weight is not None else [])
    leaves = {n: getattr(inp, n).detach().to(cast or getattr(inp, n).dtype) for n in names}
    if cast is not None:
        leaves["logit"] = finite_mask(leaves["logit"])
    leaves = {n: t.clone().requires_grad_() for n, t in leaves.items()}
    out = fn((leaves["logit"], inp.action, leaves["return_"]), weight=leaves.get("weight"), reduction=reduction)
    g = torch.Generator().manual_seed(seed)
    ups = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in out]
    first = torch.autograd.grad(list(out), list(leaves.values()), ups, create_graph=True)
    vs = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) for t in first]
    s = sum((f * v).sum() for f, v in zip(first, vs))
    second = torch.autograd.grad(s, list(leaves.values()), materialize_grads=True)
    return dict(zip(names, first)), dict(zip(names, second))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("mask", [False, True], ids=["dense", "masked"])
def test_second_order_matches_reference(reduction, weighted, mask):
    inp = make_inputs((3, 4), 9, torch.float64, seed=109, weight=weighted, mask=mask)
    f1, f2 = _second_order(pgext_fn, inp, reduction)
    r1, r2 = _second_order(lambda d, **k: pgext.reference.pg_error(d, **k), inp, reduction, cast=torch.float64)
    for name in r1:
        assert_close(f1[name], r1[name], scale=r1[name].abs().max(), what=f"first-order {name}")
        assert_close(f2[name], r2[name], scale=r2[name].abs().max(), what=f"second-order {name}")
        assert torch.isfinite(f2[name]).all()
    if mask:
        assert torch.all(f2["logit"][torch.isneginf(inp.logit)] == 0)


def test_second_order_float32():
    inp = make_inputs((5,), 17, torch.float32, seed=110, weight=True)
    f1, f2 = _second_order(pgext_fn, inp, "mean")
    r1, r2 = _second_order(lambda d, **k: pgext.reference.pg_error(d, **k), inp, "mean", cast=torch.float64)
    for name in r2:
        assert f2[name].dtype == torch.float32
        assert_close(f2[name], r2[name], scale=r2[name].abs().max(), rtol=1e-4, atol=1e-5, what=name)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("lead", [(3,), (2, 2), ()], ids=str)
def test_gradcheck(reduction, weighted, lead):
    inp = make_inputs(lead, 5, torch.float64, seed=111, weight=weighted)
    args = [inp.logit.clone().requires_grad_(), inp.return_.clone().requires_grad_()]
    if weighted:
        args.append(inp.weight.clone().requires_grad_())

    def f(logit, return_, weight=None):
        return tuple(pgext.pg_error((logit, inp.action, return_), weight=weight, reduction=reduction))

    # forward mode (jvp) too, against the same finite differences
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-5, check_forward_ad=True)


def test_gradcheck_masked():
    inp = make_inputs((4,), 6, torch.float64, seed=112, weight=True, mask=0.4)
    assert torch.isneginf(inp.logit).any()

    def f(logit, return_, weight):
        return tuple(pgext.pg_error((logit, inp.action, return_), weight=weight, reduction="none"))

    args = [t.clone().requires_grad_() for t in (inp.logit, inp.return_, inp.weight)]
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-5, check_forward_ad=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [((5,), 3), ((2, 3), 40), ((), 7), ((3,), 5000)], ids=shape_id)
def test_forward_mode_matches_reference(shape, dtype, reduction):
    """torch.func.jvp with tangents on logit, return_ and weight (masked
    logits included): the tangents of both losses, in the losses' dtype."""
    lead, N = shape
    inp = make_inputs(lead, N, dtype, seed=115 + N, weight=True, mask=0.2 if N > 3 else False)
    g = torch.Generator().manual_seed(N)
    tangents = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)
                for t in (inp.logit, inp.return_, inp.weight)]

    def losses(impl, cast=None):
        def f(logit, return_, weight):
            if cast is not None:
                logit, return_, weight = (t.to(cast) for t in (logit, return_, weight))
            return tuple(impl((logit, inp.action, return_), weight=weight, reduction=reduction))
        return f

    primals = (inp.logit, inp.return_, inp.weight)
    got_out, got = torch.func.jvp(losses(pgext.pg_error), primals, tuple(tangents))
    _, want = torch.func.jvp(losses(pgext.reference.pg_error, torch.float64), primals, tuple(tangents))
    for name, out, t, w in zip(("policy", "entropy"), got_out, got, want):
        assert t.dtype == out.dtype and t.shape == out.shape, name
        assert_close(t, w.to(t.dtype), scale=w.abs().max() + 1, tol_dtype=least_precise(dtype, t.dtype),
                     what=f"{name} tangent")


def test_nested_forward_mode_matches_reference():
    """Forward mode over pg_error's own forward mode, gradient, value or vjp
    (the outer transform reaches the forward kernel op, which has tangents)."""
    from torch.func import grad_and_value, jvp, vjp

    inp = make_inputs((3,), 6, torch.float64, seed=117, mask=0.2)
    g = torch.Generator().manual_seed(117)
    t1, t2 = (torch.randn(inp.logit.shape, generator=g, dtype=torch.float64) for _ in range(2))
    results = []
    for impl in (pgext.pg_error, pgext.reference.pg_error):
        def f(x):
            return impl((x, inp.action, inp.return_)).policy_loss
        results.append(torch.stack([
            jvp(lambda x: jvp(f, (x,), (t1,))[0], (inp.logit,), (t2,))[1],
            jvp(lambda x: jvp(f, (x,), (t1,))[1], (inp.logit,), (t2,))[1],
            jvp(lambda x: grad_and_value(f)(x)[1], (inp.logit,), (t2,))[1],
            jvp(lambda x: vjp(f, x)[0], (inp.logit,), (t2,))[1],
        ]))
    assert results[0].abs().min() > 0
    assert_close(results[0], results[1], scale=results[1].abs().max())


def test_kernel_ops_forward_mode():
    """pg_error_forward carries tangents for all four outputs, and
    pg_error_backward for the gradient (the composite formula's: forward over
    reverse, torch.func.hessian); the shard ops refuse a tangent rather than
    drop it."""
    import torch.autograd.forward_ad as fwAD

    inp = make_inputs((4,), 7, torch.float64, seed=118, mask=0.2)
    tangent = torch.randn(inp.logit.shape, generator=torch.Generator().manual_seed(118), dtype=torch.float64)
    ops = torch.ops.pgext

    def entropy(x):
        return torch.distributions.Categorical(logits=x).entropy()

    want_lse = torch.func.jvp(lambda x: torch.logsumexp(x, -1), (inp.logit,), (tangent,))[1]
    want_h = torch.func.jvp(entropy, (inp.logit,), (tangent,))[1]
    with fwAD.dual_level():
        x = fwAD.make_dual(inp.logit, tangent)
        outputs = ops.pg_error_forward(x, inp.action, inp.return_, None, "none")
        d_policy, d_entropy, d_lse, d_h = (fwAD.unpack_dual(o).tangent for o in outputs)
        assert_close(d_lse, want_lse, scale=want_lse.abs().max())
        assert_close(d_h, want_h, scale=want_h.abs().max())
        assert_close(d_entropy, want_h)
        assert d_policy.abs().max() > 0
        lse, h = (fwAD.unpack_dual(o).primal for o in outputs[2:])
        with pytest.raises(RuntimeError, match="without a forward-mode derivative"):
            ops.pg_row_stats(x, inp.action, 0)
        ones = torch.ones(4, dtype=torch.float64)
        grad = ops.pg_error_backward(ones, ones, x, inp.action, inp.return_, None, lse, h, "none")
        d_grad = fwAD.unpack_dual(grad).tangent

    def reference_grad(x):  # d/dx of the sum of both losses, as ones upstream asks
        return torch.func.grad(lambda y: sum(t.sum() for t in pgext.reference.pg_error(
            (y, inp.action, inp.return_), reduction="none")))(x)

    want = torch.func.jvp(reference_grad, (inp.logit,), (tangent,))[1]
    assert_close(d_grad, want, scale=want.abs().max())


def test_forward_mode_transforms():
    """jacfwd agrees with jacrev, and the Hessian (torch.func.hessian:
    forward over reverse) with the reference's. Nested reverse-mode transforms
    (jacrev(jacrev), jacrev(jacfwd)) raise: the fused forward kernel has no
    derivative of its own; torch.autograd.grad(create_graph=True) serves."""
    inp = make_inputs((3,), 6, torch.float64, seed=116, mask=0.2)

    def policy(impl):
        return lambda x: impl((x, inp.action, inp.return_))[0]

    x = inp.logit
    assert_close(torch.func.jacfwd(policy(pgext.pg_error))(x), torch.func.jacrev(policy(pgext.pg_error))(x))
    want = torch.func.hessian(policy(pgext.reference.pg_error))(x)
    assert_close(torch.func.hessian(policy(pgext.pg_error))(x), want, scale=want.abs().max())
    for nested in (torch.func.jacrev(torch.func.jacrev(policy(pgext.pg_error))),
                   torch.func.jacrev(torch.func.jacfwd(policy(pgext.pg_error)))):
        with pytest.raises(RuntimeError, match="kernel op without gradients"):
            nested(x)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
def test_gradgradcheck(reduction, weighted):
    inp = make_inputs((3,), 4, torch.float64, seed=113, weight=weighted)
    args = [inp.logit.clone().requires_grad_(), inp.return_.clone().requires_grad_()]
    if weighted:
        args.append(inp.weight.clone().requires_grad_())

    def f(logit, return_, weight=None):
        return tuple(pgext.pg_error((logit, inp.action, return_), weight=weight, reduction=reduction))

    assert torch.autograd.gradgradcheck(f, args, eps=1e-6, atol=1e-6, rtol=1e-4)


class _KernelCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """The ops that reach the kernels (below autograd), by name."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("how", ["autograd.grad", "func.grad", "func.vjp"])
def test_first_order_with_create_graph_runs_the_fused_kernel(how, reduction):
    """create_graph=True, which torch.func.grad and vjp always ask for, used
    to run the composite formula (about 8x slower than backward() at 2048 x
    1000). The first-order gradient is now the fused kernel's, bit for bit the
    one backward() gives, with no logit-sized ATen op; only differentiating it
    again runs the composite's closed form."""
    inp = make_inputs((6,), 11, seed=119, mask=0.2)

    def total(logit):
        loss = pgext.pg_error((logit, inp.action, inp.return_), reduction=reduction)
        return (loss.policy_loss - 0.01 * loss.entropy_loss).sum()

    x = inp.logit.clone().requires_grad_()
    total(x).backward()
    with _KernelCalls() as calls:
        if how == "autograd.grad":
            y = inp.logit.clone().requires_grad_()
            (got,) = torch.autograd.grad(total(y), y, create_graph=True)
            assert got.requires_grad and got.grad_fn.name() == "PgErrorGradBackward"
        elif how == "func.grad":
            got = torch.func.grad(total)(inp.logit)
        else:
            value, vjp_fn = torch.func.vjp(total, inp.logit)
            (got,) = vjp_fn(torch.ones_like(value))
    assert torch.equal(got, x.grad)
    assert "pgext.pg_error_backward.default" in calls.names
    assert not [n for n in calls.names if "softmax" in n], calls.names


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
def test_third_order_and_a_shared_upstream_gradient(reduction, weighted):
    """Derivatives of the fused gradient to third order, with respect to the
    logits, return_, weight and an upstream gradient that feeds both losses
    (u and -0.01 u: their paths must not be counted twice), against the
    reference."""
    inp = make_inputs((3, 2), 5, torch.float64, seed=120, weight=weighted, mask=0.2)

    def derivatives(impl):
        x = inp.logit.clone().requires_grad_()
        r = inp.return_.clone().requires_grad_()
        w = inp.weight.clone().requires_grad_() if weighted else None
        u = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        loss = impl((x, inp.action, r), weight=w, reduction=reduction)
        total = (loss.policy_loss - 0.01 * loss.entropy_loss).sum()
        leaves = [x, r] + ([w] if weighted else [])
        first = torch.autograd.grad(total, leaves, u, create_graph=True)
        second = torch.autograd.grad(sum((g * g.detach().sin()).sum() for g in first), leaves + [u],
                                     create_graph=True)
        third = torch.autograd.grad(second[0].pow(2).sum(), leaves + [u], allow_unused=True)
        return first + second + third

    got, want = derivatives(pgext.pg_error), derivatives(pgext.reference.pg_error)
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None or torch.all(g == 0), i
            continue
        assert_close(g, w, scale=w.abs().max(), what=f"derivative {i}")


def test_n1_second_order_is_zero_in_logit():
    """With a single class nothing depends on the logit: all its derivatives vanish."""
    inp = make_inputs((4,), 1, torch.float64, seed=114, weight=True)
    f1, f2 = _second_order(pgext_fn, inp, "sum")
    assert torch.all(f1["logit"] == 0) and torch.all(f2["logit"].abs() < 1e-12)
    r1, r2 = _second_order(lambda d, **k: pgext.reference.pg_error(d, **k), inp, "sum", cast=torch.float64)
    for name in ("return_", "weight"):
        assert_close(f2[name], r2[name], scale=r2[name].abs().max(), what=name)
