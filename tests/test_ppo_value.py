"""torch.ops.pgext.ppo_value, the fused value loss under pgext.ppo_value_error,
against DI-engine's eager ops (pgext.reference.eager_value): values,
gradients (eager autograd's conventions at ties and NaN included), the
fallback for gradients of the other inputs, second order, its backend-neutral
kernel, registration (opcheck, compile, compiled autograd) and bad input."""
import pytest
import torch

import pgext
from conftest import compiled_autograd_captures, ppo_value_inputs
from pgext.reference import eager_value

OP = torch.ops.pgext.ppo_value
NAN = float("nan")


def _grad(fn, value_new, *rest, upstream=1.0):
    v = value_new.detach().clone().requires_grad_()
    loss = fn(v, *rest)
    loss.backward(torch.tensor(upstream, dtype=loss.dtype))
    return loss, v.grad


def assert_same(a, e):
    """Equal to the bit, NaN where eager has NaN."""
    assert a.dtype == e.dtype and a.shape == e.shape
    torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("use_value_clip", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("n", [1, 64, 1000])
def test_values_and_gradients_match_eager(n, weighted, use_value_clip, dtype):
    vn, vo, ret, w = ppo_value_inputs(n, seed=n, dtype=dtype, weighted=weighted)
    loss, grad = _grad(OP, vn, vo, ret, w, 0.2, use_value_clip)
    ref, ref_grad = _grad(eager_value, vn, vo, ret, w, 0.2, use_value_clip)
    assert loss.dtype == ref.dtype and loss.shape == ref.shape == ()
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(loss, ref, rtol=tol, atol=tol)
    # each sample's gradient rounds as eager's backward ops do
    assert_same(grad, ref_grad)
    _, grad = _grad(OP, vn, vo, ret, w, 0.2, use_value_clip, upstream=-1.7)
    _, ref_grad = _grad(eager_value, vn, vo, ret, w, 0.2, use_value_clip, upstream=-1.7)
    torch.testing.assert_close(grad, ref_grad, rtol=tol, atol=tol * 1e-3)
    if n == 1000:  # the batch reaches every branch
        d = vn - vo
        clipped = vo + d.clamp(-0.2, 0.2)
        v1, v2 = (ret - vn).pow(2), (ret - clipped).pow(2)
        outside = d.abs() > 0.2
        assert (~outside).any() and (outside & (v1 > v2)).any() and (outside & (v1 < v2)).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_and_nan_follow_eager_autograd(dtype):
    """Exact ties of the squared errors (inside and outside the clip range),
    value_new - value_old exactly at +-clip_ratio (clamp passes no gradient
    there), and NaN in each input: the gradient is eager's to the bit."""
    vn = torch.tensor([0.125, 1.0, 1.25, 0.75, 1.25, 0.5, 0.5, NAN, 0.5], dtype=dtype)
    vo = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, NAN, 0.0, 0.0, 0.0], dtype=dtype)
    ret = torch.tensor([1.0, 0.625, 2.0, 2.0, 1.125, 1.0, NAN, 1.0, 0.5], dtype=dtype)
    # 0: inside, vo + (vn - vo) == vn, a tie; 1: outside, ret midway between
    # vn and the clipped 0.25, a tie; 2, 3, 4: exactly on a clip bound; 5, 6,
    # 7: NaN (value_old's leaves value_new a finite gradient); 8: ret == vn
    w = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0, 1.0, 1.0, 1.0, 1.0], dtype=dtype)
    for weight in (None, w):
        for use_value_clip in (True, False):
            loss, grad = _grad(OP, vn, vo, ret, weight, 0.25, use_value_clip)
            ref, ref_grad = _grad(eager_value, vn, vo, ret, weight, 0.25, use_value_clip)
            assert_same(loss, ref)
            assert_same(grad, ref_grad)
    loss, grad = _grad(OP, vn, vo, ret, None, 0.25, True)
    assert loss.isnan() and grad[5].isfinite() and grad[6].isnan() and grad[7].isnan()
    assert grad[8] == 0 and grad[1] != 0  # the tie halves the gradient, not zero it


