"""The PPO and A2C losses with DI-engine's API, against pgext.reference
(DI-engine's formulas, eager Categorical)."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import pgext
from pgext import a2c_data, ppo_data, ppo_policy_data


def _batch(lead, n, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    new = torch.randn(*lead, n, generator=g, dtype=dtype)
    old = new + 0.3 * torch.randn(*lead, n, generator=g, dtype=dtype)  # ratios on both sides of the clip
    action = torch.randint(0, n, lead, generator=g)
    per = lambda: torch.randn(lead[:1] if len(lead) > 1 else lead, generator=g, dtype=dtype)  # noqa: E731
    return new, old, action, per


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def _close(a, e, tol=1e-9):
    torch.testing.assert_close(torch.as_tensor(a).double(), torch.as_tensor(e).double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("old", ["logits", "log_probs"])
@pytest.mark.parametrize("lead,n", [((64,), 2), ((256,), 18), ((6, 3), 5)], ids=str)
def test_ppo_policy_error_matches_reference(lead, n, dual_clip, weighted, old):
    """(6, 3) logits with (6,) advantages: DI-engine's multi-agent form (the
    ratio and entropy averaged over the agents)."""
    new, logit_old, action, per = _batch(lead, n, seed=n + len(lead))
    adv, weight = per(), (per().abs() if weighted else None)
    if old == "log_probs":
        logit_old = torch.log_softmax(logit_old, -1).gather(-1, action.unsqueeze(-1)).squeeze(-1)
    (x,), (y,) = _leaves(new), _leaves(new)
    loss, info = pgext.ppo_policy_error(ppo_policy_data(x, logit_old, action, adv, weight), 0.2, dual_clip)
    ref, ref_info = pgext.reference.ppo_policy_error(ppo_policy_data(y, logit_old, action, adv, weight), 0.2,
                                                     dual_clip)
    for a, e in zip(loss + info, ref + ref_info):
        assert isinstance(a, torch.Tensor) and a.dim() == 0
        _close(a, e)
    (loss.policy_loss - 0.01 * loss.entropy_loss).backward()
    (ref.policy_loss - 0.01 * ref.entropy_loss).backward()
    _close(x.grad, y.grad)
    assert 0 < float(info.clipfrac) < 1 or lead == (6, 3)


@pytest.mark.parametrize("use_value_clip", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ppo_error_matches_reference(use_value_clip, dtype):
    new, old, action, per = _batch((128,), 9, seed=4, dtype=dtype)
    value_old, adv, ret, weight = per(), per(), per(), per().abs()
    value_new = value_old + 0.4 * per()
    mine = _leaves(new, value_new)
    theirs = _leaves(new, value_new)
    loss, info = pgext.ppo_error(ppo_data(mine[0], old, action, mine[1], value_old, adv, ret, weight), 0.2,
                                 use_value_clip)
    ref, ref_info = pgext.reference.ppo_error(
        ppo_data(theirs[0], old, action, theirs[1], value_old, adv, ret, weight), 0.2, use_value_clip)
    assert loss._fields == ("policy_loss", "value_loss", "entropy_loss") and info._fields == ("approx_kl", "clipfrac")
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    for a, e in zip(loss + info, ref + ref_info):
        _close(a, e, tol)
    sum(loss).backward()
    sum(ref).backward()
    for a, e in zip(mine, theirs):
        _close(a.grad, e.grad, tol)


def test_ppo_value_loss_by_hand():
    """DI-engine's documented value clip: 0.5 * mean(w * max((R - v)^2, (R - v_clip)^2))."""
    v_new, v_old = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.5, 0.5, 2.0])
    ret, w = torch.tensor([2.0, -1.0, 2.5]), torch.tensor([1.0, 2.0, 0.5])
    got = pgext.ppo_value_error(pgext.ppo_value_data(v_new, v_old, ret, w), clip_ratio=0.2)
    # clipped values: 0.7, 0.3, 2.0
    want = 0.5 * (1.0 * max(1.0, 1.69) + 2.0 * max(1.0, 1.69) + 0.5 * max(0.25, 0.25)) / 3
    assert float(got) == pytest.approx(want)
    plain = pgext.ppo_value_error(pgext.ppo_value_data(v_new, v_old, ret, w), 0.2, use_value_clip=False)
    assert float(plain) == pytest.approx(0.5 * (1.0 + 2.0 + 0.125) / 3)


