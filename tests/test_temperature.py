"""The sampling temperature inside the kernels: log_prob_entropy and pg_error
of logit / T against float64 Categorical, on every CPU path (short-row tiles,
long rows, several cache blocks, half types), with masks and ignore_index;
T = 1 bitwise as without it; gradients of any order, forward mode, compile,
vmap, compiled autograd; the checks of bad temperatures."""
import math

import pytest
import torch

import pgext
from conftest import categorical_inputs, dtype_id, finite_mask, run_with_upstream

FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TEMPERATURES = [0.3, 0.7, 1.0, 2.5]
# values: float32 accumulation of logits scaled in float32 (a relative error
# of the scaled logits' ulp, 3 to 10 times larger at T = 0.3 than at T = 1)
TOL = {torch.float64: 1e-10, torch.float32: 5e-5, torch.bfloat16: 5e-5, torch.float16: 5e-5}
# 2: the short-row tiles; 18 and 37: tiles and per-row loops with ragged ends
# (by ISA); 1000: one block; 9000: three cache blocks of 4096 (merged)
SIZES = [((64,), 2), ((3, 5), 18), ((2, 2, 3), 37), ((7,), 1000), ((3,), 9000)]


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
@pytest.mark.parametrize("shape,n", SIZES, ids=str)
def test_matches_categorical_of_scaled_logits(dtype, shape, n, temperature):
    """log_prob, entropy and the logits' gradient (independent upstream
    gradients of both) against Categorical(logits=logit.double() / T), with
    -inf masks; the logits are not modified."""
    logit, action = categorical_inputs(shape, n, dtype, seed=n, mask=n > 2, scale=3)
    before = logit.clone()
    g = torch.Generator().manual_seed(1)
    ups = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2)]
    got, grad = run_with_upstream(pgext.log_prob_entropy, logit, action, ups, temperature=temperature)
    want, want_grad = run_with_upstream(pgext.reference.log_prob_entropy, finite_mask(logit.double()), action, ups,
                           temperature=temperature)
    assert torch.equal(logit, before)
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e, rtol=TOL[dtype], atol=TOL[dtype] / temperature)
    tol = TOL[dtype] / temperature if dtype in (torch.float32, torch.float64) else 1e-2
    torch.testing.assert_close(grad.double(), want_grad, rtol=tol, atol=tol)
    if temperature != 1.0:  # the temperature is applied, not ignored
        plain = pgext.log_prob_entropy(logit, action)[1].double()
        assert (plain - want[1]).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
