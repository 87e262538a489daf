"""pgext.linear_log_prob_entropy and pgext.linear_pg_error: the output layer
fused in, against the unfused composition (F.linear, then pgext's ops), for
every chunking, under autograd, torch.compile and opcheck, and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

import pgext
from conftest import dtype_id

OPS = torch.ops.pgext


def _inputs(shape, H, V, dtype, seed=0, bias=True, pad=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) / math.sqrt(H) * 3
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    a = torch.randint(0, V, shape, generator=g)
    if pad is not None and a.numel():
        a.view(-1)[::3] = pad
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(x), cast(w), cast(b), a


def _grads(fn, x, w, b, a, up, **kw):
    """Outputs and the gradients of (input, weight, bias) for upstream
    gradients `up` (None: that output is left out)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w)]
    leaves.append(None if b is None else b.detach().clone().requires_grad_())
    out = fn(leaves[0], leaves[1], a, leaves[2], **kw)
    pairs = [(o, u) for o, u in zip(out, up) if u is not None]
    wrt = [t for t in leaves if t is not None]
    grads = torch.autograd.grad([o for o, _ in pairs], wrt, [u.to(o.dtype) for o, u in pairs])
    return [o.detach() for o in out], list(grads)


def fused(x, w, a, b, **kw):
    return pgext.linear_log_prob_entropy(x, w, a, linear_bias=b, **kw)


def unfused(x, w, a, b, temperature=1.0, ignore_index=None, chunk_size=None):
    return pgext.log_prob_entropy(F.linear(x, w, b) / temperature, a, ignore_index=ignore_index)


def _ups(shape, which, seed=1):
    g = torch.Generator().manual_seed(seed)
    u = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2)]
    return {"both": u, "log_prob": [u[0], None], "entropy": [None, u[1]]}[which]


CASES = [
    # shape, H, V, bias, temperature, ignore_index, chunk_size (classes per slice)
    ((10,), 16, 50, True, 1.0, None, 1),
    ((10,), 16, 50, True, 0.7, None, 3),     # ragged last slice
    ((2, 5), 16, 50, False, 1.3, -100, 4),   # leading dims, no bias, padding
    ((3, 2, 2), 8, 33, True, 2.0, -1, 100),  # slice larger than V
    ((12,), 16, 50, True, 1.0, -100, None),  # default slice size
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("which", ["both", "log_prob", "entropy"])
def test_float64_matches_unfused(case, which):
    shape, H, V, bias, T, ii, chunk = case
    x, w, b, a = _inputs(shape, H, V, torch.float64, seed=V, bias=bias, pad=ii)
    up = _ups(shape, which)
    out, grads = _grads(fused, x, w, b, a, up, temperature=T, ignore_index=ii, chunk_size=chunk)
    want, want_grads = _grads(unfused, x, w, b, a, up, temperature=T, ignore_index=ii)
    for got, exp in zip(out + grads, want + want_grads):
        assert got.dtype == exp.dtype and got.shape == exp.shape
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-11)
    if ii is not None:
        ignored = a == ii
        assert (out[0][ignored] == 0).all() and (out[1][ignored] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("chunk", [1, 7, None])
def test_low_precision(dtype, chunk):
    """float32 within float32's tolerance of the float64 composition on the
    same (rounded) inputs; half types no further from it than the unfused
    half composition (one GEMM in the input dtype each, float32 statistics)."""
    x, w, b, a = _inputs((4, 6), 32, 97, dtype, seed=3, pad=-100)
    up = _ups((4, 6), "both")
    out, grads = _grads(fused, x, w, b, a, up, temperature=0.8, ignore_index=-100, chunk_size=chunk)
    assert out[0].dtype == out[1].dtype == torch.float32
    assert [g.dtype for g in grads] == [dtype] * 3
    exact, exact_grads = _grads(
        lambda x_, w_, a_, b_, **kw: unfused(x_.double(), w_.double(), a_, b_.double(), **kw), x, w, b, a, up,
        temperature=0.8, ignore_index=-100)
    if dtype == torch.float32:
        for got, exp in zip(out + grads, exact + exact_grads):
            torch.testing.assert_close(got.double(), exp.double(), rtol=1e-4, atol=1e-4 * exp.abs().max().item())
        return
    plain, plain_grads = _grads(unfused, x, w, b, a, up, temperature=0.8, ignore_index=-100)
    for got, ref, exp in zip(out + grads, plain + plain_grads, exact + exact_grads):
        scale = exp.abs().max().item()
        err = (got.double() - exp.double()).abs().max().item()
        err_ref = (ref.double() - exp.double()).abs().max().item()
        assert err <= 2 * err_ref + 1e-2 * scale, (err, err_ref, scale)


def test_empty_input():
    x, w, b, a = _inputs((0, 3), 8, 20, torch.float64)
    out, grads = _grads(fused, x, w, b, a, _ups((0, 3), "both"), chunk_size=2)
    assert out[0].shape == out[1].shape == (0, 3)
    assert grads[0].shape == x.shape and (grads[1] == 0).all() and (grads[2] == 0).all()


def test_many_rows_are_tiled():
    # beyond 8 MiB / (256 classes * 4 bytes) rows the rows are tiled too:
    # two row tiles, a full 256-class slice and a ragged one
    rows = (8 << 20) // (256 * 4) + 5
    x, w, b, a = _inputs((rows,), 4, 300, torch.float32, seed=9, pad=-100)
    up = _ups((rows,), "both")
    out, grads = _grads(fused, x, w, b, a, up, ignore_index=-100)
    want, want_grads = _grads(unfused, x, w, b, a, up, ignore_index=-100)
    for got, exp in zip(out + grads, want + want_grads):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-4)


