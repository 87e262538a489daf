"""torch.ops.pgext.ppo_surrogate, the fused clipped surrogate under
pgext.ppo_policy_error, against DI-engine's eager ops (pgext.reference.eager_surrogate):
values, gradients (eager autograd's conventions at ties included), the
fallback for gradients of the advantages or weights, second order, its
backend-neutral kernel, registration (opcheck, compile) and bad input."""
import math

import pytest
import torch

import pgext
from conftest import compiled_autograd_captures, ppo_surrogate_inputs
from pgext.reference import eager_surrogate

OP = torch.ops.pgext.ppo_surrogate


def _grads(fn, lp, ent, *rest):
    lp, ent = lp.detach().clone().requires_grad_(), ent.detach().clone().requires_grad_()
    out = fn(lp, rest[0], ent, *rest[1:])
    (out[0] * 1.7 - 0.3 * out[1]).backward()
    return out, lp.grad, ent.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dual_clip", [None, 2.0])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("n", [1, 64, 1000])
def test_values_and_gradients_match_eager(n, weighted, dual_clip, dtype):
    lp, old, ent, adv, w = ppo_surrogate_inputs(n, seed=n, dtype=dtype, weighted=weighted)
    mine, g_lp, g_ent = _grads(OP, lp, ent, old, adv, w, 0.2, dual_clip)
    ref, r_lp, r_ent = _grads(eager_surrogate, lp, ent, old, adv, w, 0.2, dual_clip)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for a, e in zip(mine, ref):
        assert a.dtype == e.dtype and a.shape == e.shape == ()
        torch.testing.assert_close(a, e, rtol=tol, atol=tol)
    torch.testing.assert_close(g_lp, r_lp, rtol=tol, atol=tol)
    torch.testing.assert_close(g_ent, r_ent, rtol=tol, atol=tol)
    if n == 1000:  # the batch reaches every branch
        ratio = (lp - old).exp()
        assert ((ratio > 1.2) & (adv > 0)).any() and ((ratio < 0.8) & (adv < 0)).any()


