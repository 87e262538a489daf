"""pgext.log_prob_entropy: per-sample log-probabilities and entropy against
Categorical, for any upstream gradients, with ignore_index, under the
transforms and compilers."""
import pytest
import torch

import pgext
from conftest import categorical_inputs, dtype_id, finite_mask, run_with_upstream

FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
@pytest.mark.parametrize("shape,n", [((64,), 2), ((3, 5), 18), ((7,), 1000), ((2, 2, 3), 37)], ids=str)
@pytest.mark.parametrize("which", ["both", "log_prob", "entropy"])
def test_matches_categorical(dtype, shape, n, which):
    """Values (float32 for half types, float64 for float64) and the logits'
    gradient for independent per-sample upstream gradients of either output,
    or one alone (the other's gradient None)."""
    logit, action = categorical_inputs(shape, n, dtype, seed=n, mask=n > 2)
    g = torch.Generator().manual_seed(1)
    ups = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2)]
    if which != "both":
        ups[0 if which == "entropy" else 1] = None
    got, grad = run_with_upstream(pgext.log_prob_entropy, logit, action, ups)
    # (-inf masks as a finite value far below the row: Categorical's own trick overflows to NaN gradients)
    want, want_grad = run_with_upstream(pgext.reference.log_prob_entropy, finite_mask(logit.double()), action, ups)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for a, e in zip(got, want):
        assert a.dtype == acc and a.shape == action.shape
        torch.testing.assert_close(a.double(), e, rtol=TOL[dtype], atol=TOL[dtype])
    assert grad.dtype == dtype
    tol = TOL[dtype] if dtype in (torch.float32, torch.float64) else 1e-2
    torch.testing.assert_close(grad.double(), want_grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
@pytest.mark.parametrize("n", [18, 1000])
def test_rows_without_an_entropy_gradient(dtype, n):
    """Rows whose entropy has a zero upstream gradient take the kernels'
    policy-only form (p * k): the same gradient as the general form with a
    negligible entropy gradient, row by row, in a batch that mixes both."""
    logit, action = categorical_inputs((24,), n, dtype, seed=n, mask=True)
    g = torch.Generator().manual_seed(5)
    g_lp, g_ent = torch.randn(24, generator=g, dtype=torch.float64), torch.randn(24, generator=g, dtype=torch.float64)
    g_ent[::2] = 0
    _, grad = run_with_upstream(pgext.log_prob_entropy, logit, action, [g_lp, g_ent])
    _, general = run_with_upstream(pgext.log_prob_entropy, logit, action, [g_lp, g_ent.where(g_ent != 0, 1e-30)])
    tol = {torch.float64: 1e-14, torch.float32: 1e-6}.get(dtype, 1e-2)
    torch.testing.assert_close(grad.double(), general.double(), rtol=tol, atol=tol)
    _, want = run_with_upstream(pgext.reference.log_prob_entropy, finite_mask(logit.double()), action, [g_lp, g_ent])
    tol = TOL[dtype] if dtype in (torch.float32, torch.float64) else 1e-2
    torch.testing.assert_close(grad.double(), want, rtol=tol, atol=tol)


def test_ignore_index():
    """Padding: log_prob and entropy exactly 0, gradient rows exactly 0, and
    the ignored value is never range-checked; the other samples are unchanged."""
    logit, action = categorical_inputs((4, 6), 11, torch.float32, seed=3)
    padded = action.clone()
    padded[0, 2] = padded[3, 5] = -100
    g = torch.Generator().manual_seed(2)
    ups = [torch.randn(4, 6, generator=g) for _ in range(2)]
    got, grad = run_with_upstream(pgext.log_prob_entropy, logit, padded, ups, ignore_index=-100)
    full, full_grad = run_with_upstream(pgext.log_prob_entropy, logit, action, ups)
    keep = padded != -100
    for a, e in zip(got, full):
        assert torch.equal(a[keep], e[keep])
        assert torch.all(a[~keep] == 0) and not torch.signbit(a[~keep]).any()
    assert torch.equal(grad[keep], full_grad[keep])
    assert torch.all(grad[~keep] == 0)
    want, want_grad = run_with_upstream(pgext.reference.log_prob_entropy, logit.double(), padded, ups, ignore_index=-100)
    torch.testing.assert_close(got[0].double(), want[0], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad.double(), want_grad, rtol=2e-5, atol=2e-5)
    # an ignore_index inside [0, N) ignores that class's samples
    out = pgext.log_prob_entropy(logit, action, ignore_index=int(action[1, 1]))
    assert out[0][1, 1] == 0
    # other out-of-range actions are still refused
    bad = padded.clone()
    bad[1, 1] = 11
    with pytest.raises(pgext.ActionOutOfRangeError, match=r"log_prob_entropy: action 11"):
        pgext.log_prob_entropy(logit, bad, ignore_index=-100)


def test_bad_arguments():
    logit, action = categorical_inputs((3,), 4, torch.float32)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        pgext.log_prob_entropy(logit, action, ignore_index=1.5)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        pgext.log_prob_entropy(logit, action, ignore_index=True)
    with pytest.raises(TypeError, match="logit must be a torch.Tensor"):
        pgext.log_prob_entropy([1.0], action)
    with pytest.raises(ValueError, match="action must have shape"):
        pgext.log_prob_entropy(logit, action[:2])
    with pytest.raises(TypeError, match="integer class indices"):
        pgext.log_prob_entropy(logit, action.float())
    # the range check runs in pg_error's kernel; the message names the op called
    with pytest.raises(pgext.ActionOutOfRangeError, match=r"log_prob_entropy: action \d+ \(sample 0\)"):
        pgext.log_prob_entropy(logit, action + 4)
    # and pg_error's own, also after log_prob_entropy raised inside it
    with pytest.raises(pgext.ActionOutOfRangeError, match=r"pg_error: action \d+ \(sample 0\)"):
        torch.ops.pgext.pg_error(logit, action + 4, torch.ones(3), None, "none")


def test_saves_at_most_16_bytes_per_sample():
    """Besides its inputs, autograd keeps pg_error's float64 lse and float32
    entropy (12 bytes a sample), and with ignore_index the bool mask (13)."""
    logit, action = categorical_inputs((256,), 1000, torch.float32)
    padded = action.clone()
    padded[::7] = -100
    for kw, limit in (({}, 12), ({"ignore_index": -100}, 13)):
        x = logit.clone().requires_grad_()
        inputs = {x.untyped_storage().data_ptr(), action.untyped_storage().data_ptr(),
                  padded.untyped_storage().data_ptr()}
        seen = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in inputs:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = pgext.log_prob_entropy(x, padded if kw else action, **kw)
        assert sum(seen.values()) <= limit * 256 + 64, (kw, seen)
        (out[0].sum() + out[1].sum()).backward()


def test_opcheck_and_gradcheck():
    logit, action = categorical_inputs((3, 4), 6, torch.float64, seed=5)
    padded = action.clone()
    padded[1, 2] = -1
    torch.library.opcheck(torch.ops.pgext.log_prob_entropy.default, (logit.float(), action, None))
    torch.library.opcheck(torch.ops.pgext.log_prob_entropy.default, (logit.float().requires_grad_(), padded, -1))
    x = logit.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: pgext.log_prob_entropy(t, padded, ignore_index=-1), (x,))
    assert torch.autograd.gradgradcheck(lambda t: pgext.log_prob_entropy(t, padded, ignore_index=-1), (x,))
    assert torch.autograd.gradcheck(lambda t: pgext.log_prob_entropy(t, action), (x,), check_forward_ad=True)


