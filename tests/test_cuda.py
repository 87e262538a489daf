"""The CUDA backend.

Build checks run everywhere: where a CUDA toolkit was found at build time the
kernels must be compiled in, registered for every op, built for the default
architectures and without compiler warnings from pgext's sources; importing
pgext must work without a GPU. The GPU checks (values and gradients against
the reference, a vocabulary-sized bf16 case, CUDA-graph capture, no host
synchronization, the device-side action check) run where torch sees a GPU and
skip cleanly elsewhere.
"""
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import pgext
from pgext import _build_config
from conftest import (
    FLOAT_DTYPES,
    REDUCTIONS,
    ROOT,
    Result,
    assert_close,
    check_against_reference,
    dtype_id,
    elf_sections,
    evaluate,
    make_inputs,
    pgext_fn,
    subprocess_env,
)

KERNEL_OPS = ("pg_error_forward", "pg_error_backward", "pg_row_stats", "pg_grad_from_stats", "pg_merge_row_stats_")
BUILD_LOG = ROOT / "build" / "build_ext.log"

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


def toolkit_expected() -> bool:
    """Whether this build should hold the CUDA kernels: a CUDA build of torch, a toolkit, no opt-out."""
    return (
        torch.version.cuda is not None
        and os.environ.get("PGEXT_CPU_ONLY", "0") != "1"
        and _build_config.find_cuda_home() is not None
    )


# ------------------------------------------------------------------------ build (no GPU needed)
def test_cuda_compiled_where_a_toolkit_is_found():
    if not toolkit_expected():
        pytest.skip("no CUDA toolkit (or a CPU-only torch, or PGEXT_CPU_ONLY=1): CPU-only build expected")
    assert pgext._C.cuda_compiled() is True


def test_a_cpu_only_torch_means_a_cpu_only_build(monkeypatch, tmp_path):
    """With a toolkit but a CPU-only torch (no libc10_cuda.so to link the
    kernels against), the build is CPU-only, or an error under FORCE_CUDA=1."""
    monkeypatch.setattr(_build_config, "find_cuda_home", lambda: "/opt/cuda")
    monkeypatch.setattr(_build_config, "torch_library_dir", lambda: tmp_path)
    monkeypatch.delenv("PGEXT_CPU_ONLY", raising=False)
    monkeypatch.delenv("FORCE_CUDA", raising=False)
    assert _build_config.want_cuda() is None
    monkeypatch.setenv("FORCE_CUDA", "1")
    with pytest.raises(RuntimeError, match="built without CUDA"):
        _build_config.want_cuda()
    (tmp_path / "libc10_cuda.so").touch()
    assert _build_config.want_cuda() == "/opt/cuda"


def test_cuda_kernels_registered_for_every_op():
    if not pgext._C.cuda_compiled():
        pytest.skip("CPU-only build")
    for op in KERNEL_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pgext::{op}", "CUDA"), op
    assert torch._C._dispatch_has_kernel_for_dispatch_key("pgext::pg_error", "AutocastCUDA")


def test_cpu_only_build_has_no_cuda_kernels():
    if pgext._C.cuda_compiled():
        pytest.skip("CUDA build")
    for op in KERNEL_OPS:
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"pgext::{op}", "CUDA"), op


