"""Operator registration (opcheck), torch.compile, CPU dispatch, JIT build, threads, determinism."""
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import pgext
from conftest import (
    REDUCTIONS,
    assert_close,
    compiled_autograd_captures,
    dtype_id,
    elf_dynamic,
    evaluate,
    kernel_library,
    make_inputs,
    pgext_fn,
    portable_code_reaching_avx,
    subprocess_env,
)


# ------------------------------------------------------------------------ opcheck
def _samples():
    out = []
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for weighted in (False, True):
            for reduction in REDUCTIONS:
                for rg in (False, True):
                    out.append((dtype, weighted, reduction, rg))
    return out


def _sample_id(s):
    dtype, weighted, reduction, rg = s
    return f"{dtype_id(dtype)}-{'w' if weighted else 'nw'}-{reduction}-{'grad' if rg else 'nograd'}"


def _args(dtype, weighted, reduction, rg, lead=(3, 2), N=7, seed=300, mask=False):
    inp = make_inputs(lead, N, dtype, seed=seed, weight=weighted, mask=mask)
    logit, return_ = inp.logit.clone().requires_grad_(rg), inp.return_.clone().requires_grad_(rg)
    weight = None if inp.weight is None else inp.weight.clone().requires_grad_(rg)
    return inp, (logit, inp.action, return_), dict(weight=weight, reduction=reduction)


@pytest.mark.parametrize("sample", _samples(), ids=_sample_id)
def test_opcheck_pg_error(sample):
    _, args, kwargs = _args(*sample)
    torch.library.opcheck(torch.ops.pgext.pg_error.default, args, kwargs)


@pytest.mark.parametrize(
    "lead,N,mask,action_dtype",
    [((), 5, False, torch.int64), ((4,), 1, False, torch.int32), ((2, 3, 2), 11, True, torch.uint8),
     ((0,), 4, False, torch.int64)],
    ids=["1d", "N1", "3d-masked-uint8", "empty"],
)
def test_opcheck_pg_error_shapes(lead, N, mask, action_dtype):
    inp = make_inputs(lead, N, seed=301, mask=mask, weight=True, action_dtype=action_dtype)
    # (an empty 'mean' is NaN, which opcheck's eager-vs-traced comparison cannot match)
    for reduction in REDUCTIONS if lead != (0,) else ("sum", "none"):
        args = (inp.logit.clone().requires_grad_(), inp.action, inp.return_.clone().requires_grad_())
        torch.library.opcheck(torch.ops.pgext.pg_error.default, args, dict(weight=inp.weight, reduction=reduction))


@pytest.mark.parametrize("sample", [s for s in _samples() if not s[3]], ids=_sample_id)
def test_opcheck_pg_error_forward(sample):
    _, (logit, action, return_), kw = _args(*sample)
    torch.library.opcheck(torch.ops.pgext.pg_error_forward.default,
                          (logit, action, return_, kw["weight"], kw["reduction"]))


@pytest.mark.parametrize("sample", [s for s in _samples() if not s[3]], ids=_sample_id)
def test_opcheck_pg_error_backward(sample):
    dtype, weighted, reduction, _ = sample
    _, (logit, action, return_), kw = _args(*sample, mask=True)
    weight = kw["weight"]
    policy, entropy, lse, ent_rows = torch.ops.pgext.pg_error_forward(logit, action, return_, weight, reduction)
    g = torch.Generator().manual_seed(302)
    gP = torch.randn(policy.shape, generator=g).to(policy.dtype)
    gE = torch.randn(entropy.shape, generator=g).to(entropy.dtype)
    torch.library.opcheck(torch.ops.pgext.pg_error_backward.default,
                          (gP, gE, logit, action, return_, weight, lse, ent_rows, reduction))