def test_compile_and_vmap():
    logit, action = categorical_inputs((8, 5), 7, torch.float32, seed=6)

    def loss(x):
        log_prob, entropy = pgext.log_prob_entropy(x, action, ignore_index=-100)
        return (log_prob.exp() * 0.3 - 0.01 * entropy).sum()

    torch._dynamo.reset()
    try:
        compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
        x, y = logit.clone().requires_grad_(), logit.clone().requires_grad_()
        compiled(x).backward()
        loss(y).backward()
        torch.testing.assert_close(x.grad, y.grad)
    finally:
        torch._dynamo.reset()
    ensemble = torch.randn(3, 8, 5, 7)
    got = torch.func.vmap(torch.func.grad(loss))(ensemble)
    torch.testing.assert_close(got, torch.stack([torch.func.grad(loss)(e) for e in ensemble]))


def test_large_vocabulary_bfloat16_tokens():
    """Token-level shape: (2, 33) bfloat16 logits over 32000 classes with padding."""
    logit, action = categorical_inputs((2, 33), 32000, torch.bfloat16, seed=8)
    action[1, 20:] = -100
    log_prob, entropy = pgext.log_prob_entropy(logit, action, ignore_index=-100)
    want = pgext.reference.log_prob_entropy(logit.double(), action, ignore_index=-100)
    torch.testing.assert_close(log_prob.double(), want[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(entropy.double(), want[1], rtol=1e-5, atol=1e-4)