def test_dual_clip_by_hand():
    """The dual clip applies only where adv < 0: the term is
    -max(min(surr1, surr2), c * adv) there and -min(surr1, surr2) elsewhere."""
    logit_old = torch.zeros(2, 2)
    logit_new = torch.tensor([[3.0, 0.0], [3.0, 0.0]])    # ratio p_new(0) / 0.5 = 1.905
    action = torch.tensor([0, 0])
    adv = torch.tensor([1.0, -1.0])
    loss, info = pgext.ppo_policy_error(ppo_policy_data(logit_new, logit_old, action, adv, None), 0.2, dual_clip=1.5)
    ratio = torch.softmax(logit_new[0], -1)[0].item() / 0.5
    # sample 0: -min(r, 1.2) * 1 = -1.2; sample 1: -max(min(-r, -1.2), -1.5) = 1.5
    assert float(loss.policy_loss) == pytest.approx((-1.2 + 1.5) / 2)
    assert float(info.clipfrac) == 1.0
    assert float(info.approx_kl) == pytest.approx(-(torch.log(torch.tensor(ratio)).item()))
    with pytest.raises(ValueError, match="dual_clip must be greater than 1.0"):
        pgext.ppo_policy_error(ppo_policy_data(logit_new, logit_old, action, adv, None), 0.2, dual_clip=0.5)


@pytest.mark.parametrize("weighted", [False, True])
def test_a2c_error_matches_reference(weighted):
    new, _, action, per = _batch((96,), 6, seed=7)
    value, adv, ret = per(), per(), per()
    weight = per().abs() if weighted else None
    mine, theirs = _leaves(new, value), _leaves(new, value)
    loss = pgext.a2c_error(a2c_data(mine[0], action, mine[1], adv, ret, weight))
    ref = pgext.reference.a2c_error(a2c_data(theirs[0], action, theirs[1], adv, ret, weight))
    assert loss._fields == ("policy_loss", "value_loss", "entropy_loss")
    for a, e in zip(loss, ref):
        _close(a, e)
    (loss.policy_loss + 0.5 * loss.value_loss - 0.01 * loss.entropy_loss).backward()
    (ref.policy_loss + 0.5 * ref.value_loss - 0.01 * ref.entropy_loss).backward()
    for a, e in zip(mine, theirs):
        _close(a.grad, e.grad)


def test_old_log_probs_must_have_the_actions_shape():
    new, old, action, per = _batch((8,), 4, seed=1)
    with pytest.raises(ValueError, match="old log-probabilities must have the actions' shape"):
        pgext.ppo_policy_error(ppo_policy_data(new, torch.zeros(4), action, per(), None))


# ------------------------------------------------------------------------ bad input
_LOSSES = {
    "ppo_policy_error": (pgext.ppo_policy_error, ppo_policy_data, ("logit_new", "logit_old", "action", "adv")),
    "ppo_error": (pgext.ppo_error, ppo_data,
                  ("logit_new", "logit_old", "action", "value_new", "value_old", "adv", "return_")),
    "a2c_error": (pgext.a2c_error, a2c_data, ("logit", "action", "value", "adv", "return_")),
    "ppo_value_error": (pgext.ppo_value_error, pgext.ppo_value_data, ("value_new", "value_old", "return_")),
}


def _fields(data_type):
    new, old, action, per = _batch((4,), 5, seed=2, dtype=torch.float32)
    given = {"logit_new": new, "logit": new, "logit_old": old, "action": action, "weight": None}
    return {name: given[name] if name in given else per() for name in data_type._fields}


@pytest.mark.parametrize("bad", [2.0, [1.0, 2.0, 3.0, 4.0], None, "x"], ids=["float", "list", "None", "str"])
@pytest.mark.parametrize("loss,field", [(loss, f) for loss, (_, _, fs) in _LOSSES.items() for f in fs] +
                         [(loss, "weight") for loss in _LOSSES])
def test_a_field_that_is_not_a_tensor_raises_type_error_naming_it(loss, field, bad):
    fn, data_type, _ = _LOSSES[loss]
    fields = _fields(data_type)
    if field == "weight" and bad is None:  # None is the weight's default: finite losses
        out = fn(data_type(**fields))
        assert all(torch.isfinite(t).all() for t in _flat(out)), out
        return
    fields[field] = bad
    with pytest.raises(TypeError, match=f"^{loss}: {field} must be a torch.Tensor.*got {type(bad).__name__}$"):
        fn(data_type(**fields))


def _flat(out):
    return [out] if isinstance(out, torch.Tensor) else [t for part in out for t in _flat(part)]


_SHAPES = [(), (1,), (4,), (4, 1), (1, 3), (4, 3), (3,), (4, 2), (4, 3, 2)]


def _outcome(fn):
    try:
        return fn()
    except (RuntimeError, IndexError, ValueError) as e:
        return e