@pytest.mark.parametrize("shape,n", SIZES, ids=str)
def test_temperature_one_is_bitwise_the_default(dtype, shape, n):
    """temperature=1.0 runs the same arithmetic as no temperature: the same
    bits forward, backward and for the distributed pieces."""
    logit, action = categorical_inputs(shape, n, dtype, seed=n + 1, mask=n > 2, scale=3)
    ups = [torch.randn(shape, dtype=torch.float64) for _ in range(2)]
    a, ga = run_with_upstream(torch.ops.pgext.log_prob_entropy, logit, action, ups)
    b, gb = run_with_upstream(torch.ops.pgext.log_prob_entropy, logit, action, ups, temperature=1.0)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and torch.equal(ga, gb)
    flat, act = logit.reshape(-1, n), action.reshape(-1)
    assert all(torch.equal(x, y) for x, y in zip(torch.ops.pgext.pg_row_stats(flat, act, 0),
                                                 torch.ops.pgext.pg_row_stats(flat, act, 0, 1.0)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_same_as_a_float_copy_divided_by_t(dtype):
    """The kernels read x * (1 / T): as close to pg_error of a float32 copy
    logit / T as rounding allows, also at large logits (3e4)."""
    for n, offset in ((18, 0.0), (5000, 3e4)):
        logit, action = categorical_inputs((33,), n, dtype, seed=n, scale=3)
        logit = (logit.float() + offset).to(dtype)
        got = pgext.log_prob_entropy(logit, action, temperature=0.7)
        want = pgext.log_prob_entropy(logit.float() / 0.7, action)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=5e-3 if offset else 2e-5)


@pytest.mark.parametrize("temperature", [0.3, 2.5])
def test_ignore_index_and_pg_error(temperature):
    """ignore_index with a temperature (ignored samples exactly 0, no
    gradient), and pg_error's reductions and weight at the same temperature."""
    logit, action = categorical_inputs((4, 6), 11, torch.float32, seed=3, scale=3)
    action[1, 2:] = -100
    x = logit.clone().requires_grad_()
    lp, ent = pgext.log_prob_entropy(x, action, temperature=temperature, ignore_index=-100)
    (lp.sum() + ent.sum()).backward()
    assert lp[1, 2:].eq(0).all() and ent[1, 2:].eq(0).all() and x.grad[1, 2:].eq(0).all()
    want = pgext.reference.log_prob_entropy(logit.double(), action, temperature=temperature, ignore_index=-100)
    torch.testing.assert_close(lp.double(), want[0], rtol=5e-5, atol=5e-5)

    action = action.clamp(min=0)
    ret = torch.randn(4, 6)
    weight = torch.rand(4, 6)
    for reduction in ("mean", "sum", "none"):
        got = pgext.pg_error((logit, action, ret), weight=weight, reduction=reduction, temperature=temperature)
        want = pgext.reference.pg_error((logit.double(), action, ret.double()), weight=weight.double(),
                                        reduction=reduction, temperature=temperature)
        for a, e in zip(got, want):
            torch.testing.assert_close(a.double(), e, rtol=5e-5, atol=5e-5)


@pytest.mark.parametrize("temperature", [0.3, 2.5])
def test_gradcheck_gradgradcheck_forward_mode(temperature):
    """float64: first and second order (the composite formulas on logit / T),
    forward mode, through log_prob_entropy and pg_error with weights."""
    logit, action = categorical_inputs((3, 4), 6, torch.float64, seed=5, scale=3)
    padded = action.clone()
    padded[1, 2] = -1
    x = logit.clone().requires_grad_()
    ret = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)

    def lpe(t):
        return pgext.log_prob_entropy(t, padded, temperature=temperature, ignore_index=-1)

    def pge(t, r, wt):
        return tuple(pgext.pg_error((t, action, r), weight=wt, temperature=temperature))

    assert torch.autograd.gradcheck(lpe, (x,), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(lpe, (x,))
    assert torch.autograd.gradcheck(pge, (x, ret, w), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(pge, (x, ret, w))
    # the Hessian (forward over reverse) against the float64 reference
    def f(t):
        lp, ent = pgext.log_prob_entropy(t, action[0], temperature=temperature)
        return (lp * 0.7 - 0.3 * ent).sum()

    def f_ref(t):
        lp, ent = pgext.reference.log_prob_entropy(t, action[0], temperature=temperature)
        return (lp * 0.7 - 0.3 * ent).sum()

    want = torch.func.hessian(f_ref)(logit[0])
    torch.testing.assert_close(torch.func.hessian(f)(logit[0]), want)
    assert want.abs().max() > 1e-3


def test_opcheck_compile_vmap_compiled_autograd():
    logit, action = categorical_inputs((8, 5), 7, torch.float32, seed=6, scale=3)
    torch.library.opcheck(torch.ops.pgext.log_prob_entropy.default, (logit, action, None, 0.7))
    torch.library.opcheck(torch.ops.pgext.pg_error.default,
                          (logit.requires_grad_(), action, torch.randn(8, 5), None, "sum", 2.5))
    logit = logit.detach()

    def loss(x):
        log_prob, entropy = pgext.log_prob_entropy(x, action, temperature=0.7, ignore_index=-100)
        return (log_prob.exp() * 0.3 - 0.01 * entropy).sum()

    torch._dynamo.reset()
    try:
        compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
        x, y = logit.clone().requires_grad_(), logit.clone().requires_grad_()
        compiled(x).backward()
        loss(y).backward()
        torch.testing.assert_close(x.grad, y.grad)
        torch._dynamo.reset()
        z = logit.clone().requires_grad_()
        with torch._dynamo.compiled_autograd._enable(torch.compile(backend="aot_eager")):
            loss(z).backward()
        torch.testing.assert_close(z.grad, y.grad)
    finally:
        torch._dynamo.reset()
    ensemble = torch.randn(3, 8, 5, 7)
    got = torch.func.vmap(torch.func.grad(loss))(ensemble)
    torch.testing.assert_close(got, torch.stack([torch.func.grad(loss)(e) for e in ensemble]))
    got = torch.func.vmap(lambda e: pgext.log_prob_entropy(e, action, temperature=2.5))(ensemble)
    for i, e in enumerate(ensemble):
        want = pgext.log_prob_entropy(e, action, temperature=2.5)
        torch.testing.assert_close(got[0][i], want[0])
        torch.testing.assert_close(got[1][i], want[1])


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, -math.inf, math.nan])
def test_bad_temperature_is_a_value_error(bad):
    logit, action = categorical_inputs((3,), 4, torch.float32, scale=3)
    ret = torch.ones(3)
    with pytest.raises(ValueError, match=r"log_prob_entropy: temperature must be a finite number > 0, got"):
        pgext.log_prob_entropy(logit, action, temperature=bad)
    with pytest.raises(ValueError, match=r"pg_error: temperature must be a finite number > 0, got"):
        pgext.pg_error((logit, action, ret), temperature=bad)
    # the ops themselves (C++), naming the value
    with pytest.raises(ValueError, match=r"log_prob_entropy: temperature must be a finite number > 0, got "
                       r"(0|-1|inf|-inf|nan)$"):
        torch.ops.pgext.log_prob_entropy(logit, action, None, bad)
    for call in (lambda: torch.ops.pgext.pg_error(logit, action, ret, None, "mean", bad),
                 lambda: torch.ops.pgext.pg_error_forward(logit, action, ret, None, "mean", bad),
                 lambda: torch.ops.pgext.pg_row_stats(logit, action, 0, bad),
                 lambda: torch.ops.pgext.pg_error_forward(logit.to("meta"), action.to("meta"), ret.to("meta"),
                                                          None, "mean", bad)):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            call()


