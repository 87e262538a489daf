"""Shared helpers for the pgext test-suite.

The yardstick everywhere is ``pgext.reference.pg_error`` (the notebook's
``torch.distributions.Categorical`` math) evaluated in float64 on exactly the
inputs the op sees (half inputs are upcast *after* rounding), so the only error
left is the op's own (float32 accumulation, half rounding of the outputs).
"""
from __future__ import annotations

import math
import os
import pathlib
import re
import subprocess
import sys
from typing import NamedTuple, Optional

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    # the extension is built in place (``setup.py build_ext --inplace``)
    sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: long-running test (compiles code); runs by default, deselect with -m 'not slow'",
    )


# --------------------------------------------------------------------------- dtypes
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
REDUCTIONS = ("mean", "sum", "none")


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation type of the kernel for a logit dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def least_precise(*dtypes: torch.dtype) -> torch.dtype:
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


# Tolerances per dtype of the compared tensor:
#   rtol  - relative to the expected value (output rounding, ~2 units of roundoff for halves)
#   atol  - factor multiplied by a *scale* derived from the inputs (see value_scale /
#           grad_scales): the size of the numbers the result was computed from, so that
#           cancellation in a sum does not make the test fragile
#   floor - absolute floor: float16's subnormal spacing; for bfloat16, float's smallest
#           normal 2^-126, since the AVX512_BF16 rounding instruction reads a float
#           below it as zero (docs/how-it-works.md), so such a gradient comes out as 0
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-11, floor=1e-300),
    torch.float32: dict(rtol=1e-5, atol=1e-5, floor=1e-38),
    torch.float16: dict(rtol=1e-3, atol=1e-5, floor=6e-8),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-5, floor=2.0**-126),
}


# --------------------------------------------------------------------------- inputs
class Inputs(NamedTuple):
    logit: torch.Tensor
    action: torch.Tensor
    return_: torch.Tensor
    weight: Optional[torch.Tensor]

    @property
    def data(self):
        return (self.logit, self.action, self.return_)


def make_inputs(
    shape,
    N: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    mask=False,
    *,
    weight: bool = False,
    return_dtype: Optional[torch.dtype] = None,
    weight_dtype: Optional[torch.dtype] = None,
    action_dtype: torch.dtype = torch.int64,
    scale: float = 1.0,
    offset: float = 0.0,
) -> Inputs:
    """Seeded inputs: logit ``(*shape, N)``, action/return_/weight of ``shape``.

    ``mask`` (True or a probability) replaces that fraction of logits with
    -inf, never the chosen action's, so every row keeps a finite logit and a
    finite log-prob.
    """
    shape = tuple(shape)
    g = torch.Generator().manual_seed(seed)
    logit = torch.randn(*shape, N, generator=g, dtype=torch.float64) * scale + offset
    action = torch.randint(0, N, shape, generator=g)
    if mask:
        p = 0.3 if mask is True else float(mask)
        m = torch.rand(*shape, N, generator=g, dtype=torch.float64) < p
        m.scatter_(-1, action.unsqueeze(-1), False)
        logit = logit.masked_fill(m, -math.inf)
    return_ = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    w = torch.rand(shape, generator=g, dtype=torch.float64) * 1.5 + 0.05 if weight else None
    return Inputs(
        logit.to(dtype),
        action.to(action_dtype),
        return_.to(return_dtype or dtype),
        None if w is None else w.to(weight_dtype or dtype),
    )


def relayout(t: Optional[torch.Tensor], kind: str) -> Optional[torch.Tensor]:
    """Same values as ``t`` with a different memory layout.

    Padding elements are poison (NaN for floats, an invalid action for ints),
    so a kernel that ignores strides reads garbage and fails loudly.
    """
    if t is None or kind == "contiguous" or t.dim() == 0:
        return None if t is None else t.contiguous()
    poison = math.nan if t.is_floating_point() else 1000
    if kind == "step":  # last dim stride 2
        buf = torch.full((*t.shape[:-1], 2 * t.shape[-1]), poison, dtype=t.dtype)
        view = buf[..., ::2]
    elif kind == "offset":  # storage offset and padded row stride
        buf = torch.full((*t.shape[:-1], t.shape[-1] + 3), poison, dtype=t.dtype)
        view = buf[..., 2:-1]
    elif kind == "transpose":  # last dim is the slowest-moving one
        buf = torch.full(t.shape[::-1], poison, dtype=t.dtype)
        view = buf.permute(*reversed(range(t.dim())))
    else:
        raise AssertionError(kind)
    view.copy_(t)
    assert torch.equal(view, t) or (t.is_floating_point() and torch.equal(view.isnan(), t.isnan()))
    return view


