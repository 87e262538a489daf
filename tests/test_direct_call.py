"""pgext.pg_error's direct call (pgext._C.pg_error, the typed C++ API) and the
torch.ops path it leaves to everything it does not handle."""
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import pgext
from conftest import REDUCTIONS, make_inputs
from pgext import pg_data, pg_loss

OP = torch.ops.pgext.pg_error.default


def _inputs(weighted=True, seed=7):
    inp = make_inputs((5, 3), 11, torch.float32, seed, weight=weighted)
    logit = inp.logit.detach().clone().requires_grad_(True)
    return logit, inp.action, inp.return_, inp.weight


def _step(fn, logit, *rest, **kw):
    loss = fn(pg_data(logit, *rest), **kw)
    (3 * loss.policy_loss.sum() - 0.5 * loss.entropy_loss.sum()).backward()
    grad, logit.grad = logit.grad, None
    return loss, grad


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the calls pgext.pg_error makes through torch.ops."""
    calls = []

    def counting_op(*args):
        calls.append(args)
        return OP(*args)

    monkeypatch.setattr(pgext.losses.policy_gradient, "_pg_error_op", counting_op)
    return calls


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["nw", "w"])
def test_plain_tensors_take_the_direct_call_with_identical_results(op_calls, reduction, weighted):
    logit, action, ret, weight = _inputs(weighted)
    loss, grad = _step(pgext.pg_error, logit, action, ret, weight=weight, reduction=reduction)
    assert op_calls == []  # the direct call did the work
    assert type(loss) is pg_loss and loss._fields == ("policy_loss", "entropy_loss")
    assert loss.policy_loss.grad_fn.name() == "PgErrorBackward"

    policy, entropy = OP(logit, action, ret, weight, reduction)
    (3 * policy.sum() - 0.5 * entropy.sum()).backward()
    assert torch.equal(loss.policy_loss, policy) and torch.equal(loss.entropy_loss, entropy)
    assert torch.equal(grad, logit.grad)


def test_parameter_logits_take_the_direct_call(op_calls):
    logit, action, ret, _ = _inputs(weighted=False)
    param = torch.nn.Parameter(logit.detach().clone())
    loss, grad = _step(pgext.pg_error, param, action, ret)
    assert op_calls == []
    _, expected = _step(pgext.reference.pg_error, logit, action, ret)
    torch.testing.assert_close(grad, expected)


def test_any_3_tuple_takes_the_direct_call(op_calls):
    logit, action, ret, _ = _inputs(weighted=False)
    loss = pgext.pg_error((logit, action, ret))
    assert op_calls == [] and type(loss) is pg_loss


class _Logged(torch.Tensor):
    """A tensor subclass that records the functions __torch_function__ sees."""

    seen = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


class _RecordingMode(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


def test_torch_function_mode_sees_the_op(op_calls):
    logit, action, ret, weight = _inputs()
    expected = OP(logit, action, ret, weight, "sum")
    with _RecordingMode() as mode:
        loss = pgext.pg_error(pg_data(logit, action, ret), weight=weight, reduction="sum")
    assert OP in mode.seen and len(op_calls) == 1
    assert torch.equal(loss.policy_loss, expected[0]) and torch.equal(loss.entropy_loss, expected[1])


def test_tensor_subclass_torch_function_sees_the_op(op_calls):
    logit, action, ret, _ = _inputs(weighted=False)
    _Logged.seen.clear()
    sub = logit.detach().clone().as_subclass(_Logged).requires_grad_(True)
    loss, grad = _step(pgext.pg_error, sub, action, ret)
    assert OP in _Logged.seen and len(op_calls) == 1
    _, expected = _step(pgext.pg_error, logit, action, ret)
    assert torch.equal(grad.as_subclass(torch.Tensor), expected)


def test_list_data_takes_the_op_path(op_calls):
    logit, action, ret, _ = _inputs(weighted=False)
    loss = pgext.pg_error([logit, action, ret])
    assert len(op_calls) == 1
    assert torch.equal(loss.policy_loss, OP(logit, action, ret, None, "mean")[0])


def test_dispatch_modes_see_the_direct_call():
    """The direct call is a dispatcher call: modes below autograd see pgext's kernel op."""

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(func)
            return func(*args, **(kwargs or {}))

    logit, action, ret, _ = _inputs(weighted=False)
    with Recorder() as mode:
        loss = pgext.pg_error(pg_data(logit, action, ret))
    assert torch.ops.pgext.pg_error_forward.default in mode.seen
    assert torch.equal(loss.policy_loss, OP(logit, action, ret, None, "mean")[0])


def test_direct_call_declines_what_it_does_not_handle():
    logit, action, ret, weight = _inputs()
    direct = pgext._C.pg_error
    assert direct(pg_loss, (logit, action, ret), None, "bogus") is None
    assert direct(pg_loss, (logit, action, ret), None, b"mean") is None
    for near in ("mean\x00x", "mean\x00", "Mean", "mean "):  # the whole string must match
        assert direct(pg_loss, (logit, action, ret), None, near) is None
        with pytest.raises(ValueError, match="reduction must be"):
            pgext.pg_error((logit, action, ret), reduction=near)
    assert direct(pg_loss, [logit, action, ret], None, "mean") is None
    assert direct(pg_loss, (logit, action), None, "mean") is None
    assert direct(pg_loss, (logit, action, 1.0), None, "mean") is None
    assert direct(pg_loss, (logit, action, ret), 2.0, "mean") is None
    assert direct(pg_loss, (logit, action, ret), weight, "none").policy_loss.shape == (5, 3)


def test_direct_call_argument_errors():
    logit, action, ret, _ = _inputs(weighted=False)
    with pytest.raises(TypeError, match="loss_type"):
        pgext._C.pg_error(list, (logit, action, ret), None, "mean")
    with pytest.raises(TypeError, match="expects"):
        pgext._C.pg_error(pg_loss, (logit, action, ret), None)


@pytest.mark.parametrize("bad", [-1, 11, 2**40])
def test_direct_call_raises_the_op_errors(bad):
    logit, action, ret, _ = _inputs(weighted=False)
    action = action.clone()
    action[1, 2] = bad
    with pytest.raises(pgext.ActionOutOfRangeError, match=rf"action {bad} .*N = 11"):
        pgext._C.pg_error(pg_loss, (logit, action, ret), None, "mean")
    with pytest.raises(ValueError, match=r"return_ must have the shape of action"):
        pgext._C.pg_error(pg_loss, (logit, action.clamp(0, 10), ret.unsqueeze(-1)), None, "mean")
    with pytest.raises(TypeError, match="integer class indices"):
        pgext._C.pg_error(pg_loss, (logit, action.float(), ret), None, "mean")