@pytest.mark.parametrize("bad", [True, "1.0", None, torch.tensor(1.0), [1.0]], ids=repr)
def test_non_number_temperature_is_a_type_error(bad):
    logit, action = categorical_inputs((3,), 4, torch.float32, scale=3)
    with pytest.raises(TypeError, match="log_prob_entropy: temperature must be a float"):
        pgext.log_prob_entropy(logit, action, temperature=bad)
    with pytest.raises(TypeError, match="pg_error: temperature must be a float"):
        pgext.pg_error((logit, action, torch.ones(3)), temperature=bad)


def test_integers_are_temperatures():
    logit, action = categorical_inputs((5,), 9, torch.float64, scale=3)
    a = pgext.log_prob_entropy(logit, action, temperature=2)
    b = pgext.log_prob_entropy(logit, action, temperature=2.0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_log_prob_entropy_errors_name_it():
    """Checks of log_prob_entropy's inputs name log_prob_entropy, not the
    pg_error it is built on."""
    logit, action = categorical_inputs((3,), 4, torch.float32, scale=3)
    with pytest.raises(ValueError, match="^log_prob_entropy: action must have shape"):
        pgext.log_prob_entropy(logit, action[:2])
    with pytest.raises(TypeError, match="^log_prob_entropy: action must hold integer class indices"):
        pgext.log_prob_entropy(logit, action.float())
    with pytest.raises(TypeError, match="^log_prob_entropy: logit must be float16"):
        pgext.log_prob_entropy(logit.int(), action)
    with pytest.raises(ValueError, match="^log_prob_entropy: logit must have at least one dimension"):
        torch.ops.pgext.log_prob_entropy(torch.tensor(1.0), torch.tensor(1))
    with pytest.raises(TypeError, match="^log_prob_entropy: logit must be a dense"):
        torch.ops.pgext.log_prob_entropy(logit.to_sparse(), action)
    # pg_error's own messages are unchanged
    with pytest.raises(ValueError, match="^pg_error: action must have shape"):
        pgext.pg_error((logit, action[:2], torch.ones(2)))


def test_vmap_rules_with_a_temperature():
    """The batching rules pass the temperature on: pg_error reduced per entry,
    pg_row_stats, against a loop over the entries."""
    logit = torch.randn(3, 6, 9)
    action = torch.randint(0, 9, (3, 6))
    ret = torch.randn(3, 6)
    got = torch.func.vmap(lambda x, a, r: tuple(pgext.pg_error((x, a, r), temperature=0.3)))(logit, action, ret)
    for i in range(3):
        want = pgext.pg_error((logit[i], action[i], ret[i]), temperature=0.3)
        torch.testing.assert_close(got[0][i], want[0])
        torch.testing.assert_close(got[1][i], want[1])
    got = torch.func.vmap(lambda x, a: torch.ops.pgext.pg_row_stats(x, a, 0, 2.5))(logit, action)
    for i in range(3):
        for g, w in zip(got, torch.ops.pgext.pg_row_stats(logit[i], action[i], 0, 2.5)):
            torch.testing.assert_close(g[i], w)