def test_chunk_size_does_not_change_results():
    x, w, b, a = _inputs((37,), 16, 50, torch.float32, seed=5)
    up = _ups((37,), "both")
    ref = _grads(fused, x, w, b, a, up, chunk_size=37)
    for chunk in (1, 5, None):
        got = _grads(fused, x, w, b, a, up, chunk_size=chunk)
        for g, r in zip(got[0] + got[1], ref[0] + ref[1]):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_gradcheck_and_gradgradcheck():
    x, w, b, a = _inputs((5,), 4, 7, torch.float64, seed=2, pad=-100)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]

    def f(x_, w_, b_):
        return pgext.linear_log_prob_entropy(x_, w_, a, linear_bias=b_, temperature=0.9, ignore_index=-100,
                                             chunk_size=2)

    assert torch.autograd.gradcheck(f, leaves)
    assert torch.autograd.gradgradcheck(f, leaves)


@pytest.mark.parametrize("mask", [(True, False, False), (False, True, False), (False, False, True),
                                  (True, False, True), (False, False, False)])
def test_backward_output_mask(mask):
    """A gradient left out of output_mask comes back with shape (0,); the
    others equal the full backward's bitwise (the same GEMMs run)."""
    x, w, b, a = _inputs((2, 9), 8, 40, torch.float32, seed=7, pad=-100)
    lp, ent, lse = OPS.linear_log_prob_entropy_forward(x, w, a, b, 0.8, -100, 6)
    ups = (torch.randn(2, 9), torch.randn(2, 9))
    full = OPS.linear_log_prob_entropy_backward(*ups, x, w, a, b, lse, ent, 0.8, -100, 6, [True] * 3)
    got = OPS.linear_log_prob_entropy_backward(*ups, x, w, a, b, lse, ent, 0.8, -100, 6, list(mask))
    for wanted, g, f in zip(mask, got, full):
        if wanted:
            assert torch.equal(g, f)
        else:
            assert g.shape == (0,)


@pytest.mark.parametrize("frozen", ["weight", "weight_and_bias", "input"])
def test_frozen_parameters(frozen):
    """Leaves without requires_grad (a frozen head, or hidden states from a
    frozen trunk) get no gradient, and the others are unchanged."""
    x, w, b, a = _inputs((11,), 8, 30, torch.float64, seed=8, pad=-100)
    need = {"weight": (True, False, True), "weight_and_bias": (True, False, False),
            "input": (False, True, True)}[frozen]
    leaves = [t.clone().requires_grad_(r) for t, r in zip((x, w, b), need)]
    lp, ent = fused(*leaves[:2], a, leaves[2], temperature=1.1, ignore_index=-100, chunk_size=7)
    (lp.sum() + 0.3 * ent.sum()).backward()
    ref = [t.clone().requires_grad_() for t in (x, w, b)]
    lp, ent = fused(ref[0], ref[1], a, ref[2], temperature=1.1, ignore_index=-100, chunk_size=7)
    (lp.sum() + 0.3 * ent.sum()).backward()
    for leaf, r, wanted in zip(leaves, ref, need):
        if wanted:
            torch.testing.assert_close(leaf.grad, r.grad, rtol=0, atol=0)
        else:
            assert leaf.grad is None