@pytest.mark.parametrize("lead", [(4,), (4, 3), (4, 3, 2)], ids=str)
def test_surrogate_takes_exactly_the_shapes_di_engines_ops_take(lead):
    """Every (adv, weight) shape pair against (4,), (4, 3) and (4, 3, 2)
    actions: where DI-engine's eager surrogate computes, pgext computes the
    same losses; where it fails (a RuntimeError or IndexError of torch's),
    pgext raises ValueError naming the shapes."""
    new, old, action, _ = _batch(lead, 5, seed=3)
    g = torch.Generator().manual_seed(0)
    for adv_shape in _SHAPES:
        for weight_shape in [None] + _SHAPES:
            adv = torch.randn(adv_shape, generator=g, dtype=torch.float64)
            weight = None if weight_shape is None else torch.rand(weight_shape, generator=g, dtype=torch.float64)
            data = ppo_policy_data(new, old, action, adv, weight)
            ref = _outcome(lambda: pgext.reference.ppo_policy_error(data))
            case = f"actions {lead}, adv {adv_shape}, weight {weight_shape}"
            if isinstance(ref, Exception):
                with pytest.raises(ValueError, match=r"^ppo: adv \(.*must have the actions' shape") as info:
                    pgext.ppo_policy_error(data)
                assert str(tuple(adv_shape)) in str(info.value), case
            else:
                loss, stats = pgext.ppo_policy_error(data)
                for a, e in zip(loss + stats, ref[0] + ref[1]):
                    _close(a, e)


def test_value_losses_take_exactly_the_shapes_di_engines_ops_take():
    """ppo_value_error (DI-engine's eager arithmetic) and a2c_error's value
    loss (its F.mse_loss): shapes that broadcast give DI-engine's numbers, the
    others raise ValueError naming each shape."""
    g = torch.Generator().manual_seed(1)
    new, _, action, _ = _batch((4,), 5, seed=5)
    adv = torch.randn(4, generator=g, dtype=torch.float64)
    for value_shape in _SHAPES:
        for return_shape in _SHAPES:
            value = torch.randn(value_shape, generator=g, dtype=torch.float64)
            ret = torch.randn(return_shape, generator=g, dtype=torch.float64)
            old = torch.randn(value_shape, generator=g, dtype=torch.float64)
            data = pgext.ppo_value_data(value, old, ret, None)
            ref = _outcome(lambda: pgext.reference.eager_value(value, old, ret, None, 0.2, True))
            if isinstance(ref, Exception):
                with pytest.raises(ValueError, match=r"^ppo_value_error: the shapes value_new .* do not broadcast"):
                    pgext.ppo_value_error(data)
            else:
                _close(pgext.ppo_value_error(data), ref)
            with warnings.catch_warnings():  # F.mse_loss warns of every broadcast, in both
                warnings.simplefilter("ignore", UserWarning)
                ref = _outcome(lambda: F.mse_loss(ret, value, reduction="none").mean())
                a2c = a2c_data(new, action, value, adv, ret, None)
                if isinstance(ref, Exception):
                    with pytest.raises(ValueError, match=r"^a2c_error: the shapes value .* do not broadcast"):
                        pgext.a2c_error(a2c)
                else:
                    _close(pgext.a2c_error(a2c).value_loss, ref)


@pytest.mark.parametrize("loss,field", [("ppo_policy_error", "logit_old"), ("ppo_policy_error", "adv"),
                                        ("ppo_policy_error", "weight"), ("ppo_error", "value_old"),
                                        ("ppo_error", "return_"), ("ppo_value_error", "return_"),
                                        ("ppo_value_error", "weight"), ("a2c_error", "value"),
                                        ("a2c_error", "return_")])
def test_a_field_on_another_device_raises_value_error_naming_it(loss, field):
    """(4, 3) actions; PPO's with (4,) advantages and values, so that it
    takes its eager path (where no op checks devices)."""
    fn, data_type, _ = _LOSSES[loss]
    new, old, action, _ = _batch((4, 3), 5, seed=6, dtype=torch.float32)
    given = {"logit_new": new, "logit": new, "logit_old": old, "action": action}
    per_sample = (4, 3) if loss == "a2c_error" else (4,)
    fields = {name: given[name] if name in given else torch.rand(per_sample) for name in data_type._fields}
    fields[field] = fields[field].to("meta")
    with pytest.raises(ValueError, match=f"{field} is on meta but .* is on cpu"):
        fn(data_type(**fields))


def test_a_0d_cpu_advantage_is_taken_beside_any_device_as_eager_arithmetic_takes_it():
    new, old, action, _ = _batch((4, 3), 5, seed=8, dtype=torch.float32)
    data = ppo_policy_data(new.to("meta"), old.to("meta"), action.to("meta"), torch.tensor(0.5), None)
    loss, info = pgext.ppo_policy_error(data)
    assert loss.policy_loss.device.type == "meta" and loss.policy_loss.shape == ()


@pytest.mark.parametrize("adv,match", [(torch.rand(4), r"adv must have the shape of action \[4, 3\]"),
                                       (torch.rand(4, 3).to("meta"), "adv is on meta but logit is on cpu"),
                                       (torch.rand(4, 3).to(torch.complex64), "adv must be float16")])
def test_a2c_errors_name_a2c_and_its_advantage(adv, match):
    """a2c_error's policy loss is pg_error's with adv as the return: its
    errors say so in a2c_error's own names."""
    new, _, action, _ = _batch((4, 3), 5, seed=9, dtype=torch.float32)
    value = torch.rand(4, 3)
    with pytest.raises((TypeError, ValueError), match=f"^a2c_error: {match}"):
        pgext.a2c_error(a2c_data(new, action, value, adv, value, None))
