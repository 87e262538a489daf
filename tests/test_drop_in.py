"""Drop-in behaviour for code written against the notebook: broadcast
per-sample tensors, the out-of-range action's exception type, and precision at
large logits."""
import math
import pickle

import pytest
import torch

import pgext
from conftest import dtype_id
from pgext import pg_data

ops = torch.ops.pgext


def _reference(logit, action, return_, weight=None, reduction="mean"):
    """The notebook's computation in float64 (broadcasting as it does)."""
    return pgext.reference.pg_error(pg_data(logit, action, return_), weight=weight, reduction=reduction)


def _grads(fn, logit, action, return_, weight, reduction, dtype=None):
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (logit, return_, weight)]
    out = fn(leaves[0], action, leaves[1], leaves[2], reduction)
    g = torch.Generator().manual_seed(5)
    ups = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in out]
    grads = torch.autograd.grad(out, leaves, ups)
    return [o.detach() for o in out], list(grads)


def _pgext(logit, action, return_, weight, reduction):
    return pgext.pg_error(pg_data(logit, action, return_), weight=weight, reduction=reduction)


# ------------------------------------------------------------------------ broadcasting
BROADCASTS = [
    # (action shape, return_ shape, weight shape)
    ((6, 3), (6, 1), (6, 1)),     # a centralized critic's value against per-agent actions (PPOxFamily mapg)
    ((6, 3), (6, 1), (6, 3)),
    ((6, 3), (3,), (1, 3)),       # per-agent terms, aligned at the trailing dimension
    ((6, 3), (), (6, 3)),         # one return for every sample
    ((2, 4, 3), (2, 1, 1), (4, 1)),
    ((5,), (1,), ()),
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shapes", BROADCASTS, ids=str)
def test_broadcast_return_and_weight_match_the_notebook(shapes, reduction):
    """Values and gradients (to the logits and to the broadcast return_ and
    weight, summed back to their own shapes) as the notebook computes them."""
    lead, r_shape, w_shape = shapes
    g = torch.Generator().manual_seed(len(lead) * 10 + len(r_shape))
    logit = torch.randn(*lead, 7, generator=g, dtype=torch.float64)
    action = torch.randint(0, 7, lead, generator=g)
    ret = torch.randn(r_shape, generator=g, dtype=torch.float64)
    w = torch.rand(w_shape, generator=g, dtype=torch.float64) + 0.5
    got, got_g = _grads(_pgext, logit, action, ret, w, reduction, torch.float32)
    want, want_g = _grads(_reference, logit, action, ret, w, reduction)
    for a, e in zip(got, want):
        assert a.shape == e.shape
        torch.testing.assert_close(a.double(), e, rtol=2e-5, atol=2e-5)
    for a, e, shape in zip(got_g, want_g, ((*lead, 7), r_shape, w_shape)):
        assert a.shape == torch.Size(shape)
        torch.testing.assert_close(a.double(), e, rtol=2e-5, atol=2e-5)


def test_mapg_call_pattern():
    """PPOxFamily chapter6_marl/mapg.py: (B, A, N) logits, (B, A) actions and a
    centralized critic's (B, 1) return, float32, the loss backpropagated."""
    B, A, N = 16, 4, 9
    g = torch.Generator().manual_seed(0)
    logit = torch.randn(B, A, N, generator=g, requires_grad=True)
    action = torch.randint(0, N, (B, A), generator=g)
    value = torch.randn(B, 1, generator=g, requires_grad=True)
    loss = pgext.pg_error(pg_data(logit, action, value))
    (loss.policy_loss - 0.01 * loss.entropy_loss).backward()
    logit_ref = logit.detach().double().requires_grad_()
    value_ref = value.detach().double().requires_grad_()
    ref = _reference(logit_ref, action, value_ref)
    (ref.policy_loss - 0.01 * ref.entropy_loss).backward()
    torch.testing.assert_close(loss.policy_loss.double(), ref.policy_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.entropy_loss.double(), ref.entropy_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logit.grad.double(), logit_ref.grad, rtol=1e-5, atol=1e-7)
    assert value.grad.shape == (B, 1)
    torch.testing.assert_close(value.grad.double(), value_ref.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "lead,bad",
    [((4,), (4, 1)), ((4,), (2, 4)), ((), (1,)), ((3, 2), (3,)), ((3, 2), (2, 3, 2)), ((3, 2), (6,))],
    ids=str,
)
def test_broadcast_that_grows_the_samples_is_refused(lead, bad):
    """(B, 1) against (B,) actions is the notebook's silent (B, B) product:
    refused by every op that takes per-sample tensors, and by the Meta kernels."""
    logit = torch.randn(*lead, 5)
    action = torch.zeros(lead, dtype=torch.long)
    wrong = torch.randn(bad)
    ok = torch.randn(lead)
    _, _, lse, ent = ops.pg_error_forward(logit, action, ok, None, "none")
    calls = {
        "pg_error": lambda r, w: pgext.pg_error(pg_data(logit, action, r), weight=w),
        "torch.ops": lambda r, w: ops.pg_error(logit, action, r, w),
        "forward": lambda r, w: ops.pg_error_forward(logit, action, r, w, "mean"),
        "backward": lambda r, w: ops.pg_error_backward(
            torch.ones(()), torch.ones(()), logit, action, r, w, lse, ent, "mean"),
        "grad_from_stats": lambda r, w: ops.pg_grad_from_stats(
            torch.ones(()), torch.ones(()), logit, action, r, w, lse, ent, "mean", 0),
        "meta": lambda r, w: ops.pg_error_forward(
            logit.to("meta"), action.to("meta"), r.to("meta"), None if w is None else w.to("meta"), "mean"),
    }
    for name, call in calls.items():
        for r, w in ((wrong, None), (ok, wrong)):
            with pytest.raises(ValueError, match=r"must have the shape of action .*or broadcast to it"):
                call(r, w)


def test_broadcast_in_the_kernel_ops_and_meta():
    """pg_error_forward / pg_error_backward / pg_grad_from_stats take broadcast
    per-sample tensors as their expanded copies; the Meta kernel's shapes agree."""
    g = torch.Generator().manual_seed(3)
    logit = torch.randn(5, 3, 11, generator=g)
    action = torch.randint(0, 11, (5, 3), generator=g)
    ret = torch.randn(5, 1, generator=g)
    w = torch.rand(3, generator=g)
    full_r, full_w = ret.expand(5, 3).contiguous(), w.expand(5, 3).contiguous()
    for red in ("mean", "sum", "none"):
        got = ops.pg_error_forward(logit, action, ret, w, red)
        want = ops.pg_error_forward(logit, action, full_r, full_w, red)
        for a, e in zip(got, want):
            assert torch.equal(a, e)
        meta = ops.pg_error_forward(logit.to("meta"), action.to("meta"), ret.to("meta"), w.to("meta"), red)
        assert [(m.shape, m.dtype) for m in meta] == [(a.shape, a.dtype) for a in got]
        lse, ent = got[2], got[3]
        gp = torch.randn(got[0].shape, generator=g)
        ge = torch.randn(got[1].shape, generator=g)
        assert torch.equal(ops.pg_error_backward(gp, ge, logit, action, ret, w, lse, ent, red),
                           ops.pg_error_backward(gp, ge, logit, action, full_r, full_w, lse, ent, red))
        assert torch.equal(ops.pg_grad_from_stats(gp, ge, logit[..., 4:], action, ret, w, lse, ent, red, 4),
                           ops.pg_grad_from_stats(gp, ge, logit[..., 4:], action, full_r, full_w, lse, ent, red, 4))


def test_broadcast_under_compile_and_vmap():
    g = torch.Generator().manual_seed(4)
    logit = torch.randn(6, 3, 5, generator=g)
    action = torch.randint(0, 5, (6, 3), generator=g)
    ret = torch.randn(6, 1, generator=g)

    def loss(lg, r):
        out = pgext.pg_error(pg_data(lg, action, r))
        return out.policy_loss - 0.1 * out.entropy_loss

    torch._dynamo.reset()
    try:
        compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(logit, ret), loss(logit, ret))
    finally:
        torch._dynamo.reset()
    # an ensemble of 4 policies on one batch, per-member gradients to the broadcast return
    logits = torch.randn(4, 6, 3, 5, generator=g)
    grads = torch.func.vmap(torch.func.grad(loss, argnums=1), in_dims=(0, None))(logits, ret)
    loop = torch.stack([torch.func.grad(loss, argnums=1)(lg, ret) for lg in logits])
    assert grads.shape == (4, 6, 1)
    torch.testing.assert_close(grads, loop)
    # returns vmapped too, each member with its own (6, 1) critic value
    rets = torch.randn(4, 6, 1, generator=g)
    values = torch.func.vmap(loss)(logits, rets)
    torch.testing.assert_close(values, torch.stack([loss(lg, r) for lg, r in zip(logits, rets)]))