def test_opcheck():
    x, w, b, a = _inputs((6,), 8, 13, torch.float32, seed=4, pad=-100)
    args = (x, w, a, b, 1.5, -100, 4)
    torch.library.opcheck(OPS.linear_log_prob_entropy.default, args)
    torch.library.opcheck(OPS.linear_log_prob_entropy.default,
                          (x.clone().requires_grad_(), w.clone().requires_grad_(), a, b.clone().requires_grad_(),
                           1.5, -100, 4))
    lp, ent, lse = OPS.linear_log_prob_entropy_forward(*args)
    torch.library.opcheck(OPS.linear_log_prob_entropy_forward.default, args)
    for mask in ([True, True, True], [True, False, True], [False, True, False]):
        torch.library.opcheck(OPS.linear_log_prob_entropy_backward.default,
                              (torch.randn(6), torch.randn(6), x, w, a, b, lse, ent, 1.5, -100, 4, mask))
    torch.library.opcheck(OPS.linear_pg_error.default,
                          (x, w, a.clamp_min(0), torch.randn(6), b, None, "mean", 1.0, None))


def test_compile_fullgraph():
    x, w, b, a = _inputs((3, 4), 8, 21, torch.float32, seed=6, pad=-100)

    def loss(x_, w_, b_):
        lp, ent = pgext.linear_log_prob_entropy(x_, w_, a, linear_bias=b_, temperature=1.2, ignore_index=-100,
                                                chunk_size=5)
        return (lp * torch.arange(4.0)).sum() + 0.1 * ent.sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    want_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    compiled(*got_leaves).backward()
    loss(*want_leaves).backward()
    for g, r in zip(got_leaves, want_leaves):
        torch.testing.assert_close(g.grad, r.grad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_linear_pg_error_matches_pg_error(reduction, weighted):
    x, w, b, a = _inputs((3, 4), 8, 21, torch.float64, seed=7)
    g = torch.Generator().manual_seed(8)
    ret = torch.randn(3, 1, generator=g, dtype=torch.float64)  # broadcasts over the 4 actions
    wt = torch.rand(3, 4, generator=g, dtype=torch.float64) if weighted else None

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, w, b, ret)]
        wl = None if wt is None else wt.clone().requires_grad_()
        loss = fn(*leaves, wl)
        (loss.policy_loss.sum() + 0.3 * loss.entropy_loss.sum()).backward()
        return list(loss) + [t.grad for t in leaves] + ([] if wl is None else [wl.grad])

    got = run(lambda x_, w_, b_, r_, wl: pgext.linear_pg_error(
        x_, w_, a, r_, linear_bias=b_, weight=wl, reduction=reduction, temperature=0.5, chunk_size=5))
    want = run(lambda x_, w_, b_, r_, wl: pgext.pg_error(
        pgext.pg_data(F.linear(x_, w_, b_) / 0.5, a, r_), weight=wl, reduction=reduction))
    for gv, wv in zip(got, want):
        torch.testing.assert_close(gv, wv, rtol=1e-10, atol=1e-11)