def test_loss_by_hand():
    # clipped values 0.7, 0.3, 2.0: squared errors max(1, 1.69), max(1, 1.69), max(0.25, 0.25)
    vn, vo = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.5, 0.5, 2.0])
    ret, w = torch.tensor([2.0, -1.0, 2.5]), torch.tensor([1.0, 2.0, 0.5])
    assert float(OP(vn, vo, ret, w)) == pytest.approx(0.5 * (1.69 + 2 * 1.69 + 0.5 * 0.25) / 3)
    assert float(OP(vn, vo, ret, w, 0.2, False)) == pytest.approx(0.5 * (1.0 + 2.0 + 0.125) / 3)


@pytest.mark.parametrize("which", ["value_old", "return_", "weight"])
def test_gradients_of_other_inputs_fall_back_to_eager(which):
    vn, vo, ret, w = ppo_value_inputs(50, seed=3)
    leaves = {"value_old": vo, "return_": ret, "weight": w}

    def grads(fn):
        args = dict(leaves)
        args[which] = args[which].clone().requires_grad_()
        v = vn.clone().requires_grad_()
        loss = fn(v, args["value_old"], args["return_"], args["weight"], 0.2, True)
        return loss, torch.autograd.grad(loss, (v, args[which]))

    loss, got = grads(OP)
    assert loss.grad_fn.name() != "PpoValueBackward"
    ref, want = grads(eager_value)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_forward_mode_falls_back_to_eager():
    vn, vo, ret, w = ppo_value_inputs(20, seed=6)
    tangent = torch.randn(20, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = torch.func.jvp(lambda v: OP(v, vo, ret, w), (vn,), (tangent,))
    want = torch.func.jvp(lambda v: eager_value(v, vo, ret, w, 0.2, True), (vn,), (tangent,))
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    assert got[1] != 0


def test_gradcheck_and_second_order():
    vn, vo, ret, w = ppo_value_inputs(12, seed=5)
    vn = vn.requires_grad_()
    for use_value_clip in (True, False):
        for weight in (None, w):
            f = lambda v: OP(v, vo, ret, weight, 0.2, use_value_clip)  # noqa: E731
            assert torch.autograd.gradcheck(f, (vn,))
            assert torch.autograd.gradgradcheck(f, (vn,))
    # the second derivative is eager's: weight / n where the unclipped error
    # counts, 0 where the clipped one does
    (g,) = torch.autograd.grad(OP(vn, vo, ret, w), vn, create_graph=True)
    (h,) = torch.autograd.grad((g * torch.arange(12.0, dtype=g.dtype)).sum(), vn)
    (rg,) = torch.autograd.grad(eager_value(vn, vo, ret, w, 0.2, True), vn, create_graph=True)
    (rh,) = torch.autograd.grad((rg * torch.arange(12.0, dtype=g.dtype)).sum(), vn)
    torch.testing.assert_close(h, rh, rtol=1e-12, atol=1e-12)
    assert (h != 0).any() and (h == 0).any()


def test_empty_batch_is_nan_as_eager():
    empty = torch.zeros(0)
    loss, grad = _grad(OP, empty, empty, empty, None, 0.2, True)
    ref, _ = _grad(eager_value, empty, empty, empty, None, 0.2, True)
    assert loss.isnan() and ref.isnan() and grad.shape == (0,)


def test_dtype_promotion_and_no_grad():
    vn, vo, ret, w = ppo_value_inputs((4, 5), seed=8, dtype=torch.float32)
    mixed = OP(vn, vo, ret.double(), w.half())
    assert mixed.dtype == eager_value(vn, vo, ret.double(), w.half(), 0.2, True).dtype == torch.float64
    half = OP(vn.half(), vo.half(), ret.half(), None)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), eager_value(vn.half().float(), vo.half().float(), ret.half().float(),
                                                         None, 0.2, True), rtol=1e-3, atol=1e-3)
    with torch.no_grad():
        loss = OP(vn.requires_grad_(), vo, ret, w)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, eager_value(vn, vo, ret, w, 0.2, True))