def test_import_and_cpu_op_without_a_visible_gpu():
    code = textwrap.dedent(
        """
        import torch, pgext
        assert not torch.cuda.is_available()
        logit = torch.randn(4, 5, requires_grad=True)
        loss = pgext.pg_error(pgext.pg_data(logit, torch.tensor([0, 1, 2, 4]), torch.ones(4)))
        (loss.policy_loss - 0.01 * loss.entropy_loss).backward()
        print(pgext._C.cuda_compiled(), bool(torch.isfinite(logit.grad).all()))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(CUDA_VISIBLE_DEVICES=""),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    compiled, finite = proc.stdout.split()
    assert compiled == str(pgext._C.cuda_compiled()) and finite == "True"


def _build_log() -> str:
    if not BUILD_LOG.exists():
        pytest.skip(f"{BUILD_LOG} is written by `make build` (make test / make demo)")
    return BUILD_LOG.read_text(errors="replace")


def test_build_log_has_no_warnings_from_pgext_sources():
    text = _build_log()
    csrc = re.escape(str(ROOT / "csrc"))
    bad = [line for line in text.splitlines()
           if re.search(rf"({csrc}|\bcsrc)/\S+:\d+:(\d+:)? (warning|error)", line)]
    assert not bad, "compiler warnings in pgext's sources:\n" + "\n".join(bad[:20])


def test_build_log_cuda_architectures():
    """The CUDA objects were compiled for the default (or requested) architectures."""
    if not pgext._C.cuda_compiled():
        pytest.skip("CPU-only build")
    text = _build_log()
    if "nvcc" not in text:
        pytest.skip("the last `make build` compiled no CUDA source (incremental build)")
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", _build_config.DEFAULT_CUDA_ARCH_LIST)
    for arch in re.split(r"[;\s]+", arch_list.strip()):
        sm = arch.split("+")[0].replace(".", "")
        assert f"code=sm_{sm}" in text, f"sm_{sm} missing from the nvcc command lines"
        if arch.endswith("+PTX"):
            assert f"code=compute_{sm}" in text, f"PTX for compute_{sm} missing"


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf (binutils) is not installed")
def test_built_without_debug_information_unless_asked():
    """setup.py compiles with -g0 over Python's -g (about 50 MB of DWARF in
    libpgext); PGEXT_DEBUG_INFO=1 at build time asks for -g."""
    library = pathlib.Path(pgext.__file__).parent / "lib" / "libpgext.so"
    has_dwarf = ".debug_info" in elf_sections(library)
    asked = _build_config.debug_info_wanted()
    assert has_dwarf == asked, (f"{library} {'has' if has_dwarf else 'lacks'} DWARF with PGEXT_DEBUG_INFO "
                                f"{'=1' if asked else 'unset'} (run the tests with the build's setting)")


# ------------------------------------------------------------------------ GPU
def _to(inp, device):
    return inp._replace(**{k: (None if v is None else v.to(device)) for k, v in inp._asdict().items()})


def _on_gpu(inp, reduction, **kw) -> Result:
    got = evaluate(pgext_fn, _to(inp, "cuda"), reduction=reduction, **kw)
    return Result(got.policy.cpu(), got.entropy.cpu(), {k: v.cpu() for k, v in got.grads.items()}, got.upstream)


GPU_SHAPES = [((4,), 32), ((1,), 1), ((64,), 2), ((3, 5), 7), ((5,), 70001), ((), 9), ((300,), 1024),
              ((33,), 1025), ((7,), 4099)]


@needs_gpu
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, (*s[0], s[1]))))
def test_gpu_against_reference(shape, dtype, reduction):
    lead, N = shape
    inp = make_inputs(lead, N, dtype, seed=700, weight=True, mask=0.2)
    check_against_reference(inp, reduction, got=_on_gpu(inp, reduction))


def _relayout_on_gpu(t, kind):
    """relayout() (poisoned padding) built on the GPU: moving a strided CPU view would make it contiguous."""
    if kind == "step":
        buf = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), device="cuda", dtype=t.dtype)
        view = buf[..., ::2]
    elif kind == "offset":
        buf = torch.full((*t.shape[:-1], t.shape[-1] + 3), float("nan"), device="cuda", dtype=t.dtype)
        view = buf[..., 2:-1]
    else:
        view = torch.full(t.shape[::-1], float("nan"), device="cuda", dtype=t.dtype).permute(
            *reversed(range(t.dim())))
    view.copy_(t)
    return view


@needs_gpu
@pytest.mark.parametrize("layout", ["step", "offset", "transpose"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_gpu_strided_logits(layout, dtype):
    inp = make_inputs((6, 3), 37, dtype, seed=701, weight=True)
    on_gpu = _to(inp, "cuda")
    got = evaluate(pgext_fn, on_gpu._replace(logit=_relayout_on_gpu(on_gpu.logit, layout)), reduction="none")
    got = Result(got.policy.cpu(), got.entropy.cpu(), {k: v.cpu() for k, v in got.grads.items()}, got.upstream)
    check_against_reference(inp, "none", got=got)


@needs_gpu
def test_gpu_matches_cpu_kernel():
    inp = make_inputs((16,), 3001, torch.float32, seed=702, weight=True, mask=0.1)
    cpu = evaluate(pgext_fn, inp, reduction="mean")
    gpu = _on_gpu(inp, "mean")
    assert_close(gpu.policy, cpu.policy, rtol=1e-5, atol=1e-6)
    assert_close(gpu.entropy, cpu.entropy, rtol=1e-5, atol=1e-6)
    for k in cpu.grads:
        assert_close(gpu.grads[k], cpu.grads[k], scale=cpu.grads[k].abs().max(), rtol=1e-5, atol=1e-6)


@needs_gpu
@pytest.mark.parametrize("n", [6, 8, 40, 3001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
def test_gpu_nan_and_lowest_value_masks_match_cpu(n, dtype):
    """A NaN at every position of a row (rows start at every offset from a
    16-byte boundary, so the NaN meets every thread split), and logits masked
    with finfo.min: NaN exactly where the CPU has it, the CPU's values
    elsewhere. tests/test_math_host.py replays these cases on the host."""
    g = torch.Generator().manual_seed(n)
    rows = n + 4
    padded = torch.randn(rows, n + 1, generator=g).to(dtype)
    logit = padded[:, 1:]
    logit[torch.arange(n), torch.arange(n)] = float("nan")
    lowest = torch.finfo(dtype).min
    logit[n:][torch.rand(4, n, generator=g) < 0.4] = lowest
    logit[n, : n // 2] = lowest
    action = torch.randint(0, n, (rows,), generator=g)
    logit[n:, :][torch.arange(4), action[n:]] = 0.5  # never a masked action
    return_ = torch.randn(rows, generator=g).to(dtype)
    results = []
    for device in ("cpu", "cuda"):
        x = padded.to(device)[:, 1:].detach().requires_grad_()  # a fresh leaf, rows as strided as logit's
        got = pgext.pg_error((x, action.to(device), return_.to(device)), reduction="none")
        (got.policy_loss.sum() + got.entropy_loss.sum()).backward()
        results.append([t.detach().cpu().double() for t in (got.policy_loss, got.entropy_loss, x.grad)])
    for name, cpu, gpu in zip(("policy", "entropy", "grad"), *results):
        assert torch.equal(cpu.isnan(), gpu.isnan()), name
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
        assert_close(gpu.nan_to_num(0.0), cpu.nan_to_num(0.0), rtol=tol, atol=tol)


@needs_gpu
def test_gpu_llm_vocabulary_bf16_against_float32():
    """bf16 logits (8192, 151936) against the notebook's math in float32 on the same (rounded) logits."""
    rows, N = 8192, 151936
    g = torch.Generator(device="cuda").manual_seed(703)
    logit = (torch.randn(rows, N, device="cuda", generator=g) * 2).to(torch.bfloat16)
    action = torch.randint(0, N, (rows,), device="cuda", generator=g)
    return_ = torch.randn(rows, device="cuda", generator=g)
    x = logit.detach().requires_grad_()
    loss = pgext.pg_error(pgext.pg_data(x, action, return_))
    (loss.policy_loss - 0.01 * loss.entropy_loss).backward()
    got_p, got_e, got_g = loss.policy_loss.float(), loss.entropy_loss.float(), x.grad
    del loss, x
    ref_x = logit.float().requires_grad_()
    ref = pgext.reference.pg_error((ref_x, action, return_))
    (ref.policy_loss - 0.01 * ref.entropy_loss).backward()
    torch.testing.assert_close(got_p, ref.policy_loss.detach(), rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(got_e, ref.entropy_loss.detach(), rtol=2e-2, atol=1e-2)
    assert got_g.dtype == torch.bfloat16
    err = (got_g.float() - ref_x.grad).abs().max().item()
    assert err <= 1e-2 * ref_x.grad.abs().max().item() + 1e-9, err


@needs_gpu
def test_gpu_no_host_synchronization():
    inp = _to(make_inputs((64,), 5000, torch.float32, seed=704, weight=True), "cuda")
    logit = inp.logit.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = pgext.pg_error((logit, inp.action, inp.return_), weight=inp.weight)
        (3 * loss.policy_loss - 0.5 * loss.entropy_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(logit.grad).all()


@needs_gpu
def test_gpu_cuda_graph_capture():
    inp = _to(make_inputs((32,), 2000, torch.float32, seed=705), "cuda")
    logit = inp.logit.clone().requires_grad_()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph, as CUDA graphs require
        for _ in range(2):
            logit.grad = None
            l = pgext.pg_error((logit, inp.action, inp.return_))
            (l.policy_loss - 0.01 * l.entropy_loss).backward()
    torch.cuda.current_stream().wait_stream(stream)
    eager = (l.policy_loss.detach().clone(), logit.grad.clone())
    graph = torch.cuda.CUDAGraph()
    logit.grad = None
    with torch.cuda.graph(graph):
        l = pgext.pg_error((logit, inp.action, inp.return_))
        (l.policy_loss - 0.01 * l.entropy_loss).backward()
    with torch.no_grad():
        logit.copy_(inp.logit)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(l.policy_loss.detach(), eager[0])
    assert torch.equal(logit.grad, eager[1])


@needs_gpu
def test_gpu_deterministic():
    inp = _to(make_inputs((257,), 3000, torch.float32, seed=706, weight=True), "cuda")
    first = evaluate(pgext_fn, inp, reduction="mean")
    for _ in range(3):
        again = evaluate(pgext_fn, inp, reduction="mean")
        assert torch.equal(again.policy, first.policy) and torch.equal(again.entropy, first.entropy)
        assert all(torch.equal(again.grads[k], first.grads[k]) for k in first.grads)


@needs_gpu
def test_gpu_autocast_keeps_float32_logits():
    inp = _to(make_inputs((8,), 100, torch.float32, seed=707), "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = pgext.pg_error(inp.data)
    want = pgext.pg_error(inp.data)
    assert got.policy_loss.dtype == torch.float32
    assert torch.equal(got.policy_loss, want.policy_loss) and torch.equal(got.entropy_loss, want.entropy_loss)


@needs_gpu
def test_gpu_out_of_range_action_is_a_device_assert():
    """A device-side assert, not an out-of-bounds read; it poisons the CUDA context, so in a child."""
    code = textwrap.dedent(
        """
        import torch, pgext
        logit = torch.randn(4, 10, device="cuda")
        action = torch.tensor([0, 1, 10, 2], device="cuda")
        loss = pgext.pg_error((logit, action, torch.ones(4, device="cuda")))
        torch.cuda.synchronize()
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "device-side assert" in proc.stderr or "action out of range" in proc.stderr, proc.stderr[-4000:]


@needs_gpu
def test_gpu_row_stats_and_grad_from_stats_match_cpu():
    inp = make_inputs((9,), 700, torch.float32, seed=708, weight=True, mask=0.1)
    shard = slice(200, 500)
    cpu = torch.ops.pgext.pg_row_stats(inp.logit[:, shard], inp.action, 200)
    gpu = torch.ops.pgext.pg_row_stats(inp.logit[:, shard].cuda(), inp.action.cuda(), 200)
    for a, b in zip(gpu, cpu):
        assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6)
    _, _, lse, ent = torch.ops.pgext.pg_error_forward(inp.logit, inp.action, inp.return_, inp.weight, "mean")
    args = (torch.tensor(3.0), torch.tensor(-0.5), inp.logit[:, shard], inp.action, inp.return_, inp.weight,
            lse, ent, "mean", 200)
    want = torch.ops.pgext.pg_grad_from_stats(*args)
    got = torch.ops.pgext.pg_grad_from_stats(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in args])
    assert_close(got.cpu(), want, scale=want.abs().max(), rtol=1e-5, atol=1e-6)