def test_ops_are_registered():
    for name in ("pg_error", "pg_error_forward", "pg_error_backward"):
        assert hasattr(torch.ops.pgext, name), name
    schema = str(torch.ops.pgext.pg_error.default._schema)
    assert "reduction" in schema and "weight" in schema


def test_raw_op_matches_wrapper():
    inp = make_inputs((5, 2), 9, seed=303, weight=True)
    a = torch.ops.pgext.pg_error(inp.logit, inp.action, inp.return_, inp.weight, "sum")
    b = pgext.pg_error(inp.data, weight=inp.weight, reduction="sum")
    assert torch.equal(a[0], b.policy_loss) and torch.equal(a[1], b.entropy_loss)
    c = torch.ops.pgext.pg_error(inp.logit, inp.action, inp.return_)  # defaults: no weight, mean
    d = pgext.pg_error(inp.data)
    assert torch.equal(c[0], d.policy_loss) and torch.equal(c[1], d.entropy_loss)


# ------------------------------------------------------------------------ torch.compile
@pytest.fixture
def dynamo_reset():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled_vs_eager(backend, reduction, dtype=torch.float32, weighted=True, dynamic=None, shapes=((6,), 13)):
    lead, N = shapes

    def fn(logit, action, return_, weight):
        l = pgext.pg_error(pgext.pg_data(logit, action, return_), weight=weight, reduction=reduction)
        return l.policy_loss, l.entropy_loss

    cfn = torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic)
    inp = make_inputs(lead, N, dtype, seed=304, weight=weighted, mask=0.2)
    results = []
    for f in (fn, cfn):
        leaves = [inp.logit.clone().requires_grad_(), inp.return_.clone().requires_grad_()]
        w = None if inp.weight is None else inp.weight.clone().requires_grad_()
        P, E = f(leaves[0], inp.action, leaves[1], w)
        g = torch.Generator().manual_seed(305)
        gP = torch.randn(P.shape, generator=g).to(P.dtype)
        gE = torch.randn(E.shape, generator=g).to(E.dtype)
        params = leaves + ([w] if w is not None else [])
        grads = torch.autograd.grad([P, E], params, [gP, gE])
        results.append((P.detach(), E.detach(), grads))
    (P0, E0, G0), (P1, E1, G1) = results
    tol = dict(rtol=1e-6, atol=1e-6, tol_dtype=torch.float32) if dtype != torch.float64 else {}
    assert_close(P1, P0, what="policy", **tol)
    assert_close(E1, E0, what="entropy", **tol)
    for a, b in zip(G1, G0):
        assert_close(a, b, scale=b.abs().max(), what="grad", **tol)
    return cfn


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
def test_compile_aot_eager(dynamo_reset, reduction, dtype):
    _compiled_vs_eager("aot_eager", reduction, dtype)


def test_compile_aot_eager_no_weight(dynamo_reset):
    _compiled_vs_eager("aot_eager", "mean", weighted=False)


def test_compile_dynamic_shapes(dynamo_reset):
    for shape in (((6,), 13), ((9,), 13), ((4, 5), 21)):
        _compiled_vs_eager("aot_eager", "none", dynamic=True, shapes=shape)


