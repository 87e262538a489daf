"""Bad input is refused with the documented exception types and useful messages."""
import re

import pytest
import torch

import pgext
from conftest import dtype_id, make_inputs


def shape_regex(shape) -> str:
    """Matches a shape however it is printed: (4, 1), [4, 1], torch.Size([4, 1]), (4,), []."""
    dims = r"\s*,\s*".join(str(d) for d in shape)
    return r"[\[(]\s*" + dims + r"\s*,?\s*[\])]"


def call(logit, action, return_, weight=None, reduction="mean"):
    return pgext.pg_error(pgext.pg_data(logit, action, return_), weight=weight, reduction=reduction)


# ------------------------------------------------------------------------ shapes
@pytest.mark.parametrize(
    "lead,bad",
    [
        ((4,), (4, 1)),   # the notebook would broadcast (B,1) against (B,) into (B,B)
        ((4,), (5,)),
        ((3, 2), (2, 3)),
        ((3, 2), (6,)),   # same numel
        ((3, 2), (2, 3, 2)),
        ((), (1,)),       # a 0-d sample grows to (1,)
    ],
    ids=str,
)
@pytest.mark.parametrize("which", ["return_", "weight"])
def test_return_and_weight_must_not_grow_the_action_shape(lead, bad, which):
    """return_ and weight broadcast to the actions' shape only where that
    leaves it unchanged (tests/test_drop_in.py has the accepted cases)."""
    inp = make_inputs(lead, 8, seed=200, weight=True)
    wrong = torch.randn(bad)
    kw = dict(logit=inp.logit, action=inp.action, return_=inp.return_, weight=inp.weight)
    kw[which] = wrong
    with pytest.raises(ValueError) as exc:
        call(**kw)
    msg = str(exc.value)
    assert re.search(shape_regex(bad), msg), f"message does not name {bad}: {msg!r}"
    assert re.search(shape_regex(lead), msg), f"message does not name {lead}: {msg!r}"


@pytest.mark.parametrize(
    "logit_shape,action_shape",
    [((4, 8), (5,)), ((4, 8), (4, 1)), ((4, 8), ()), ((4, 8), (8,)), ((8,), (1,)), ((2, 3, 8), (2,)), ((2, 3, 8), (3,))],
    ids=str,
)
def test_action_shape_must_be_logit_leading_shape(logit_shape, action_shape):
    logit = torch.randn(logit_shape)
    action = torch.zeros(action_shape, dtype=torch.long)
    return_ = torch.randn(action_shape)
    with pytest.raises(ValueError):
        call(logit, action, return_)


def test_zero_dim_logit():
    with pytest.raises(ValueError):
        call(torch.tensor(1.0), torch.tensor(0), torch.tensor(1.0))


@pytest.mark.parametrize("lead", [(4,), (), (0,)], ids=str)
def test_zero_classes(lead):
    with pytest.raises(ValueError):
        call(torch.randn(*lead, 0), torch.zeros(lead, dtype=torch.long), torch.randn(lead))


# ------------------------------------------------------------------------ action range
@pytest.mark.parametrize("value", [-1, 37, 38, 2**40, -(2**40)], ids=str)
@pytest.mark.parametrize("where", [0, 99])
def test_action_out_of_range(value, where):
    N = 37
    inp = make_inputs((100,), N, seed=201)
    action = inp.action.clone()
    action[where] = value
    with pytest.raises((IndexError, ValueError)) as exc:
        call(inp.logit, action, inp.return_)
    msg = str(exc.value)
    assert str(value) in msg, f"message does not contain the action {value}: {msg!r}"
    if value == N:
        assert msg.count(str(N)) >= 2, f"message does not contain both the action and N={N}: {msg!r}"
    else:
        assert str(N) in msg.replace(str(value), ""), f"message does not contain N={N}: {msg!r}"


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8], ids=dtype_id)
def test_action_out_of_range_small_int_dtypes(dtype):
    N = 37
    inp = make_inputs((6,), N, seed=202)
    bad = -3 if dtype != torch.uint8 else 200
    action = inp.action.to(dtype)
    action[4] = bad
    with pytest.raises((IndexError, ValueError)) as exc:
        call(inp.logit, action, inp.return_)
    assert str(bad) in str(exc.value)


