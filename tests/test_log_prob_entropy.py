"""pgext.log_prob_entropy: per-sample log-probabilities and entropy against
Categorical, for any upstream gradients, with ignore_index, under the
transforms and compilers."""
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import pgext
from conftest import categorical_inputs, dtype_id, finite_mask, make_inputs, run_with_upstream, subprocess_env

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


# Short rows go through the CPU kernels W rows at a time (pg_cpu_short_rows.h),
# and a tile none of whose rows has an entropy gradient takes policy-only forms.
# These N cover every build's short-row backward (bfloat16 with AVX2 up to 28).
SHORT_NS = [2, 3, 4, 5, 7, 8, 9, 13, 15, 18, 27]
SHORT_ROWS = 45  # the last tile partial for W = 4, 8 and 16
SHORT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _bits(t):
    """The bit patterns, so that -0 and +0 differ."""
    return t.view({torch.float64: torch.int64, torch.float32: torch.int32}.get(t.dtype, torch.int16))


def _entropy_grads(rows, zero, seed):
    """Entropy upstream gradients that are `zero` but in every third row: every
    tile (W >= 4) mixes rows with and without one."""
    g = torch.full((rows,), zero, dtype=torch.float64)
    g[::3] = torch.randn(len(g[::3]), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return g


def check_short_rows_policy_only(dtype, n, zero, temperature=1.0):
    """log_prob_entropy with an entropy gradient of `zero` (+0.0: None, the
    entropy unused; -0.0: an entropy weight of 0) in every row, so that every
    tile takes the policy-only forms, gives each row the bits that it gets in
    tiles that also hold rows with an entropy gradient (the general forms).
    Compared as bit patterns: a plain p * k fails here, on the sign of zero
    gradients and on the rounding of the action's entry (GCC fuses p * k with
    the one-hot subtraction); so does p * k in AVX2's bfloat16 tiles of
    N >= 8 wherever a row's k is -0 (rows 5 and 6)."""
    rows = SHORT_ROWS
    logit, action = categorical_inputs((rows,), n, dtype, seed=n, mask=True)
    g_lp = torch.randn(rows, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    g_lp[[5, 6]] = 0  # k = -0 in these rows (the return is -1); the other tiles have no k == 0
    plus = math.copysign(1.0, zero) > 0
    alone_ent = None if plus else torch.full((rows,), zero, dtype=torch.float64)
    _, alone = run_with_upstream(pgext.log_prob_entropy, logit, action, [g_lp, alone_ent], temperature=temperature)
    g_ent = _entropy_grads(rows, zero, seed=n)
    _, mixed = run_with_upstream(pgext.log_prob_entropy, logit, action, [g_lp, g_ent], temperature=temperature)
    free = g_ent == 0
    if plus:
        # masked logits (p = 0) of rows with k < 0: p * k alone would make them -0
        assert (mixed[free & (g_lp > 0)] == 0).any()
    assert torch.equal(_bits(alone[free]), _bits(mixed[free])), (dtype, n, zero, temperature)
    return logit, action, g_lp, alone


@pytest.mark.parametrize("dtype", SHORT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n", SHORT_NS)
@pytest.mark.parametrize("zero", [0.0, -0.0], ids=["none", "minus_zero"])
def test_short_rows_without_an_entropy_gradient(dtype, n, zero):
    """check_short_rows_policy_only, also with a temperature (the exponent
    x / T - lse: one fused multiply-add), and those gradients against the
    float64 reference."""
    check_short_rows_policy_only(dtype, n, zero, temperature=0.7)
    logit, action, g_lp, alone = check_short_rows_policy_only(dtype, n, zero)
    _, want = run_with_upstream(pgext.reference.log_prob_entropy, finite_mask(logit.double()), action, [g_lp, None])
    tol = {torch.float64: 1e-12, torch.float32: 2e-6}.get(dtype, 1e-2)
    torch.testing.assert_close(alone.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("n", [2, 5, 9, 18])
def test_pg_error_short_rows_with_entropy_weight_zero(dtype, n):
    """pg_error's `policy - 0.0 * entropy` (per-sample entropy gradients -0),
    rows of weight 0 and negative return (k = -0) among them: the bits of the
    same rows in tiles that mix in rows with an entropy gradient."""
    inp = make_inputs((SHORT_ROWS,), n, dtype, seed=n, mask=True, weight=True)
    weight, ret = inp.weight.clone(), inp.return_.clone()
    weight[[3, 4]], ret[[3, 4]] = 0, -1.5

    def grad(g_ent):
        x = inp.logit.clone().requires_grad_()
        out = pgext.pg_error((x, inp.action, ret), weight=weight, reduction="none")
        if g_ent is None:
            return torch.autograd.grad(out.policy_loss.sum() - 0.0 * out.entropy_loss.sum(), x)[0]
        return torch.autograd.grad([out.policy_loss, out.entropy_loss], [x],
                                   [torch.ones_like(out.policy_loss), g_ent.to(out.entropy_loss.dtype)])[0]

    g_ent = _entropy_grads(SHORT_ROWS, -0.0, seed=n)
    free = g_ent == 0
    assert torch.equal(_bits(grad(None)[free]), _bits(grad(g_ent)[free]))


@pytest.mark.parametrize("n", [2, 5, 18])
def test_ppo_short_rows_with_entropy_weight_zero(n):
    """PPO without an entropy bonus (policy-only tiles throughout) against the
    float64 reference."""
    inp = make_inputs((SHORT_ROWS,), n, torch.float64, seed=n, mask=True)
    old = inp.logit + 0.3 * torch.randn(inp.logit.shape, generator=torch.Generator().manual_seed(n),
                                        dtype=torch.float64)
    grads = []
    for impl, logit in ((pgext, inp.logit), (pgext.reference, finite_mask(inp.logit))):
        x = logit.clone().requires_grad_()
        loss, _ = impl.ppo_policy_error(pgext.ppo_policy_data(x, old, inp.action, inp.return_, None))
        grads.append(torch.autograd.grad(loss.policy_loss - 0.0 * loss.entropy_loss, x)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-13, atol=1e-13)


_BUILD_CHILD = textwrap.dedent("""
    import sys
    import torch
    import pgext
    sys.path.insert(0, sys.argv[1])
    from test_log_prob_entropy import SHORT_DTYPES, SHORT_NS, check_short_rows_policy_only
    print(torch.backends.cpu.get_cpu_capability(), {pgext._C.cpu_capability(d) for d in SHORT_DTYPES})
    for dtype in SHORT_DTYPES:
        for n in SHORT_NS:
            for zero in (0.0, -0.0):
                for temperature in (1.0, 0.7):
                    check_short_rows_policy_only(dtype, n, zero, temperature)
""")


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_short_rows_without_an_entropy_gradient_in_other_kernel_builds(capability):
    """check_short_rows_policy_only in the DEFAULT and AVX2 kernel builds
    (ATEN_CPU_CAPABILITY), which have short-row forms of their own: at::vec's
    generic code, and AVX2's bfloat16 tiles of N >= 8 (the factored form).
    The build this CPU picks runs the tests above."""
    proc = subprocess.run([sys.executable, "-c", _BUILD_CHILD, str(Path(__file__).parent)],
                          env=subprocess_env(ATEN_CPU_CAPABILITY=capability), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    torch_cap, pgext_caps = proc.stdout.splitlines()[0].split(" ", 1)
    if torch_cap != capability.upper():
        pytest.skip(f"this CPU has no {capability} (ATen picked {torch_cap})")
    assert pgext_caps == repr({capability.upper()})


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