@pytest.mark.parametrize("use_value_clip", [True, False])
def test_backend_neutral_kernel_matches_cpu_kernel(use_value_clip):
    """The ATen form that CUDA and other backends run, called on the CPU."""
    op = torch.ops.pgext.ppo_value_forward.default
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for weighted in (True, False):
            args = (*ppo_value_inputs(300, seed=7, dtype=dtype, weighted=weighted), 0.2, use_value_clip)
            composite, cpu = op.redispatch(keys, *args), op(*args)
            assert len(composite) == len(cpu) == 2
            for a, e in zip(composite, cpu):
                assert a.dtype == e.dtype == dtype and a.shape == e.shape
                tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
                torch.testing.assert_close(a, e, rtol=tol, atol=tol * 1e-2)


def test_opcheck_and_compile():
    vn, vo, ret, w = ppo_value_inputs(32, seed=9, dtype=torch.float32)
    vn.requires_grad_()
    torch.library.opcheck(OP.default, (vn, vo, ret, w, 0.2, True))
    torch.library.opcheck(OP.default, (vn, vo, ret, None, 0.3, False))
    torch.library.opcheck(torch.ops.pgext.ppo_value_forward.default, (vn.detach(), vo, ret, None, 0.2, True))

    def step(value_new, value_old, return_, weight):
        return pgext.ppo_value_error(pgext.ppo_value_data(value_new * 2.0, value_old, return_, weight))

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(vn, vo, ret, w)
    (grad,) = torch.autograd.grad(loss, vn)
    loss_e = step(vn, vo, ret, w)
    (grad_e,) = torch.autograd.grad(loss_e, vn)
    torch.testing.assert_close(loss, loss_e)
    torch.testing.assert_close(grad, grad_e)


def test_one_node_saving_one_per_sample_tensor():
    """One PpoValueBackward node, whose only tensor of its own is each
    sample's derivative: the rest it saves are the inputs themselves."""
    vn, vo, ret, w = ppo_value_inputs(64, seed=2, dtype=torch.float32)
    vn.requires_grad_()
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = OP(vn, vo, ret, w)
    assert loss.grad_fn.name() == "PpoValueBackward"
    assert [type(f).__name__ for f, _ in loss.grad_fn.next_functions] == ["AccumulateGrad"]
    inputs = {t.data_ptr() for t in (vn, vo, ret, w)}
    own = [t for t in packed if t.data_ptr() not in inputs]
    assert len(packed) == 5 and len(own) == 1 and own[0].shape == vn.shape
    (grad,) = torch.autograd.grad(loss, vn)
    torch.testing.assert_close(grad, own[0])  # the upstream gradient is 1


@pytest.mark.parametrize("bad,exc,match", [
    (dict(vo=torch.zeros(3)), ValueError, r"value_old must have value_new's shape \[4\], got \[3\]"),
    (dict(ret=torch.zeros(4, 1)), ValueError, "return_ must have value_new's shape"),
    (dict(weight=torch.zeros(2, 2)), ValueError, "weight must have value_new's shape"),
    (dict(ret=torch.zeros(4, dtype=torch.int64)), TypeError, "return_ must be float16, bfloat16, float32 or "
                                                             "float64, got Long"),
    (dict(weight=torch.ones(4, dtype=torch.bool)), TypeError, "weight must be float16"),
    (dict(vn=torch.zeros(4, dtype=torch.int32)), TypeError, "value_new must be float16"),
    (dict(vo=torch.zeros(4, device="meta")), ValueError, "value_old is on meta but value_new is on cpu"),
    (dict(clip_ratio=-0.1), ValueError, "clip_ratio must be a finite number >= 0, got -0.1"),
    (dict(clip_ratio=float("inf")), ValueError, "clip_ratio must be a finite number >= 0, got inf"),
    (dict(clip_ratio=NAN), ValueError, "clip_ratio"),
    (dict(vn=torch.zeros(4).to_sparse()), TypeError, "value_new must be a dense"),
])
def test_bad_input(bad, exc, match):
    args = dict(vn=torch.zeros(4), vo=torch.zeros(4), ret=torch.zeros(4), weight=None, clip_ratio=0.2,
                use_value_clip=True)
    args.update(bad)
    with pytest.raises(exc, match=match):
        OP(*args.values())