# --------------------------------------------------------------------------- evaluation
class Result(NamedTuple):
    policy: torch.Tensor
    entropy: torch.Tensor
    grads: dict
    upstream: tuple = (None, None)  # the upstream gradients used (float64), None where not used


def upstream_grads(out, upstream, seed: int = 1234):
    """Upstream gradients for (policy_loss, entropy_loss).

    ``upstream`` is a pair of floats/None (None: that output is not
    back-propagated at all) or 'random' (seeded multiples of 1/64 in [-4, 4],
    exact in bfloat16 and float16, so that every dtype sees the same values).
    """
    if upstream == "random":
        g = torch.Generator().manual_seed(seed)
        vals = []
        for o in out:
            v = (torch.randn(o.shape, generator=g, dtype=torch.float64) * 1.5).clamp(-4, 4)
            vals.append(((v * 64).round() / 64).to(device=o.device, dtype=o.dtype))  # exact in every float dtype
        return vals
    return [None if u is None else torch.full(o.shape, u, dtype=o.dtype, device=o.device)
            for o, u in zip(out, upstream)]


def evaluate(fn, inp: Inputs, *, reduction="mean", wrt=("logit", "return_", "weight"), upstream=None,
             cast: Optional[torch.dtype] = None, seed: int = 1234, logit_transform=None) -> Result:
    """Runs ``fn(data, weight=, reduction=)`` (pgext or the reference) and back-propagates.

    ``cast`` converts the float inputs first (float64 for the reference).
    Layouts are kept as they are (no clone), the leaves are detached aliases.
    """
    if upstream is None:
        upstream = "random" if reduction == "none" else (3.0, -0.5)
    leaves = {}
    tensors = {}
    for name in ("logit", "return_", "weight"):
        t = getattr(inp, name)
        if t is None:
            continue
        t = t.detach()
        if cast is not None:
            t = t.to(cast)
        if name == "logit" and logit_transform is not None:
            t = logit_transform(t)
        if name in wrt:
            t = t.detach().requires_grad_(True)
            leaves[name] = t
        tensors[name] = t
    data = (tensors["logit"], inp.action, tensors["return_"])
    out = fn(data, weight=tensors.get("weight"), reduction=reduction)
    grads = {}
    used = (None, None)
    if leaves:
        ups = upstream_grads(out, upstream, seed)
        used = tuple(None if u is None else u.double().cpu() for u in ups)
        # an output that depends on none of the leaves (entropy when only return_ requires
        # grad) may legitimately not require grad: it contributes nothing
        pairs = [(o, u) for o, u in zip(out, ups) if u is not None and o.requires_grad]
        if pairs:
            outs = [o for o, _ in pairs]
            ups = [u if cast is None else u.to(cast) for _, u in pairs]
            got = torch.autograd.grad(outs, list(leaves.values()), ups, materialize_grads=True)
        else:
            got = [torch.zeros_like(t) for t in leaves.values()]
        grads = dict(zip(leaves, got))
    return Result(out[0].detach(), out[1].detach(), grads, used)


def pgext_fn(data, *, weight=None, reduction="mean"):
    import pgext

    return pgext.pg_error(pgext.pg_data(*data), weight=weight, reduction=reduction)


def reference_fn(data, *, weight=None, reduction="mean"):
    import pgext.reference

    return pgext.reference.pg_error(data, weight=weight, reduction=reduction)


def finite_mask(x: torch.Tensor) -> torch.Tensor:
    """-inf -> (row's finite minimum - 1000): exp() of it underflows to exactly 0 in float64,
    so the reference's values are unchanged, but Categorical's clamp-to-finfo.min trick no
    longer overflows to NaN gradients when the upstream gradient exceeds 1."""
    neg = torch.isneginf(x)
    if not bool(neg.any()):
        return x
    low = x.masked_fill(neg, math.inf).amin(-1, keepdim=True).clamp_max(0) - 1000
    return torch.where(neg, low, x)


def reference(inp: Inputs, **kw) -> Result:
    return evaluate(reference_fn, inp, cast=torch.float64, logit_transform=finite_mask, **kw)


