"""Property-based comparison with the reference over random shapes, dtypes, masks and layouts."""
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import (
    FLOAT_DTYPES,
    REDUCTIONS,
    Inputs,
    check_against_reference,
    make_inputs,
    relayout,
)

LAYOUTS = ("contiguous", "step", "offset", "transpose", "slice", "expand")


@st.composite
def cases(draw):
    lead = tuple(draw(st.lists(st.integers(1, 7), min_size=0, max_size=3)))
    N = draw(st.integers(1, 300))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    mask = draw(st.sampled_from([False, 0.1, 0.5, 0.95]))
    layout = draw(st.sampled_from(LAYOUTS))
    weighted = draw(st.booleans())
    reduction = draw(st.sampled_from(REDUCTIONS))
    upstream = draw(st.sampled_from(["default", (1.0, 0.0), (0.0, 1.0), (2.0, None), (None, -1.5)]))
    scale = draw(st.sampled_from([1.0, 1.0, 5.0, 30.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return lead, N, dtype, mask, layout, weighted, reduction, upstream, scale, seed


def build(lead, N, dtype, mask, layout, weighted, scale, seed) -> Inputs:
    if layout == "slice":  # x[..., k, :] of a bigger tensor: every dim strided
        big = make_inputs((*lead, 3), N, dtype, seed, mask, weight=weighted, scale=scale)
        return Inputs(*(None if t is None else t[..., 1, :] if t.dim() == len(lead) + 2 else t[..., 1]
                        for t in big))
    if layout == "expand":  # first leading dim broadcast with stride 0
        if not lead:
            return make_inputs(lead, N, dtype, seed, mask, weight=weighted, scale=scale)
        one = make_inputs((1, *lead[1:]), N, dtype, seed, mask, weight=weighted, scale=scale)
        full = make_inputs(lead, N, dtype, seed + 1, weight=weighted, scale=scale)
        logit = one.logit.expand(*lead, N)
        # actions must stay unmasked in the shared rows: draw them from the finite entries
        g = torch.Generator().manual_seed(seed)
        finite = torch.isfinite(logit).double()
        action = torch.multinomial(finite.reshape(-1, N), 1, generator=g).reshape(lead)
        return full._replace(logit=logit, action=action)
    inp = make_inputs(lead, N, dtype, seed, mask, weight=weighted, scale=scale)
    return Inputs(*(relayout(t, layout) for t in inp))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_matches_reference(case):
    lead, N, dtype, mask, layout, weighted, reduction, upstream, scale, seed = case
    inp = build(lead, N, dtype, mask, layout, weighted, scale, seed)
    assert torch.isfinite(inp.logit).any(-1).all()  # every row keeps a finite logit
    if upstream == "default":
        upstream = None
    elif reduction == "none" and None not in upstream:
        upstream = "random"
    got, _ = check_against_reference(inp, reduction, upstream=upstream)
    assert torch.isfinite(got.entropy).all()
    masked = torch.isneginf(inp.logit)
    assert torch.all(got.grads["logit"][masked] == 0)


@settings(max_examples=25, deadline=None)
@given(
    lead=st.lists(st.integers(1, 5), min_size=1, max_size=2).map(tuple),
    N=st.integers(2, 64),
    reduction=st.sampled_from(REDUCTIONS),
    seed=st.integers(0, 2**31 - 1),
    k=st.floats(0.25, 4.0),
)
def test_weight_is_linear(lead, N, reduction, seed, k):
    """Scaling the weight by k scales both losses by k (k a power of two: exact)."""
    import pgext

    k = 2.0 ** round(math.log2(k))
    inp = make_inputs(lead, N, torch.float64, seed, weight=True)
    a = pgext.pg_error(inp.data, weight=inp.weight, reduction=reduction)
    b = pgext.pg_error(inp.data, weight=inp.weight * k, reduction=reduction)
    torch.testing.assert_close(b.policy_loss, a.policy_loss * k, rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(b.entropy_loss, a.entropy_loss * k, rtol=1e-12, atol=1e-300)


@settings(max_examples=25, deadline=None)
@given(
    N=st.integers(2, 200),
    shift=st.sampled_from([-100.0, -3.0, 0.5, 7.0, 250.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_shift_invariance(N, shift, seed):
    """Adding a constant to a row changes neither loss (float64, so the shift is nearly exact)."""
    import pgext

    inp = make_inputs((4,), N, torch.float64, seed, weight=True, mask=0.2)
    a = pgext.pg_error(inp.data, weight=inp.weight, reduction="none")
    b = pgext.pg_error((inp.logit + shift, inp.action, inp.return_), weight=inp.weight, reduction="none")
    torch.testing.assert_close(b.entropy_loss, a.entropy_loss, rtol=1e-9, atol=1e-10 * (1 + abs(shift)))
    torch.testing.assert_close(b.policy_loss, a.policy_loss, rtol=1e-9, atol=1e-10 * (1 + abs(shift)))