def test_bad_input():
    x, w, b, a = _inputs((4,), 8, 10, torch.float32)
    f = pgext.linear_log_prob_entropy
    with pytest.raises(ValueError, match="H = 7"):
        f(x[:, :7], w, a)
    with pytest.raises(ValueError, match="linear_bias must have shape"):
        f(x, w, a, linear_bias=b[:9])
    with pytest.raises(ValueError, match="action must have shape"):
        f(x, w, a[:3])
    with pytest.raises(TypeError, match="linear_weight must have input's dtype"):
        f(x, w.double(), a)
    with pytest.raises(TypeError, match="integer class indices"):
        f(x, w, a.float())
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        f(x.int(), w.int(), a)
    with pytest.raises(ValueError, match="linear_weight must have shape"):
        f(x, w[0], a)
    with pytest.raises(ValueError, match="V = 0"):
        f(x, w[:0], a)
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            f(x, w, a, temperature=bad)
        with pytest.raises(ValueError, match="temperature"):
            OPS.linear_log_prob_entropy(x, w, a, None, float(bad), None, None)
    with pytest.raises(ValueError, match="chunk_size must be > 0"):
        f(x, w, a, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size must be > 0"):
        OPS.linear_log_prob_entropy(x, w, a, None, 1.0, None, -2)
    with pytest.raises(TypeError, match="chunk_size"):
        f(x, w, a, chunk_size=2.5)
    with pytest.raises(pgext.ActionOutOfRangeError, match=r"action 10 \(sample 2\)"):
        f(x, w, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(pgext.ActionOutOfRangeError):
        f(x, w, torch.tensor([0, -1, 1, 2]), ignore_index=-100)
    lp, _ = f(x, w, torch.tensor([0, -100, 1, 2]), ignore_index=-100)
    assert lp[1] == 0
    with pytest.raises(ValueError, match="return_ must have the shape"):
        pgext.linear_pg_error(x, w, a, torch.randn(4, 1))
    with pytest.raises(ValueError, match="reduction"):
        pgext.linear_pg_error(x, w, a, torch.randn(4), reduction="avg")
    with pytest.raises(RuntimeError, match="forward-mode"):
        with torch.autograd.forward_ad.dual_level():
            f(torch.autograd.forward_ad.make_dual(x, torch.ones_like(x)), w, a)


# ------------------------------------------------------------------------ the merge over class slices
def _merged_stats(logit, action, slice_classes, part_dtype):
    """pg_merge_row_stats_ of each class slice's pg_row_stats, in order."""
    rows, n = logit.shape
    running = [torch.full((rows,), -math.inf, dtype=torch.float64)] + [torch.zeros(rows, dtype=torch.float64)
                                                                        for _ in range(3)]
    for c0 in range(0, n, slice_classes):
        part = OPS.pg_row_stats(logit[:, c0:c0 + slice_classes].contiguous(), action, c0)
        OPS.pg_merge_row_stats_(*running, *(p.to(part_dtype) for p in part))
    return running


@pytest.mark.parametrize("part_dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_merge_row_stats_equals_the_whole_row(part_dtype):
    """Slices merged one at a time give the whole row's statistics: masked
    slices (-inf, finfo.min) add nothing, a NaN or +inf logit makes its row's
    statistics NaN, an all -inf row stays empty (max -inf, sums 0), the
    action's logit comes from its slice alone."""
    g = torch.Generator().manual_seed(5)
    rows, n = 9, 23
    logit = torch.randn(rows, n, generator=g, dtype=torch.float64) * 4
    action = torch.randint(0, n, (rows,), generator=g)
    logit[1, :8] = -math.inf              # a whole slice masked
    logit[2, 8:16] = torch.finfo(torch.float64).min
    logit[3, 17] = math.nan
    logit[4, 3] = math.inf
    logit[5] = -math.inf                  # no distribution
    logit[6, 20] = 60.0                   # the max moves late
    whole = OPS.pg_row_stats(logit.to(part_dtype), action, 0)
    for slice_classes in (1, 8, 23):
        m, s, q, xa = _merged_stats(logit.to(part_dtype), action, slice_classes, part_dtype)
        for r in range(rows):
            if r in (3, 4):
                assert m[r].isnan() and s[r].isnan() and q[r].isnan(), r
            elif r == 5:
                assert m[r] == -math.inf and s[r] == 0 and q[r] == 0
            else:
                assert m[r] == whole[0][r].double(), r
                tol = 1e-12 if part_dtype == torch.float64 else 1e-5
                torch.testing.assert_close(s[r], whole[1][r].double(), rtol=tol, atol=0)
                torch.testing.assert_close(q[r], whole[2][r].double(), rtol=tol, atol=tol)
        assert torch.equal(xa[[0, 1, 2, 6, 7, 8]], whole[3].double()[[0, 1, 2, 6, 7, 8]])


def test_merge_row_stats_opcheck_and_bad_input():
    rows = 5
    running = [torch.full((rows,), -math.inf, dtype=torch.float64)] + [torch.zeros(rows, dtype=torch.float64)
                                                                        for _ in range(3)]
    part = list(OPS.pg_row_stats(torch.randn(rows, 6), torch.randint(0, 6, (rows,)), 0))
    torch.library.opcheck(OPS.pg_merge_row_stats_.default, (*running, *part))
    with pytest.raises(TypeError, match="running statistics must be float64, got Float"):
        OPS.pg_merge_row_stats_(*[t.float() for t in running], *part)
    with pytest.raises(TypeError, match="float32 or float64, got Half"):
        OPS.pg_merge_row_stats_(*running, *[p.half() for p in part])
    with pytest.raises(TypeError, match="share one dtype"):
        OPS.pg_merge_row_stats_(*running, *part[:3], part[3].double())
    with pytest.raises(ValueError, match=r"every statistic must have shape \[5\], got \[4\]"):
        OPS.pg_merge_row_stats_(*running, *part[:3], part[3][:4])
    with pytest.raises(ValueError, match="1-d"):
        OPS.pg_merge_row_stats_(*[t.view(5, 1) for t in running], *part)
    with pytest.raises(ValueError, match="contiguous"):
        OPS.pg_merge_row_stats_(*running, *part[:3], torch.randn(10)[::2])