def test_compile_full_training_step(dynamo_reset):
    """A compiled function computing the total loss and its gradient in one graph."""
    inp = make_inputs((8,), 16, seed=306, weight=True)

    def step(logit, action, return_, weight):
        l = pgext.pg_error((logit, action, return_), weight=weight)
        total = 3 * l.policy_loss - 0.5 * l.entropy_loss
        return total

    cstep = torch.compile(step, backend="aot_eager", fullgraph=True)
    x0 = inp.logit.clone().requires_grad_()
    x1 = inp.logit.clone().requires_grad_()
    step(x0, inp.action, inp.return_, inp.weight).backward()
    cstep(x1, inp.action, inp.return_, inp.weight).backward()
    assert_close(x1.grad, x0.grad, scale=x0.grad.abs().max(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("weighted", [False, True], ids=["no_weight", "weight"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_compiled_autograd(dynamo_reset, reduction, weighted):
    """Compiled autograd (torch._dynamo.config.compiled_autograd) over a graph
    built eagerly: pgext's backward node is recorded as a call of its
    functional form (compiled_args, apply_with_saved), which gives the eager
    gradients bit for bit. It raised NotImplementedError before."""
    inp = make_inputs((6,), 9, seed=307, weight=weighted, mask=0.2)
    leaves = [inp.logit.clone().requires_grad_(), inp.return_.clone().requires_grad_()]
    if weighted:
        leaves.append(inp.weight.clone().requires_grad_())

    def total():
        loss = pgext.pg_error((leaves[0], inp.action, leaves[1]), weight=leaves[2] if weighted else None,
                              reduction=reduction)
        return (loss.policy_loss - 0.01 * loss.entropy_loss).sum()

    want = torch.autograd.grad(total(), leaves)
    loss = total()
    assert compiled_autograd_captures(loss) == 1
    for leaf, g in zip(leaves, want):
        assert torch.equal(leaf.grad, g)


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_inductor(dynamo_reset, reduction):
    _compiled_vs_eager("inductor", reduction)


# ------------------------------------------------------------------------ build info & CPU capability
TORCH_TO_PGEXT_CAPABILITY = {
    "DEFAULT": "DEFAULT",
    "NO AVX": "DEFAULT",
    "AVX2": "AVX2",
    "AVX512": "AVX512",
}


def expected_capability(torch_cap: str):
    if torch_cap in TORCH_TO_PGEXT_CAPABILITY:
        return {TORCH_TO_PGEXT_CAPABILITY[torch_cap]}
    if torch_cap.startswith("AVX512"):  # AVX512_BF16, AVX512_VNNI...: the closest x86 build we have
        return {"AVX512", "AVX2"}
    return {"DEFAULT"}  # ZVECTOR, VSX, SVE...: we only build x86 variants


def test_build_info():
    assert isinstance(pgext._C.__version__, str) and pgext._C.__version__
    assert isinstance(pgext._C.cuda_compiled(), bool)
    if torch.version.cuda is None and torch.version.hip is None:
        assert pgext._C.cuda_compiled() is False
    tv = pgext._C.torch_version()
    assert isinstance(tv, str)
    assert tv.split("+")[0] == torch.__version__.split("+")[0], (tv, torch.__version__)


def test_build_mode_installed():
    if os.environ.get("PGEXT_JIT") == "1":
        pytest.skip("suite itself runs on the JIT build")
    assert pgext.build_mode() == "installed"


def test_cpu_capability_matches_torch():
    cap = pgext._C.cpu_capability()
    assert cap in {"DEFAULT", "AVX2", "AVX512"}
    assert cap in expected_capability(torch.backends.cpu.get_cpu_capability())
    for dtype in (torch.float16, torch.float32, torch.float64):
        assert pgext._C.cpu_capability(dtype) == cap


def test_cpu_capability_refuses_dtypes_that_are_never_logits():
    for dtype in (torch.int64, torch.complex64, torch.bool):
        with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
            pgext._C.cpu_capability(dtype)


@pytest.mark.parametrize("setup, message", [
    ("import torch; torch.__version__ = '2.13.0'",
     r"pgext was built against torch 2\.14\.\d+\S*, this is torch 2\.13\.0\. .*rebuild it with this torch"),
    ("import sys; sys.modules['pgext._C'] = None",
     r"pgext's compiled part did not load \(.*\), with torch .*rebuild it with this torch"),
], ids=["other_torch", "unloadable"])
def test_import_names_the_torch_it_needs(setup, message):
    """pgext uses torch's C++ ABI, which changes between minor releases: a
    build for another torch, or one that does not load, is an ImportError
    that says what to do, not an undefined symbol or a crash later."""
    if pgext.build_mode() == "jit":
        pytest.skip("the JIT build is compiled against the running torch")
    proc = subprocess.run([sys.executable, "-c", f"{setup}\nimport pgext"], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: ") and re.search(message, last), proc.stderr[-2000:]


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None


def test_bfloat16_capability_uses_avx512_bf16_where_the_cpu_has_it():
    cap, bf16_cap = pgext._C.cpu_capability(), pgext._C.cpu_capability(torch.bfloat16)
    flags = _cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo")
    if cap == "AVX512" and "avx512_bf16" in flags:
        assert bf16_cap == "AVX512_BF16"
    else:
        assert bf16_cap == cap


_CHILD = textwrap.dedent(
    """
    import os, sys, torch, pgext
    inputs = torch.load(sys.argv[1])
    # pgext's own binaries: those in its package directory and the JIT's (by name: the
    # checkout's path may itself contain "pgext")
    package = os.path.dirname(pgext.__file__) + os.sep
    mapped = {l.split()[-1] for l in open("/proc/self/maps") if "/" in l and ".so" in l}
    res = {"torch_cap": torch.backends.cpu.get_cpu_capability(), "pgext_cap": pgext._C.cpu_capability(),
           "pgext_bf16_cap": pgext._C.cpu_capability(torch.bfloat16),
           "build_mode": pgext.build_mode(), "out": [],
           "libs": sorted(p for p in mapped
                          if p.startswith(package) or os.path.basename(p).startswith(("libpgext", "pgext_jit")))}
    for logit, action, return_, weight, reduction in inputs:
        logit = logit.clone().requires_grad_()
        l = pgext.pg_error((logit, action, return_), weight=weight, reduction=reduction)
        g, = torch.autograd.grad([l.policy_loss, l.entropy_loss], [logit],
                                 [torch.full_like(l.policy_loss, 3.0), torch.full_like(l.entropy_loss, -0.5)])
        res["out"].append((l.policy_loss.detach(), l.entropy_loss.detach(), g))
    torch.save(res, sys.argv[2])
    """
)


def _fixed_inputs():
    out = []
    for i, (lead, N, dtype, red) in enumerate([
        ((4,), 32, torch.float32, "mean"),
        ((3, 5), 7, torch.float64, "none"),
        ((64,), 300, torch.bfloat16, "sum"),
        ((5,), 70001, torch.float32, "none"),
        ((2,), 1027, torch.float16, "mean"),
    ]):
        inp = make_inputs(lead, N, dtype, seed=400 + i, weight=i % 2 == 0, mask=0.1)
        out.append((inp.logit, inp.action, inp.return_, inp.weight, red))
    return out


def _in_process(inputs):
    res = []
    for logit, action, return_, weight, reduction in inputs:
        logit = logit.clone().requires_grad_()
        l = pgext.pg_error((logit, action, return_), weight=weight, reduction=reduction)
        g, = torch.autograd.grad([l.policy_loss, l.entropy_loss], [logit],
                                 [torch.full_like(l.policy_loss, 3.0), torch.full_like(l.entropy_loss, -0.5)])
        res.append((l.policy_loss.detach(), l.entropy_loss.detach(), g))
    return res


def _run_child(tmp_path, inputs, timeout=300, **env):
    inp_file, out_file, script = tmp_path / "inputs.pt", tmp_path / "out.pt", tmp_path / "child.py"
    torch.save(inputs, inp_file)
    script.write_text(_CHILD)
    proc = subprocess.run([sys.executable, str(script), str(inp_file), str(out_file)], env=subprocess_env(**env),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"child failed:\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}"
    return torch.load(out_file)


def test_default_capability_subprocess(tmp_path):
    """ATEN_CPU_CAPABILITY=default selects the scalar kernel; it agrees with the vectorized one."""
    inputs = _fixed_inputs()
    child = _run_child(tmp_path, inputs, ATEN_CPU_CAPABILITY="default")
    assert child["torch_cap"] == "DEFAULT"
    assert child["pgext_cap"] == "DEFAULT"
    assert child["pgext_bf16_cap"] == "DEFAULT"  # the cap holds for the bfloat16 build too
    here = _in_process(inputs)
    for (logit, *_), (_, _, g_default), (_, _, g_here) in zip(inputs, child["out"], here):
        masked = logit == -math.inf
        assert masked.any()
        assert (g_default[masked] == 0).all() and (g_here[masked] == 0).all()  # exactly, in both builds
    for (logit, *_), (p0, e0, g0), (p1, e1, g1) in zip(inputs, here, child["out"]):
        tol = dict(tol_dtype=torch.float32) if logit.dtype != torch.float64 else {}
        assert_close(p1, p0, scale=p0.abs() + 1, what="policy", **tol)
        assert_close(e1, e0, scale=e0.abs() + 1, what="entropy", **tol)
        assert_close(g1, g0, scale=g0.abs().amax(-1, keepdim=True), what="grad", **tol)


def test_same_capability_subprocess_is_bitwise_identical(tmp_path):
    inputs = _fixed_inputs()
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512", "DEFAULT"):
        pytest.skip(f"capability {cap}")
    child = _run_child(tmp_path, inputs, ATEN_CPU_CAPABILITY=cap.lower())
    assert child["pgext_cap"] == pgext._C.cpu_capability()
    for a, b in zip(_in_process(inputs), child["out"]):
        for x, y in zip(a, b):
            assert torch.equal(x, y) or (x.isnan().all() and y.isnan().all())


@pytest.mark.parametrize("capability", ["default", "native"])
def test_deterministic_across_thread_counts_in_every_kernel_build(tmp_path, capability):
    """1 and 2 threads give the same bits in the portable kernel build too.
    With 2 threads, these few long rows are split across threads and their
    blocks merged by math::combine out of line; the portable build once called
    the AVX2 build's copy of it (FMA: other bits, and no run at all on a CPU
    without AVX2)."""
    x = torch.randn(7, 12289, generator=torch.Generator().manual_seed(1)) * 3
    inputs = _fixed_inputs() + [(x, torch.zeros(7, dtype=torch.long), torch.ones(7), None, "none")]
    env = {} if capability == "native" else {"ATEN_CPU_CAPABILITY": "default"}
    out = {}
    for threads in (1, 2):
        (tmp_path / str(threads)).mkdir()
        out[threads] = _run_child(tmp_path / str(threads), inputs, OMP_NUM_THREADS=threads, **env)
    assert out[1]["pgext_cap"] == out[2]["pgext_cap"]
    assert capability == "native" or out[1]["pgext_cap"] == "DEFAULT"
    for i, (a, b) in enumerate(zip(out[1]["out"], out[2]["out"])):
        for name, x1, x2 in zip(("policy", "entropy", "grad"), a, b):
            assert torch.equal(x1, x2), f"input {i}: {name} differs between 1 and 2 threads"


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
def test_portable_code_never_reaches_avx_instructions():
    """Every inline function several kernel builds instantiate is linked once;
    the copy the portable code calls must not be an AVX2 / AVX-512 build
    (row_math.h's namespace per build; portable objects linked first)."""
    assert portable_code_reaching_avx(kernel_library()) == []


@pytest.mark.slow
def test_jit_build_matches_installed(tmp_path, request):
    """PGEXT_JIT=1 compiles the sources with torch.utils.cpp_extension.load: same results, bit for bit."""
    build_dir = pathlib.Path(request.config.cache.mkdir("pgext_jit_build"))
    inputs = _fixed_inputs()
    # One CUDA architecture: nvcc's path through cpp_extension.load is what is
    # tested here; `make build` compiles the default list.
    child = _run_child(tmp_path, inputs, timeout=1800, PGEXT_JIT="1", PGEXT_JIT_BUILD_DIR=str(build_dir),
                       TORCH_CUDA_ARCH_LIST="9.0")
    assert child["build_mode"] == "jit"
    # the installed package's shape: a library with the ops, a module linking it; the installed
    # libpgext is not loaded next to them (both would register the pgext op library)
    library, module = build_dir / "lib" / "pgext_jit_lib.so", build_dir / "module" / "pgext_jit_C.so"
    assert child["libs"] == sorted([str(library), str(module)]), child["libs"]
    if shutil.which("readelf"):
        assert library.name in elf_dynamic(module).get("NEEDED", [])
        needed = elf_dynamic(library).get("NEEDED", [])
        assert not [n for n in needed if "python" in n], needed
    if shutil.which("objdump"):
        assert portable_code_reaching_avx(library) == []
    assert child["pgext_cap"] == pgext._C.cpu_capability()
    for i, (a, b) in enumerate(zip(_in_process(inputs), child["out"])):
        for name, x, y in zip(("policy", "entropy", "grad"), a, b):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(x, y), f"input {i}: {name} differs between JIT and installed build"


# ------------------------------------------------------------------------ determinism & threads
DETERMINISM_CASES = [((2,), 300000), ((3000,), 100), ((7, 11), 4099)]


def _full_result(inp, reduction):
    r = evaluate(pgext_fn, inp, reduction=reduction)
    return [r.policy, r.entropy] + [r.grads[k] for k in sorted(r.grads)]


def _bitwise_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", DETERMINISM_CASES, ids=lambda c: "x".join(map(str, (*c[0], c[1]))))
def test_deterministic_across_thread_counts(restore_threads, case, reduction):
    lead, N = case
    inp = make_inputs(lead, N, torch.float32, seed=500, weight=True, mask=0.05)
    results = {}
    for n in (1, 2, 3, 1):
        torch.set_num_threads(n)
        res = _full_result(inp, reduction)
        if n in results:
            assert _bitwise_equal(res, results[n]), f"run-to-run difference with {n} threads"
        results[n] = res
    for n in (2, 3):
        assert _bitwise_equal(results[n], results[1]), f"{n} threads differ from 1 thread"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=dtype_id)
def test_deterministic_across_thread_counts_dtypes(restore_threads, dtype):
    inp = make_inputs((2,), 300000, dtype, seed=501, weight=True)
    torch.set_num_threads(1)
    one = _full_result(inp, "mean")
    torch.set_num_threads(2)
    two = _full_result(inp, "mean")
    assert _bitwise_equal(one, two)


def test_repeated_calls_bitwise_identical():
    inp = make_inputs((3000,), 100, torch.float32, seed=502, weight=True)
    first = _full_result(inp, "mean")
    for _ in range(3):
        assert _bitwise_equal(_full_result(inp, "mean"), first)


def test_python_threads(restore_threads):
    torch.set_num_threads(2)
    cases = [make_inputs(lead, N, dtype, seed=600 + i, weight=i % 2 == 0, mask=0.1)
             for i, (lead, N, dtype) in enumerate([((300,), 100, torch.float32), ((2,), 30000, torch.float32),
                                                   ((5, 7), 64, torch.float64), ((64,), 257, torch.bfloat16)])]
    reductions = ["mean", "sum", "none", "mean"]
    expected = [_full_result(c, r) for c, r in zip(cases, reductions)]
    errors, mismatches = [], []
    barrier = threading.Barrier(len(cases) * 2)

    def worker(k):
        try:
            i = k % len(cases)
            barrier.wait()
            for _ in range(10):
                got = _full_result(cases[i], reductions[i])
                if not _bitwise_equal(got, expected[i]):
                    mismatches.append(i)
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(cases) * 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "worker threads hang"
    assert not errors, errors
    assert not mismatches, f"results differ from single-threaded ones for cases {sorted(set(mismatches))}"