def _not_dense(t, kind):
    if kind == "sparse_coo":
        return t.to_sparse()
    if kind == "sparse_csr":
        return t.reshape(1, -1).to_sparse_csr() if t.dim() < 2 else t.reshape(-1, t.shape[-1]).to_sparse_csr()
    if kind == "nested":
        return torch.nested.nested_tensor([t, t])
    if kind == "jagged":  # a Python tensor subclass (NestedTensor)
        return torch.nested.nested_tensor([t, t], layout=torch.jagged)
    assert kind == "quantized"
    return torch.quantize_per_tensor(t.float(), 0.1, 0, torch.qint8)


# constructing them warns (beta, prototype, deprecated): torch's notices, not pgext's
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", ["sparse_coo", "sparse_csr", "nested", "jagged", "quantized"])
@pytest.mark.parametrize("arg", ["logit", "action", "return_", "weight"])
def test_tensors_that_are_not_dense_raise_type_error(arg, kind):
    """Sparse, nested and quantized tensors have no kernel: a TypeError naming
    the argument, on every entry point, rather than the dispatcher's
    NotImplementedError for the tensor's backend."""
    inp = make_inputs((4,), 5, seed=207, weight=True)
    args = dict(logit=inp.logit, action=inp.action, return_=inp.return_, weight=inp.weight)
    if kind == "quantized" and arg == "action":
        pytest.skip("no quantized integer dtype holds int64 class indices")
    args[arg] = _not_dense(args[arg], kind)
    calls = {
        "pg_error": lambda: pgext.pg_error((args["logit"], args["action"], args["return_"]), weight=args["weight"]),
        "torch.ops": lambda: torch.ops.pgext.pg_error(*args.values()),
        "forward op": lambda: torch.ops.pgext.pg_error_forward(*args.values(), "mean"),
    }
    for name, fn in calls.items():
        for mode in (torch.enable_grad, torch.no_grad):
            with mode(), pytest.raises(TypeError, match=rf"{arg} must be a dense \(strided\) tensor"):
                fn()


@pytest.mark.parametrize("value", [2**64 - 1, 2**63], ids=str)
def test_uint64_action_out_of_range_is_reported_as_passed(value):
    """A uint64 action is converted to int64 for the kernels, where 2**64 - 1
    reads -1: the message names the caller's value."""
    inp = make_inputs((5,), 7, seed=206)
    action = inp.action.to(torch.uint64)
    action[2] = value
    with pytest.raises(pgext.ActionOutOfRangeError, match=rf"action {value} \(sample 2\) is out of range for N = 7"):
        call(inp.logit, action, inp.return_)


@pytest.mark.parametrize("value", [-1, 37, 2**40], ids=str)
def test_action_out_of_range_raw_ops(value):
    """The registered ops themselves must not read outside the row."""
    N = 37
    inp = make_inputs((10,), N, seed=203)
    action = inp.action.clone()
    action[3] = value
    with pytest.raises((IndexError, ValueError, RuntimeError)):
        torch.ops.pgext.pg_error(inp.logit, action, inp.return_)
    with pytest.raises((IndexError, ValueError, RuntimeError)):
        torch.ops.pgext.pg_error_forward(inp.logit, action, inp.return_, None, "mean")