@pytest.mark.parametrize("use_value_clip", [True, False])
def test_ppo_value_error_keeps_eager_semantics(use_value_clip):
    """pgext.ppo_value_error takes what DI-engine's eager ops take: inputs
    that broadcast (the eager ops run), a bool or integer weight (a mask),
    an integer return; one shape takes the fused op."""
    vn, vo, ret, w = ppo_value_inputs(16, seed=4, dtype=torch.float32)
    mask = w > 0.3
    cases = [
        (vn, vo, ret, w, "PpoValueBackward"),
        (vn, vo, ret, mask, "PpoValueBackward"),
        (vn, vo, ret, mask.long(), "PpoValueBackward"),
        (vn.unsqueeze(1), vo.unsqueeze(1), ret, w, None),  # (B, 1) values against (B,) returns
        (vn.reshape(4, 4), vo.reshape(4, 4), ret.reshape(4, 4), w[:4], None),  # weight broadcast per column
        (vn, vo, ret.round().long(), None, None),
    ]
    for v_new, v_old, r, weight, node in cases:
        v = v_new.detach().clone().requires_grad_()
        got = pgext.ppo_value_error(pgext.ppo_value_data(v, v_old, r, weight), 0.2, use_value_clip)
        assert (got.grad_fn.name() == node) if node else got.grad_fn.name() != "PpoValueBackward"
        (g,) = torch.autograd.grad(got, v)
        v2 = v_new.detach().clone().requires_grad_()
        want = eager_value(v2, v_old, r, weight, 0.2, use_value_clip)
        (g2,) = torch.autograd.grad(want, v2)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(g, g2, rtol=2e-6, atol=1e-9)


def test_ppo_error_value_loss_is_one_node():
    g = torch.Generator().manual_seed(3)
    logit, old = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    action, adv = torch.randint(0, 3, (8,), generator=g), torch.randn(8, generator=g)
    vn, vo, ret, w = ppo_value_inputs(8, seed=3, dtype=torch.float32)
    vn.requires_grad_()
    loss, _ = pgext.ppo_error(pgext.ppo_data(logit, old, action, vn, vo, adv, ret, w))
    ref, _ = pgext.reference.ppo_error(pgext.ppo_data(logit, old, action, vn, vo, adv, ret, w))
    assert loss.value_loss.grad_fn.name() == "PpoValueBackward"
    assert ref.value_loss.grad_fn.name() == "MulBackward0"  # the reference stays DI-engine's eager ops
    torch.testing.assert_close(loss.value_loss, ref.value_loss)


@pytest.mark.parametrize("use_value_clip", [True, False])
def test_compiled_autograd(use_value_clip):
    """Compiled autograd over an eagerly built graph records the value
    loss's node as its functional form: the eager gradients bit for bit."""
    vn, vo, ret, w = ppo_value_inputs(64, seed=11, dtype=torch.float32)
    head = torch.nn.Linear(3, 1)
    feats = torch.randn(64, 3, generator=torch.Generator().manual_seed(12))

    def total():
        value = head(feats).squeeze(-1) + vn
        return pgext.ppo_value_error(pgext.ppo_value_data(value, vo, ret, w), 0.2, use_value_clip)

    want = torch.autograd.grad(total(), tuple(head.parameters()))
    loss = total()
    assert loss.grad_fn.name() == "PpoValueBackward"
    assert compiled_autograd_captures(loss) == 1
    for p, e in zip(head.parameters(), want):
        assert torch.equal(p.grad, e)