def test_ties_follow_eager_autograd():
    """ratio exactly 1 (surr1 == surr2), exactly on a clip bound, adv = 0, and
    clip1 exactly at the dual clip's floor: the gradient is eager's, halves
    included."""
    lp = torch.tensor([-1.0, -1.0, -0.5, -2.0, -1.0], dtype=torch.float64)
    old = lp.clone()  # samples 0 and 4: ratio 1, surr1 == surr2
    old[1] = lp[1] - math.log(1.25)  # ratio exactly 1 + clip_ratio: clamp passes no gradient there
    old[2] = lp[2] - math.log(0.5)  # adv 0: every comparison ties
    old[3] = lp[3] - math.log(2.0)  # ratio 2, adv -2: clip1 = -4 = dual_clip * adv
    adv = torch.tensor([1.0, -1.0, 0.0, -2.0, 2.0], dtype=torch.float64)
    ent = torch.rand(5, dtype=torch.float64)
    for dual_clip in (None, 2.0):
        mine, g_lp, _ = _grads(OP, lp, ent, old, adv, None, 0.25, dual_clip)
        ref, r_lp, _ = _grads(eager_surrogate, lp, ent, old, adv, None, 0.25, dual_clip)
        torch.testing.assert_close(mine[0], ref[0], rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(g_lp, r_lp, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("which", ["adv", "weight", "old"])
def test_gradients_of_other_inputs_fall_back_to_eager(which):
    lp, old, ent, adv, w = ppo_surrogate_inputs(50, seed=3)
    leaves = {"adv": adv, "weight": w, "old": old}
    t = leaves[which].clone().requires_grad_()
    args = {"old": old, "adv": adv, "weight": w, which: t}
    out = OP(lp, args["old"], ent, args["adv"], args["weight"], 0.2, 2.0)
    (got,) = torch.autograd.grad(out[0] + out[1], t)
    t2 = leaves[which].clone().requires_grad_()
    args[which] = t2
    ref = eager_surrogate(lp, args["old"], ent, args["adv"], args["weight"], 0.2, 2.0)
    (want,) = torch.autograd.grad(ref[0] + ref[1], t2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_gradcheck_and_second_order():
    lp, old, ent, adv, w = ppo_surrogate_inputs(12, seed=5)
    lp, ent = lp.requires_grad_(), ent.requires_grad_()
    for dual_clip in (None, 1.5):
        f = lambda a, b: OP(a, old, b, adv, w, 0.2, dual_clip)[:2]  # noqa: E731
        assert torch.autograd.gradcheck(f, (lp, ent))
        assert torch.autograd.gradgradcheck(f, (lp, ent))
    # the second derivative is the ratio's: not zero where the objective is unclipped
    out = OP(lp, old, ent, adv, w, 0.2, None)
    (g,) = torch.autograd.grad(out[0], lp, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), lp)
    ref = eager_surrogate(lp, old, ent, adv, w, 0.2, None)
    (rg,) = torch.autograd.grad(ref[0], lp, create_graph=True)
    (rh,) = torch.autograd.grad(rg.sum(), lp)
    torch.testing.assert_close(h, rh, rtol=1e-12, atol=1e-12)
    assert h.abs().sum() > 0


@pytest.mark.parametrize("dual_clip", [None, 2.0])
def test_backend_neutral_kernel_matches_cpu_kernel(dual_clip):
    """The ATen form that CUDA and other backends run, called on the CPU."""
    op = torch.ops.pgext.ppo_surrogate_forward.default
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    for dtype in (torch.float32, torch.float64):
        args = (*ppo_surrogate_inputs(300, seed=7, dtype=dtype), 0.2, dual_clip)
        composite, cpu = op.redispatch(keys, *args), op(*args)
        assert len(composite) == len(cpu) == 6
        for a, e in zip(composite, cpu):
            assert a.dtype == e.dtype and a.shape == e.shape
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7)


def test_opcheck_and_compile():
    lp, old, ent, adv, w = ppo_surrogate_inputs(32, seed=9, dtype=torch.float32)
    lp.requires_grad_()
    torch.library.opcheck(OP.default, (lp, old, ent, adv, w, 0.2, 2.0))
    torch.library.opcheck(torch.ops.pgext.ppo_surrogate_forward.default, (lp.detach(), old, ent, adv, None, 0.2, None))

    def step(logit, old_logit, action, adv):
        loss, info = pgext.ppo_policy_error(pgext.ppo_policy_data(logit, old_logit, action, adv, None))
        return loss.policy_loss - 0.01 * loss.entropy_loss, info.clipfrac

    g = torch.Generator().manual_seed(1)
    logit = torch.randn(64, 2, generator=g, requires_grad=True)
    old_logit, action, adv2 = torch.randn(64, 2, generator=g), torch.randint(0, 2, (64,), generator=g), torch.randn(64)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss, clipfrac = compiled(logit, old_logit, action, adv2)
    (grad,) = torch.autograd.grad(loss, logit)
    loss_e, clipfrac_e = step(logit, old_logit, action, adv2)
    (grad_e,) = torch.autograd.grad(loss_e, logit)
    torch.testing.assert_close(loss, loss_e)
    torch.testing.assert_close(clipfrac, clipfrac_e)
    torch.testing.assert_close(grad, grad_e)


def test_saves_no_logit_sized_state_and_one_node():
    lp, old, ent, adv, w = ppo_surrogate_inputs(64, seed=2, dtype=torch.float32)
    lp, ent = lp.requires_grad_(), ent.requires_grad_()
    policy_loss, entropy_loss, approx_kl, clipfrac = OP(lp, old, ent, adv, w, 0.2, None)
    assert policy_loss.grad_fn is entropy_loss.grad_fn
    assert policy_loss.grad_fn.name() == "PpoSurrogateBackward"
    assert not approx_kl.requires_grad and not clipfrac.requires_grad and clipfrac.dtype == torch.float32


@pytest.mark.parametrize("bad,exc,match", [
    (dict(adv=torch.zeros(3)), ValueError, "adv must have log_prob's shape"),
    (dict(weight=torch.zeros(4, 1)), ValueError, "weight must have log_prob's shape"),
    (dict(old=torch.zeros(4, dtype=torch.int64)), TypeError, "old_log_prob must be float16"),
    (dict(clip_ratio=-0.1), ValueError, "clip_ratio must be a finite number >= 0, got -0.1"),
    (dict(clip_ratio=float("nan")), ValueError, "clip_ratio"),
    (dict(dual_clip=1.0), ValueError, "dual_clip must be greater than 1.0"),
])
def test_bad_input(bad, exc, match):
    args = dict(lp=torch.zeros(4), old=torch.zeros(4), ent=torch.zeros(4), adv=torch.zeros(4), weight=None,
                clip_ratio=0.2, dual_clip=None)
    args.update(bad)
    with pytest.raises(exc, match=match):
        OP(*args.values())


def test_ppo_policy_error_takes_a_mask_weight():
    """A bool weight (a mask) works as with DI-engine's eager multiplication."""
    g = torch.Generator().manual_seed(4)
    logit, old = torch.randn(16, 3, generator=g), torch.randn(16, 3, generator=g)
    action, adv = torch.randint(0, 3, (16,), generator=g), torch.randn(16, generator=g)
    mask = torch.rand(16, generator=g) > 0.3
    loss, _ = pgext.ppo_policy_error(pgext.ppo_policy_data(logit, old, action, adv, mask))
    ref, _ = pgext.reference.ppo_policy_error(pgext.ppo_policy_data(logit, old, action, adv, mask))
    torch.testing.assert_close(loss.policy_loss, ref.policy_loss)
    torch.testing.assert_close(loss.entropy_loss, ref.entropy_loss)


@pytest.mark.parametrize("dual_clip", [None, 2.0])
def test_compiled_autograd(dual_clip):
    """Compiled autograd over an eagerly built PPO graph records the
    surrogate's node as its functional form: the eager gradients bit for bit."""

    g = torch.Generator().manual_seed(11)
    logit = torch.randn(64, 3, generator=g).requires_grad_()
    old, action, adv = torch.randn(64, 3, generator=g), torch.randint(0, 3, (64,), generator=g), torch.randn(64)
    weight = torch.rand(64, generator=g)

    def total():
        loss, _ = pgext.ppo_policy_error(pgext.ppo_policy_data(logit, old, action, adv, weight), 0.2, dual_clip)
        return loss.policy_loss - 0.01 * loss.entropy_loss

    (want,) = torch.autograd.grad(total(), logit)
    loss = total()
    assert compiled_autograd_captures(loss) == 1
    assert torch.equal(logit.grad, want)