def test_kernel_op_inputs_are_checked():
    """The kernel ops refuse statistics or gradients that are not floating
    point (an int64 lse was read truncated: a wrong gradient) and a negative
    vocab_start."""
    inp = make_inputs((6,), 9, seed=204)
    ops = torch.ops.pgext
    _, _, lse, entropy = ops.pg_error_forward(inp.logit, inp.action, inp.return_, None, "none")
    ones = torch.ones(6)
    for bad in ((ones.long(), ones, lse, entropy), (ones, ones, lse.long(), entropy),
                (ones, ones, lse, entropy.to(torch.complex64)), (ones, ones.bool(), lse, entropy)):
        with pytest.raises(TypeError, match="must be floating point"):
            ops.pg_error_backward(bad[0], bad[1], inp.logit, inp.action, inp.return_, None, bad[2], bad[3], "none")
    with pytest.raises(ValueError, match="vocab_start must be >= 0, got -1"):
        ops.pg_row_stats(inp.logit, inp.action, -1)
    with pytest.raises(ValueError, match="vocab_start must be >= 0, got -5"):
        ops.pg_grad_from_stats(ones, ones, inp.logit, inp.action, inp.return_, None, lse, entropy, "none", -5)
    # float8 passes at::isFloatingType, and then failed deep inside (NotImplementedError)
    for reduction, g in (("mean", torch.ones(())), ("none", ones)):
        with pytest.raises(TypeError, match="must be floating point .*got Float8_e4m3fn"):
            ops.pg_error_backward(g.to(torch.float8_e4m3fn), g, inp.logit, inp.action, inp.return_, None, lse,
                                  entropy, reduction)
    # the Meta kernels (FakeTensor: torch.compile, export) check as the real ones do
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (ones, inp.logit, inp.action, inp.return_, lse, entropy)]
        with pytest.raises(ValueError, match="vocab_start must be >= 0, got -1"):
            ops.pg_row_stats(fake[1], fake[2], -1)
        with pytest.raises(ValueError, match="vocab_start must be >= 0, got -5"):
            ops.pg_grad_from_stats(fake[0], fake[0], *fake[1:4], None, *fake[4:], "none", -5)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64], ids=dtype_id)
@pytest.mark.parametrize("arg", ["return_", "weight"])
def test_per_sample_tensors_of_unsupported_dtypes_raise_type_error(arg, dtype):
    inp = make_inputs((4,), 3, seed=208, weight=True)
    args = dict(logit=inp.logit, action=inp.action, return_=inp.return_, weight=inp.weight)
    args[arg] = args[arg].to(dtype)
    with pytest.raises(TypeError, match=rf"{arg} must be float16, bfloat16, float32, float64, integer or bool"):
        call(**args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("n", [9, 100], ids=lambda n: f"N{n}")
def test_shard_ops_with_actions_far_below_vocab_start(n, dtype):
    """A shard at the top of int64 holds none of the actions near -2**63:
    action - vocab_start wrapped around to a column inside the shard (1 for
    action -2**63 and vocab_start 2**63 - 1), so pg_row_stats returned that
    column's logit and pg_grad_from_stats put the one-hot term there."""
    start = 2**63 - 1
    inp = make_inputs((6,), n, dtype=dtype, seed=205)
    action = torch.tensor([start, -2**63, -2**63 + 1, -2**63 + n - 3, -1, start - 1])
    outside = action.clone()
    outside[1:] = start - 1  # outside the shard, no overflow
    ops = torch.ops.pgext
    stats = ops.pg_row_stats(inp.logit, action, start)
    want = ops.pg_row_stats(inp.logit, outside, start)
    for got, expected in zip(stats, want):
        assert torch.equal(got, expected)
    assert stats[3][0] == inp.logit[0, 0].to(stats[3].dtype) and torch.all(stats[3][1:] == 0)
    _, _, lse, entropy = ops.pg_error_forward(inp.logit, inp.action, inp.return_, None, "none")
    rest = (inp.logit, action, inp.return_, None, lse, entropy, "none", start)
    ones = torch.ones(6, dtype=lse.dtype)
    grad = ops.pg_grad_from_stats(ones, ones, *rest)
    expected = ops.pg_grad_from_stats(ones, ones, inp.logit, outside, *rest[2:])
    assert torch.equal(grad, expected)
    # the one row whose action the shard holds has its one-hot term, at column 0
    no_row_inside = outside.clone()
    no_row_inside[0] = start - 1
    without = ops.pg_grad_from_stats(ones, ones, inp.logit, no_row_inside, *rest[2:])
    assert torch.equal(grad[1:], without[1:])
    assert (grad != without).nonzero().tolist() == [[0, 0]]

def test_out_of_range_with_grad_does_not_leave_state():
    """A refused call leaves nothing behind: a following valid call works and matches."""
    inp = make_inputs((5,), 9, seed=204)
    logit = inp.logit.clone().requires_grad_()
    bad = inp.action.clone()
    bad[0] = 9
    with pytest.raises((IndexError, ValueError)):
        call(logit, bad, inp.return_)
    out = call(logit, inp.action, inp.return_)
    out.policy_loss.backward()
    ref = pgext.reference.pg_error((inp.logit, inp.action, inp.return_))
    torch.testing.assert_close(out.policy_loss.detach(), ref.policy_loss, rtol=1e-5, atol=1e-6)
    assert logit.grad is not None and torch.isfinite(logit.grad).all()


# ------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bool], ids=dtype_id)
def test_non_integer_action_is_type_error(dtype):
    inp = make_inputs((4,), 5, seed=205)
    with pytest.raises(TypeError):
        call(inp.logit, inp.action.to(dtype), inp.return_)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64, torch.complex128],
                         ids=dtype_id)