# --------------------------------------------------------------------------- scales & comparison
def _row_max_abs_finite(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().double()
    return x.masked_fill(~torch.isfinite(x), 0).abs().amax(-1) if x.shape[-1] > 0 else x.sum(-1)


def value_scale(inp: Inputs, reduction: str) -> torch.Tensor:
    """Magnitude of what each loss value is computed from: |w| (1+|R|) (1+max|x|) sqrt(N)/16."""
    N = inp.logit.shape[-1]
    row = (1 + inp.return_.detach().double().abs()) * (1 + _row_max_abs_finite(inp.logit))
    if inp.weight is not None:
        row = row * inp.weight.detach().double().abs()
    row = row * max(1.0, math.sqrt(N) / 16)
    if reduction == "mean":
        return row.mean()
    if reduction == "sum":
        return row.sum()
    return row


def grad_scales(inp: Inputs, reduction: str, upstream) -> dict:
    """Elementwise magnitude of the terms each gradient is made of (pg_math.md):

        dL/dx_j = cP (p_j - [j == a]) - cE p_j (x_j - lse + H)
        dL/dR   = -gP w log_prob / C,     dL/dw = (-gP R log_prob + gE H) / C

    The terms can cancel (x_j - lse ~ -H for the likely classes), so the size of the result
    is no yardstick for its error; the size of the terms is.

    "logit_floor" is an absolute allowance for p_j below the accumulation type's smallest
    normal number: a kernel may flush such probabilities to 0 (ATen's exp_u20 does for
    x_j - lse < -87.3 in float32), which changes the gradient by at most ~87 * 1.2e-38.
    """
    x = finite_mask(inp.logit.detach().double())
    N = x.shape[-1]
    lse = torch.logsumexp(x, -1, keepdim=True)
    p = torch.exp(x - lse)
    H = -(p * (x - lse)).sum(-1, keepdim=True)
    C = max(inp.action.numel(), 1) if reduction == "mean" else 1
    shape = inp.action.shape
    R = inp.return_.detach().double()
    w = torch.ones(shape, dtype=torch.float64) if inp.weight is None else inp.weight.detach().double()
    gP, gE = (torch.zeros(shape, dtype=torch.float64) if u is None else u.expand(shape) for u in upstream)
    cP = (gP * w * R).abs().unsqueeze(-1) / C
    cE = (gE * w).abs().unsqueeze(-1) / C
    onehot = torch.nn.functional.one_hot(inp.action.long(), N).double()
    nfac = max(1.0, math.sqrt(N) / 16)
    big = 1 + lse.squeeze(-1).abs()
    tiny = torch.finfo(acc_dtype(inp.logit.dtype)).tiny
    return {
        "logit": nfac * (cP * (p + onehot) + cE * p * (1 + (x - lse).abs() + H)),
        "logit_floor": 2 * tiny * (cP + cE * (1 + (x - lse).abs() + H)),
        # summed back to the shape of a broadcast return_ or weight, as their gradients are
        "return_": (nfac * (gP * w).abs() * big / C).sum_to_size(R.shape),
        "weight": (nfac * ((gP * R).abs() * big + gE.abs() * (1 + H.squeeze(-1))) / C).sum_to_size(w.shape),
    }


def assert_close(actual, expected, *, tol_dtype=None, scale=None, rtol=None, atol=None, floor=None, what=""):
    """Elementwise |a - e| <= atol*scale + rtol*|e| + floor; equal infs and NaNs match."""
    assert isinstance(actual, torch.Tensor), f"{what}: not a tensor: {type(actual)}"
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    )
    tol = TOL[tol_dtype or actual.dtype]
    rtol = tol["rtol"] if rtol is None else rtol
    atol = tol["atol"] if atol is None else atol
    a = actual.detach().double()
    e = expected.detach().double()
    if scale is None:
        scale = e.masked_fill(~torch.isfinite(e), 0).abs()
    floor = tol["floor"] if floor is None else torch.as_tensor(floor, dtype=torch.float64) + tol["floor"]
    bound = atol * torch.as_tensor(scale, dtype=torch.float64) + rtol * e.abs() + floor
    ok = ((a - e).abs() <= bound) | (a == e) | (a.isnan() & e.isnan())
    if not bool(ok.all()):
        bad = (~ok).nonzero()
        i = tuple(bad[0].tolist())
        err = (a - e).abs().nan_to_num(nan=math.inf)
        raise AssertionError(
            f"{what}: {bad.shape[0]}/{ok.numel()} elements differ; first at {i}: "
            f"actual {a[i].item()!r} expected {e[i].item()!r} (allowed {bound.expand_as(a)[i].item():.3g}); "
            f"max abs err {err.max().item():.3g}"
        )