def test_broadcast_gradcheck():
    g = torch.Generator().manual_seed(6)
    logit = torch.randn(3, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    action = torch.randint(0, 4, (3, 2), generator=g)
    ret = torch.randn(3, 1, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, generator=g, dtype=torch.float64, requires_grad=True)

    def f(lg, r, wt):
        return tuple(pgext.pg_error(pg_data(lg, action, r), weight=wt, reduction="sum"))

    assert torch.autograd.gradcheck(f, (logit, ret, w))
    assert torch.autograd.gradgradcheck(f, (logit, ret, w))


# ------------------------------------------------------------------------ the out-of-range action
def test_action_error_is_index_and_value_error():
    assert issubclass(pgext.ActionOutOfRangeError, IndexError)
    assert issubclass(pgext.ActionOutOfRangeError, ValueError)
    assert "ActionOutOfRangeError" in pgext.__all__
    e = pickle.loads(pickle.dumps(pgext.ActionOutOfRangeError("x")))
    assert type(e) is pgext.ActionOutOfRangeError and str(e) == "x"


@pytest.mark.parametrize("bad", [-1, 7, 2**40])
def test_every_entry_point_raises_action_out_of_range(bad):
    """Code written against the notebook catches ValueError (Categorical's
    validation); code written against pgext's IndexError keeps working."""
    logit = torch.randn(3, 7, requires_grad=True)
    action = torch.tensor([0, bad, 2])
    ret = torch.randn(3)
    _, _, lse, ent = ops.pg_error_forward(logit.detach(), action.clamp(0, 6), ret, None, "mean")
    calls = [
        lambda: pgext.pg_error(pg_data(logit, action, ret)),                 # the direct call
        lambda: pgext.pg_error([logit, action, ret]),                         # through torch.ops
        lambda: ops.pg_error(logit, action, ret),
        lambda: ops.pg_error_forward(logit.detach(), action, ret, None, "sum"),
        lambda: ops.pg_error_backward(torch.ones(()), torch.ones(()), logit.detach(), action, ret, None, lse, ent,
                                      "mean"),
    ]
    for call in calls:
        with pytest.raises(pgext.ActionOutOfRangeError, match=rf"action {bad} \(sample 1\) .*N = 7"):
            call()
        with pytest.raises(ValueError):
            call()
        with pytest.raises(IndexError):
            call()
    assert logit.grad is None


def test_action_error_from_a_worker_thread():
    """The error raised in another Python thread (the GIL released in the ops)
    is still pgext's type, and the interpreter carries on."""
    import threading

    caught = []

    def run():
        try:
            pgext.pg_error(pg_data(torch.randn(2, 3), torch.tensor([0, 3]), torch.randn(2)))
        except Exception as e:  # noqa: BLE001 - asserted below
            caught.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(caught) == 4 and all(isinstance(e, pgext.ActionOutOfRangeError) for e in caught)


# ------------------------------------------------------------------------ precision at large logits
def test_issue_example_is_exact():
    """ln 3 / 2 exactly (to float32), where x_a - lse in float32 gave -0.548828."""
    logit = torch.tensor([[1e4, -1e4, 0.0], [3e4, 3e4, 3e4]])
    loss = pgext.pg_error(pg_data(logit, torch.tensor([0, 2]), torch.tensor([1.0, -1.0])))
    assert loss.policy_loss.item() == pytest.approx(-math.log(3) / 2, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("magnitude", [1e2, 1e3, 1e4, 1e5, 1e6])
@pytest.mark.parametrize("n", [3, 18, 300])
def test_large_logits_exact_to_rounding(dtype, magnitude, n):
    """Logits of magnitude 1e2..1e6 spread over a few units: log-probs,
    losses and gradients as exact as the accumulation type allows (float64
    reference on the same rounded logits), on every kernel path (short rows,
    long rows)."""
    if dtype == torch.float16 and magnitude > 6e4:
        pytest.skip("beyond float16's range")
    g = torch.Generator().manual_seed(int(math.log10(magnitude)) * 1000 + n)
    rows = 64
    base = torch.randn(rows, 1, generator=g, dtype=torch.float64).sign() * magnitude
    logit = (base + torch.randn(rows, n, generator=g, dtype=torch.float64) * 3).to(dtype)
    action = torch.randint(0, n, (rows,), generator=g)
    ret = torch.randn(rows, generator=g, dtype=torch.float64).to(dtype)
    got, got_g = _grads(_pgext, logit, action, ret, torch.ones(rows, dtype=dtype), "none")

    def shifted_reference(lg, a, r, w, reduction):
        # the notebook's math on x - max (exact in float64, and the same
        # distribution): Categorical's own x - lse rounds at the magnitude's
        # ulp, which for float64 logits is the error being measured
        return _reference(lg - lg.detach().amax(-1, keepdim=True), a, r, w, reduction)

    want, want_g = _grads(shifted_reference, logit.double(), action, ret.double(),
                          torch.ones(rows, dtype=torch.float64), "none")
    acc_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    out_eps = torch.finfo(dtype).eps
    # per-sample terms: a few roundings of the accumulation type relative to
    # log p (a few units, independent of the magnitude), then one of the output dtype
    lp = want[0].abs().max().item() + 1
    for a, e, what in zip(got, want, ("policy", "entropy")):
        err = (a.double() - e).abs().max().item()
        assert err <= 64 * acc_eps * lp * (1 + ret.double().abs().max().item()) + 2 * out_eps * e.abs().max().item(), \
            (what, err)
    gl, el = got_g[0].double(), want_g[0]
    err = (gl - el).abs().max().item()
    # float64 logits: backward's x - lse rounds at the magnitude's ulp, since
    # the saved lse is float64 itself (1e-10 at 1e6, as Categorical's)
    magnitude_term = 4 * acc_eps * magnitude if dtype == torch.float64 else 0.0
    assert err <= 64 * acc_eps * (1 + el.abs().max().item()) * lp + 2 * out_eps * el.abs().max().item() + \
        magnitude_term, ("grad", err)
    # the saved lse carries the magnitude without its float32 rounding
    _, _, lse, _ = ops.pg_error_forward(logit, action, ret, None, "none")
    assert lse.dtype == torch.float64
    exact = torch.logsumexp(logit.double(), -1)
    # (log S summed in the accumulation type: about n roundings; float32's own
    # rounding of lse would be up to 0.03 at 1e6)
    assert (lse - exact).abs().max().item() <= 8 * n * acc_eps + 1e-12 * magnitude


# ------------------------------------------------------------------------ weight-0 samples (padding)
def test_weight_zero_samples_may_carry_any_action():
    """A sample of weight 0 contributes nothing: its action (padding, -100) is
    neither range-checked nor read, on every entry point; the others are
    unchanged, and the padded rows get exactly zero gradient."""
    g = torch.Generator().manual_seed(12)
    logit = torch.randn(4, 6, 9, generator=g)
    action = torch.randint(0, 9, (4, 6), generator=g)
    ret = torch.randn(4, 6, generator=g)
    mask = torch.ones(4, 6)
    mask[1, 3:] = 0
    padded = action.masked_fill(mask == 0, -100)
    for reduction in ("sum", "none"):
        x, y = logit.clone().requires_grad_(), logit.clone().requires_grad_()
        got = pgext.pg_error(pg_data(x, padded, ret), weight=mask, reduction=reduction)
        want = pgext.pg_error(pg_data(y, action, ret), weight=mask, reduction=reduction)
        for a, e in zip(got, want):
            assert torch.equal(a, e)
        sum(o.sum() for o in got).backward()
        sum(o.sum() for o in want).backward()
        assert torch.equal(x.grad, y.grad) and torch.all(x.grad[1, 3:] == 0)
    _, _, lse, ent = ops.pg_error_forward(logit, padded, ret, mask, "none")
    grad = ops.pg_error_backward(torch.ones(4, 6), torch.ones(4, 6), logit, padded, ret, mask, lse, ent, "none")
    assert torch.all(grad[1, 3:] == 0)
    # a bool mask works as the weight too; a nonzero weight still checks its action
    pgext.pg_error(pg_data(logit, padded, ret), weight=mask.bool())
    bad = padded.clone()
    bad[0, 0] = -100
    with pytest.raises(pgext.ActionOutOfRangeError, match=r"action -100 \(sample 0\)"):
        pgext.pg_error(pg_data(logit, bad, ret), weight=mask)