def test_non_real_float_logit_is_type_error(dtype):
    inp = make_inputs((4,), 5, seed=206)
    logit = (inp.logit * 3).to(dtype) if not dtype.is_complex else torch.complex(inp.logit, inp.logit).to(dtype)
    with pytest.raises(TypeError):
        call(logit, inp.action, inp.return_)


# ------------------------------------------------------------------------ arguments
@pytest.mark.parametrize("reduction", ["foo", "", "MEAN", "avg", None], ids=repr)
def test_bad_reduction(reduction):
    inp = make_inputs((4,), 5, seed=207)
    with pytest.raises((ValueError, TypeError) if reduction is None else ValueError):
        call(*inp.data, reduction=reduction)


def test_bad_reduction_message_names_it():
    inp = make_inputs((4,), 5, seed=207)
    with pytest.raises(ValueError, match="foo"):
        call(*inp.data, reduction="foo")


@pytest.mark.parametrize(
    "make",
    [
        lambda i: (i.logit, i.action),
        lambda i: (i.logit, i.action, i.return_, i.return_),
        lambda i: (i.logit,),
        lambda i: (),
        lambda i: None,
        lambda i: 3,
        lambda i: i.logit,
    ],
    ids=["2-tuple", "4-tuple", "1-tuple", "empty", "None", "int", "tensor"],
)
def test_data_must_be_a_3_tuple(make):
    inp = make_inputs((4,), 5, seed=208)
    with pytest.raises(TypeError):
        pgext.pg_error(make(inp))


def test_weight_and_reduction_are_keyword_only():
    inp = make_inputs((4,), 5, seed=209, weight=True)
    with pytest.raises(TypeError):
        pgext.pg_error(inp.data, inp.weight)


# ------------------------------------------------------------------------ devices
@pytest.mark.parametrize("which", ["logit", "action", "return_", "weight"])
def test_mismatched_devices(which):
    inp = make_inputs((4,), 5, seed=210, weight=True)
    kw = dict(logit=inp.logit, action=inp.action, return_=inp.return_, weight=inp.weight)
    kw[which] = kw[which].to("meta")
    with pytest.raises((ValueError, RuntimeError, NotImplementedError)) as exc:
        call(**kw)
    assert "meta" in str(exc.value) or "device" in str(exc.value).lower(), str(exc.value)


def test_mismatched_devices_is_value_error():
    """The preferred exception type (the op's own check, not a failure deep in a kernel)."""
    inp = make_inputs((4,), 5, seed=211)
    with pytest.raises(ValueError):
        call(inp.logit.to("meta"), inp.action, inp.return_)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_meta_inputs_give_meta_outputs(reduction):
    inp = make_inputs((6, 2), 5, seed=212, weight=True, return_dtype=torch.float64)
    out = call(*(t.to("meta") for t in inp.data), weight=inp.weight.to("meta"), reduction=reduction)
    shape = (6, 2) if reduction == "none" else ()
    for t in out:
        assert t.device.type == "meta" and tuple(t.shape) == shape and t.dtype == torch.float64
