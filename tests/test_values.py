"""Forward values of pgext.pg_error against the Categorical reference."""
import math

import pytest
import torch

import pgext
from conftest import (
    FLOAT_DTYPES,
    HALF_DTYPES,
    INT_DTYPES,
    REDUCTIONS,
    TOL,
    assert_close,
    check_against_reference,
    dtype_id,
    evaluate,
    grad_scales,
    least_precise,
    make_inputs,
    pgext_fn,
    reference,
    relayout,
)

# (leading shape, N): the notebook's (4, 32), degenerate and wide rows, several leading
# dims, 1-D logit with a 0-d action, N == 1.
SHAPES = [
    ((4,), 32),
    ((1,), 1),
    ((64,), 2),
    ((3, 5), 7),
    ((5,), 70001),
    ((), 9),
    ((2, 3, 4), 5),
    ((7,), 1),
]


def shape_id(s):
    lead, N = s
    return "x".join(map(str, (*lead, N)))


# ------------------------------------------------------------------------ API surface
def test_namedtuples():
    assert pgext.pg_data._fields == ("logit", "action", "return_")
    assert pgext.pg_loss._fields == ("policy_loss", "entropy_loss")


def test_returns_pg_loss_and_accepts_any_3_tuple():
    inp = make_inputs((4,), 32, seed=1)
    a = pgext.pg_error(pgext.pg_data(*inp.data))
    b = pgext.pg_error(tuple(inp.data))
    assert isinstance(a, pgext.pg_loss) and isinstance(b, pgext.pg_loss)
    assert torch.equal(a.policy_loss, b.policy_loss)
    assert torch.equal(a.entropy_loss, b.entropy_loss)