def check_against_reference(inp: Inputs, reduction: str, *, got: Optional[Result] = None,
                            wrt=("logit", "return_", "weight"), upstream=None, grads=True,
                            logit_rtol=None):
    """Compares pgext with the float64 reference: values, output dtypes and gradients."""
    if not grads:
        wrt = ()
    if got is None:
        got = evaluate(pgext_fn, inp, reduction=reduction, wrt=wrt, upstream=upstream)
    ref = reference(inp, reduction=reduction, wrt=wrt, upstream=upstream)

    out_dtype = torch.promote_types(inp.logit.dtype, inp.return_.dtype)
    if inp.weight is not None:
        out_dtype = torch.promote_types(out_dtype, inp.weight.dtype)
    acc = acc_dtype(inp.logit.dtype)
    for name, a, e in (("policy_loss", got.policy, ref.policy), ("entropy_loss", got.entropy, ref.entropy)):
        assert a.dtype == out_dtype, f"{name} dtype {a.dtype}, expected {out_dtype}"
        assert a.device == inp.logit.device
        assert_close(a, e, tol_dtype=least_precise(out_dtype, acc), scale=value_scale(inp, reduction),
                     what=name)
    scales = grad_scales(inp, reduction, ref.upstream) if ref.grads else {}
    for name, e in ref.grads.items():
        a = got.grads[name]
        src = getattr(inp, name)
        assert a.dtype == src.dtype, f"grad of {name} has dtype {a.dtype}, expected {src.dtype}"
        assert tuple(a.shape) == tuple(src.shape)
        tol_dtype = least_precise(src.dtype, acc)
        rtol = logit_rtol if (name == "logit" and logit_rtol is not None) else None
        assert_close(a, e, tol_dtype=tol_dtype, scale=scales[name], rtol=rtol, floor=scales.get(name + "_floor"),
                     what=f"grad of {name}")
    return got, ref


# --------------------------------------------------------------------------- fixtures
@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("PGEXT_JIT", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update({k: str(v) for k, v in extra.items()})
    return env


# --------------------------------------------------------------------------- machine code
def elf_sections(path) -> set:
    """The section names of an ELF file (`readelf -SW`)."""
    out = subprocess.run(["readelf", "-SW", str(path)], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"^\s*\[\s*\d+\]\s+(\S+)", out, re.M))


def elf_dynamic(path) -> dict:
    """The NEEDED, SONAME, RUNPATH and RPATH entries of an ELF file's dynamic
    section (`readelf -d`), each a list of values in order."""
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
    entries: dict = {}
    for kind, value in re.findall(r"\((NEEDED|SONAME|RUNPATH|RPATH)\)\s+[^\[]*\[([^\]]*)\]", out):
        entries.setdefault(kind, []).append(value)
    return entries


def undefined_symbols(path) -> str:
    """`nm -D --undefined-only`: the dynamic symbols a shared library leaves to the loader."""
    return subprocess.run(
        ["nm", "-D", "--undefined-only", str(path)], capture_output=True, text=True, check=True
    ).stdout


def kernel_library() -> str:
    """The loaded binary holding the kernels: libpgext (or the JIT's build of it)."""
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "/" in line}
    found = [p for p in paths if os.path.basename(p).startswith(("libpgext", "pgext_jit_lib"))]
    assert len(found) == 1, found
    return found[0]


AVX_NAMESPACE = re.compile(r"\bAVX(?:2|512\w*)::")


def _uses_vex(mnemonic: str, operands: str) -> bool:
    """AVX / AVX-512 instructions: VEX- and EVEX-encoded ones are the v-prefixed mnemonics."""
    return (mnemonic.startswith("v") and mnemonic not in ("verr", "verw")) or "%ymm" in operands or "%zmm" in operands