def test_notebook_example():
    """The notebook's test_pg, plus the values it never checked."""
    torch.manual_seed(0)
    B, N = 4, 32
    logit = torch.randn(B, N)
    logit.requires_grad = True
    action = torch.randint(0, N, size=(B,))
    return_ = torch.randn(B) * 2
    loss = pgext.pg_error(pgext.pg_data(logit, action, return_))
    assert all(l.shape == tuple() for l in loss)
    assert logit.grad is None
    sum(loss).backward()
    assert isinstance(logit.grad, torch.Tensor) and logit.grad.shape == (B, N)

    ref_logit = logit.detach().double().requires_grad_()
    ref = pgext.reference.pg_error((ref_logit, action, return_.double()))
    sum(ref).backward()
    torch.testing.assert_close(loss.policy_loss.double(), ref.policy_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.entropy_loss.double(), ref.entropy_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logit.grad.double(), ref_logit.grad, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------ values vs reference
@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_values_match_reference(shape, dtype, reduction, weighted):
    lead, N = shape
    inp = make_inputs(lead, N, dtype, seed=hash((lead, N)) % 1000, weight=weighted)
    got, _ = check_against_reference(inp, reduction, grads=False)
    expected_shape = tuple(lead) if reduction == "none" else ()
    assert tuple(got.policy.shape) == expected_shape
    assert tuple(got.entropy.shape) == expected_shape


@pytest.mark.parametrize(
    "logit_dtype,return_dtype,weight_dtype",
    [
        (torch.float16, torch.float32, None),
        (torch.bfloat16, torch.float32, None),
        (torch.float16, torch.float16, torch.float32),
        (torch.bfloat16, torch.bfloat16, torch.float64),
        (torch.float32, torch.float64, None),
        (torch.float32, torch.float16, None),
        (torch.float32, torch.float32, torch.bfloat16),
        (torch.float64, torch.float32, torch.float16),
        (torch.float16, torch.bfloat16, None),
    ],
    ids=lambda d: "none" if d is None else dtype_id(d),
)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_dtype_promotion(logit_dtype, return_dtype, weight_dtype, reduction):
    inp = make_inputs((6,), 11, logit_dtype, seed=3, weight=weight_dtype is not None,
                      return_dtype=return_dtype, weight_dtype=weight_dtype)
    # checks output dtype == promote_types(logit, return_, weight), grad dtypes, and values
    check_against_reference(inp, reduction)


@pytest.mark.parametrize("action_dtype", INT_DTYPES + (torch.uint16, torch.uint32, torch.uint64), ids=dtype_id)
def test_action_integer_dtypes(action_dtype):
    inp = make_inputs((5, 3), 100, torch.float32, seed=4, weight=True)
    base = evaluate(pgext_fn, inp, reduction="none")
    other = inp._replace(action=inp.action.to(action_dtype))
    got = evaluate(pgext_fn, other, reduction="none")
    assert torch.equal(got.policy, base.policy)
    assert torch.equal(got.entropy, base.entropy)
    for k in base.grads:
        assert torch.equal(got.grads[k], base.grads[k]), k
    check_against_reference(inp, "none", got=got)


# ------------------------------------------------------------------------ special rows
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_single_class_rows(dtype, reduction):
    """N == 1: the only action has probability 1: log_prob 0, entropy 0, zero gradient."""
    inp = make_inputs((5,), 1, dtype, seed=5, weight=True, scale=10.0)
    got = evaluate(pgext_fn, inp, reduction=reduction)
    assert torch.all(got.policy == 0), got.policy
    assert torch.all(got.entropy == 0), got.entropy
    assert torch.all(got.grads["logit"] == 0)
    assert torch.all(got.grads["return_"] == 0)
    assert torch.all(got.grads["weight"] == 0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("p", [0.3, 0.97])
def test_masked_logits(dtype, reduction, p):
    inp = make_inputs((6, 5), 40, dtype, seed=6, mask=p, weight=True)
    # a row where only the taken action is finite: a point mass
    logit = inp.logit.clone()
    logit[2, 3] = -math.inf
    logit[2, 3, inp.action[2, 3]] = 1.5
    inp = inp._replace(logit=logit)
    got, _ = check_against_reference(inp, reduction)
    assert torch.isfinite(got.entropy).all() and torch.isfinite(got.policy).all()
    if reduction == "none":
        assert got.entropy[2, 3] == 0
        assert got.policy[2, 3] == 0


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("offset", [1e4, 3e4, -3e4])
def test_large_logits(dtype, offset):
    """Logits around +-1e4..3e4 stay finite; entropy keeps its absolute accuracy."""
    inp = make_inputs((8,), 300, dtype, seed=7, weight=True, offset=offset, scale=3.0)
    got = evaluate(pgext_fn, inp, reduction="none")
    ref = reference(inp, reduction="none")
    for k, v in [("policy", got.policy), ("entropy", got.entropy), *got.grads.items()]:
        assert torch.isfinite(v).all(), k
    # entropy does not involve the size of the logits: H = log S - U/S with shifted U.
    # (the unshifted T/S form loses ~1e-3 at 3e4 in float32.)
    ent_atol = {torch.float64: 1e-10, torch.float32: 2e-5}.get(dtype, 1e-5)
    assert_close(got.entropy, ref.entropy, tol_dtype=dtype if dtype in HALF_DTYPES else None,
                 atol=ent_atol, scale=inp.weight.double(), what="entropy")
    # log_prob = x_a - lse: lse is rounded to the accumulation type (float32 for all but float64)
    ulp = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps * abs(offset)
    pol_scale = inp.weight.double() * inp.return_.double().abs()
    assert_close(got.policy, ref.policy, atol=2 * ulp, scale=pol_scale, what="policy")
    scales = grad_scales(inp, "none", ref.upstream)
    assert_close(got.grads["logit"], ref.grads["logit"], atol=max(TOL[dtype]["atol"], 2 * ulp),
                 scale=scales["logit"], floor=scales["logit_floor"], what="grad logit")


# ------------------------------------------------------------------------ weight & reduction
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
def test_weight_semantics(dtype):
    inp = make_inputs((9, 4), 17, dtype, seed=8, weight=True)
    tol = dict(tol_dtype=dtype)
    plain = evaluate(pgext_fn, inp._replace(weight=None), reduction="none", wrt=())
    weighted = evaluate(pgext_fn, inp, reduction="none", wrt=())
    w = inp.weight.double()
    # weight multiplies each sample's policy and entropy term
    assert_close(weighted.policy, plain.policy.double() * w, what="policy", **tol)
    assert_close(weighted.entropy, plain.entropy.double() * w, what="entropy", **tol)
    # weight of ones is the same as no weight
    ones = evaluate(pgext_fn, inp._replace(weight=torch.ones_like(inp.weight)), reduction="mean", wrt=())
    none_w = evaluate(pgext_fn, inp._replace(weight=None), reduction="mean", wrt=())
    assert_close(ones.policy, none_w.policy, **tol)
    assert_close(ones.entropy, none_w.entropy, **tol)
    # zero weight: 'mean' still divides by all samples
    w0 = inp.weight.clone()
    w0[:3] = 0
    part = evaluate(pgext_fn, inp._replace(weight=w0), reduction="mean", wrt=())
    rows = plain.entropy.double()[3:] * w[3:]
    assert_close(part.entropy, rows.sum() / inp.action.numel(), what="mean over all samples", **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("lead", [(13,), (2, 3, 5), ()], ids=str)
def test_reduction_relations(dtype, lead):
    inp = make_inputs(lead, 23, dtype, seed=9, weight=True)
    res = {r: evaluate(pgext_fn, inp, reduction=r, wrt=()) for r in REDUCTIONS}
    none = res["none"]
    assert none.policy.shape == inp.action.shape and none.entropy.shape == inp.action.shape
    count = max(inp.action.numel(), 1)
    for attr in ("policy", "entropy"):
        rows = getattr(none, attr).double()
        assert_close(getattr(res["sum"], attr), rows.sum(), scale=rows.abs().sum(), what=f"sum {attr}")
        assert_close(getattr(res["mean"], attr), rows.sum() / count, scale=rows.abs().mean(),
                     what=f"mean {attr}")


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=dtype_id)
def test_empty_batch(lead, dtype):
    inp = make_inputs(lead, 6, dtype, seed=10, weight=True)
    mean = evaluate(pgext_fn, inp, reduction="mean")
    assert mean.policy.shape == () and torch.isnan(mean.policy) and torch.isnan(mean.entropy)
    s = evaluate(pgext_fn, inp, reduction="sum")
    assert s.policy.shape == () and s.policy.item() == 0 and s.entropy.item() == 0
    for res in (mean, s):
        assert res.grads["logit"].shape == inp.logit.shape
        assert res.grads["return_"].shape == inp.return_.shape
    n = evaluate(pgext_fn, inp, reduction="none")
    assert n.policy.shape == lead and n.entropy.shape == lead
    assert n.policy.dtype == dtype and mean.policy.dtype == dtype


# ------------------------------------------------------------------------ layouts
def _check_layout(inp, reduction="mean"):
    check_against_reference(inp, reduction)
    contiguous = inp._replace(**{k: (None if v is None else v.contiguous()) for k, v in inp._asdict().items()})
    a = evaluate(pgext_fn, inp, reduction=reduction)
    b = evaluate(pgext_fn, contiguous, reduction=reduction)
    # same numbers up to accumulation order (a strided path may not vectorize)
    tol = dict(tol_dtype=least_precise(a.policy.dtype, torch.float32))
    assert_close(a.policy, b.policy, **tol)
    assert_close(a.entropy, b.entropy, **tol)
    for k in b.grads:
        assert_close(a.grads[k], b.grads[k], scale=b.grads[k].abs().max(), what=k,
                     tol_dtype=least_precise(b.grads[k].dtype, torch.float32))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_middle_slice(reduction):
    full = make_inputs((6, 3), 50, seed=11, weight=True)
    inp = full._replace(logit=full.logit[:, 1, :], action=full.action[:, 1],
                        return_=full.return_[:, 2], weight=full.weight[:, 0])
    assert not inp.logit.is_contiguous() and not inp.action.is_contiguous()
    _check_layout(inp, reduction)


@pytest.mark.parametrize("kind", ["transpose", "step", "offset"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_strided_layouts(kind, dtype, reduction):
    inp = make_inputs((5, 4), 33, dtype, seed=12, weight=True, mask=0.2)
    inp = type(inp)(*(relayout(t, kind) for t in inp))
    assert not inp.logit.is_contiguous()
    _check_layout(inp, reduction)


def test_transposed_logit_columns():
    """logit given as base.t(): the class dimension has stride B."""
    base = make_inputs((70,), 30, seed=13)
    logit = base.logit.t().contiguous().t()
    assert logit.stride() == (1, 70)
    _check_layout(base._replace(logit=logit))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_expanded_inputs(reduction):
    """Stride-0 broadcasting views: one row of logits shared by all samples."""
    one = make_inputs((1,), 25, seed=14, weight=True)
    B = 8
    g = torch.Generator().manual_seed(15)
    inp = one._replace(
        logit=one.logit.expand(B, 25),
        action=torch.randint(0, 25, (B,), generator=g),
        return_=torch.randn(B, generator=g),
        weight=one.weight.expand(B),
    )
    assert inp.logit.stride() == (0, 1)
    _check_layout(inp, reduction)
    # gradient through the expand: reference on the unexpanded base
    base = one.logit.detach().clone().requires_grad_()
    pgext_out = pgext.pg_error((base.expand(B, 25), inp.action, inp.return_), weight=inp.weight)
    (3 * pgext_out.policy_loss - 0.5 * pgext_out.entropy_loss).backward()
    rbase = one.logit.detach().double().requires_grad_()
    r = pgext.reference.pg_error((rbase.expand(B, 25), inp.action, inp.return_.double()), weight=inp.weight.double())
    (3 * r.policy_loss - 0.5 * r.entropy_loss).backward()
    assert_close(base.grad, rbase.grad, scale=rbase.grad.abs().max(), what="grad of expanded base")


def test_overlapping_as_strided_rows():
    """Rows that overlap in memory (as_strided with row stride < N)."""
    g = torch.Generator().manual_seed(16)
    storage = torch.randn(200, generator=g)
    logit = storage.as_strided((10, 40), (7, 1))
    action = torch.randint(0, 40, (10,), generator=g)
    inp = make_inputs((10,), 40, seed=16)._replace(logit=logit, action=action)
    check_against_reference(inp, "none", grads=False)


# ------------------------------------------------------------------------ misc behaviour
def test_no_grad_and_inference_mode():
    inp = make_inputs((4,), 32, seed=17, weight=True)
    logit = inp.logit.clone().requires_grad_()
    expected = pgext.pg_error((logit, inp.action, inp.return_), weight=inp.weight)
    assert expected.policy_loss.requires_grad and expected.entropy_loss.requires_grad
    with torch.no_grad():
        a = pgext.pg_error((logit, inp.action, inp.return_), weight=inp.weight)
    with torch.inference_mode():
        b = pgext.pg_error((logit, inp.action, inp.return_), weight=inp.weight)
    for out in (a, b):
        assert not out.policy_loss.requires_grad
        assert torch.equal(out.policy_loss, expected.policy_loss.detach())
        assert torch.equal(out.entropy_loss, expected.entropy_loss.detach())
    plain = pgext.pg_error(inp.data, weight=inp.weight)
    assert not plain.policy_loss.requires_grad and not plain.entropy_loss.requires_grad


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_inputs_not_modified(reduction):
    inp = make_inputs((6, 2), 21, seed=18, weight=True, mask=True)
    copies = [t.clone() for t in inp]
    evaluate(pgext_fn, inp, reduction=reduction)
    for before, after in zip(copies, inp):
        assert torch.equal(before, after)


def test_results_do_not_alias_inputs():
    inp = make_inputs((5,), 8, seed=19, weight=True)
    out = pgext.pg_error(inp.data, weight=inp.weight, reduction="none")
    ptrs = {t.untyped_storage().data_ptr() for t in inp}
    assert out.policy_loss.untyped_storage().data_ptr() not in ptrs
    assert out.entropy_loss.untyped_storage().data_ptr() not in ptrs
    assert out.policy_loss.untyped_storage().data_ptr() != out.entropy_loss.untyped_storage().data_ptr()