def portable_code_reaching_avx(library) -> list:
    """Where code built for any x86-64 CPU would run AVX instructions in `library`.

    Reads `objdump -d`: a function of a kernel build for AVX2 / AVX-512 is in
    an AVX2 / AVX512 namespace (pgext's kernels, at::vec, their template
    instances). Reported: portable-build kernel functions (namespace DEFAULT)
    with AVX instructions, and direct calls from a function with neither such
    a namespace nor AVX instructions to one that has AVX instructions but no
    such namespace: an inline function whose one linked copy came from an AVX
    build. Returns "caller -> callee" strings (empty when clean).
    """
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", str(library)], capture_output=True,
                          text=True, check=True).stdout
    header = re.compile(r"^[0-9a-f]+ <(.*)>:$")
    insn = re.compile(r"^\s+[0-9a-f]+:\s+(\S+)\s*(.*)$")
    target = re.compile(r"<(.*?)(?:@plt)?>$")
    functions, current = {}, None
    for line in text.splitlines():
        m = header.match(line)
        if m:
            current = functions.setdefault(m.group(1), {"avx": False, "calls": set()})
            continue
        m = insn.match(line) if current is not None else None
        if m is None:
            continue
        mnemonic, operands = m.groups()
        current["avx"] |= _uses_vex(mnemonic, operands)
        if mnemonic.startswith(("call", "jmp")):
            t = target.search(operands)
            if t:
                current["calls"].add(t.group(1))
    assert any("::DEFAULT::" in name for name in functions), f"no portable kernel in {library}"
    found = [f"{name} uses AVX" for name, f in functions.items() if "::DEFAULT::" in name and f["avx"]]
    for name, f in functions.items():
        if f["avx"] or AVX_NAMESPACE.search(name):
            continue
        found += [f"{name} -> {callee}" for callee in sorted(f["calls"])
                  if callee in functions and functions[callee]["avx"] and not AVX_NAMESPACE.search(callee)]
    return sorted(found)


def categorical_inputs(shape, n, dtype, seed=0, mask=False, scale=2.0):
    """Logits of shape (*shape, n), randn * scale drawn in float64 so every
    dtype sees the same values, and actions; with mask, about 30% of the logits
    -inf, never the taken action's."""
    g = torch.Generator().manual_seed(seed)
    logit = torch.randn(*shape, n, generator=g, dtype=torch.float64) * scale
    action = torch.randint(0, n, shape, generator=g)
    if mask:
        m = torch.rand(*shape, n, generator=g) < 0.3
        m.scatter_(-1, action.unsqueeze(-1), False)
        logit = logit.masked_fill(m, float("-inf"))
    return logit.to(dtype), action


def run_with_upstream(fn, logit, action, ups, **kw):
    """fn(logit, action, **kw)'s outputs and the logits' gradient for the
    upstream gradients ups, one per output; a None leaves that output out of
    the backward (its gradient not needed)."""
    x = logit.detach().clone().requires_grad_()
    out = fn(x, action, **kw)
    pairs = [(o, u) for o, u in zip(out, ups) if u is not None]
    grad, = torch.autograd.grad([o for o, _ in pairs], [x], [u.to(o.dtype) for o, u in pairs])
    return [o.detach() for o in out], grad


def ppo_surrogate_inputs(shape, seed, dtype=torch.float64, weighted=True):
    """(log_prob, old_log_prob, entropy, adv, weight) of `shape` for
    ppo_surrogate: ratios on both sides of the clip; weight None unless
    weighted."""
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(shape, generator=g, dtype=dtype) * 3
    old = lp + 0.4 * torch.randn(shape, generator=g, dtype=dtype)
    ent = torch.rand(shape, generator=g, dtype=dtype)
    adv = torch.randn(shape, generator=g, dtype=dtype)
    w = torch.rand(shape, generator=g, dtype=dtype) if weighted else None
    return lp, old, ent, adv, w


def ppo_value_inputs(shape, seed, dtype=torch.float64, weighted=True):
    """(value_new, value_old, return_, weight) of `shape` for ppo_value: new
    values on both sides of the clip range, returns on both sides of the
    values; weight None unless weighted."""
    g = torch.Generator().manual_seed(seed)
    value_old = torch.randn(shape, generator=g, dtype=dtype)
    value_new = value_old + 0.4 * torch.randn(shape, generator=g, dtype=dtype)
    return_ = value_old + torch.randn(shape, generator=g, dtype=dtype)
    w = torch.rand(shape, generator=g, dtype=dtype) if weighted else None
    return value_new, value_old, return_, w


def compiled_autograd_captures(loss) -> int:
    """Runs loss.backward() under compiled autograd (aot_eager) from a clean
    dynamo state, and returns how many graphs compiled autograd captured."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        with torch._dynamo.config.patch(compiled_autograd=True):
            torch.compile(lambda: loss.backward(), backend="aot_eager")()
        return counters["compiled_autograd"]["captures"]
    finally:
        torch._dynamo.reset()
