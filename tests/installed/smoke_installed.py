"""Smoke suite of an installed pgext wheel: run by the Python of the virtual
environment it was installed into, from a directory outside the checkout
(tests/test_release.py does both), so that only the installed package can be
imported. Self-contained: it uses nothing from the checkout but the C++
consumer project, which the driver copies next to this file (``cpp/``).

Its file name keeps the checkout's own suite from collecting it.

Environment, set by the driver:
    PGEXT_SMOKE_VERSION   the version of csrc/core/version.h
    PGEXT_SMOKE_CUDA      1 when the wheel holds the CUDA kernels, else 0
    PGEXT_SMOKE_CHECKOUT  the checkout, which pgext must not be imported from
"""
from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pgext
import pgext.distributed
import pgext.reference

HERE = Path(__file__).resolve().parent
PACKAGE = Path(pgext.__file__).resolve().parent


def _finite_mask(x):
    """-inf -> row minimum - 1000 for the reference: the same distribution
    (exp underflows to 0 in float64) without Categorical's NaN gradients."""
    neg = torch.isneginf(x)
    low = x.masked_fill(neg, float("inf")).amin(-1, keepdim=True) - 1000
    return torch.where(neg, low, x)


def _inputs(shape, n, dtype, seed, weight, mask):
    g = torch.Generator().manual_seed(seed)
    logit = (3 * torch.randn(*shape, n, generator=g, dtype=torch.float64)).to(dtype)
    action = torch.randint(0, n, shape, generator=g)
    if mask:
        # a third of the logits masked, never the taken action
        drop = torch.rand(*shape, n, generator=g) < 0.33
        drop.scatter_(-1, action.unsqueeze(-1), False)
        logit = logit.masked_fill(drop, float("-inf"))
    return_ = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    w = torch.rand(shape, generator=g, dtype=torch.float64).to(dtype) if weight else None
    return logit, action, return_, w


def _loss_and_grads(fn, logit, action, return_, weight, reduction, upstream):
    leaves = [t.detach().clone().requires_grad_() for t in (logit, return_, weight) if t is not None]
    x, r = leaves[0], leaves[1]
    w = leaves[2] if weight is not None else None
    loss = fn((x, action, r), weight=w, reduction=reduction)
    total = (loss.policy_loss * upstream[0]).sum() + (loss.entropy_loss * upstream[1]).sum()
    grads = torch.autograd.grad(total, leaves)
    return [loss.policy_loss.detach(), loss.entropy_loss.detach(), *grads]


def test_imports_the_installed_package():
    checkout = Path(os.environ["PGEXT_SMOKE_CHECKOUT"]).resolve()
    assert PACKAGE != checkout / "pgext", f"pgext imported from the checkout: {PACKAGE}"
    site_packages = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert PACKAGE == site_packages / "pgext", f"pgext not imported from this environment: {PACKAGE}"
    assert pgext.build_mode() == "installed"
    assert pgext._C.cuda_compiled() == (os.environ["PGEXT_SMOKE_CUDA"] == "1")
    assert pgext._C.cpu_capability() in ("DEFAULT", "AVX2", "AVX512")
    assert hasattr(torch.ops.pgext, "pg_error")


def test_one_version_everywhere():
    want = os.environ["PGEXT_SMOKE_VERSION"]
    assert pgext.__version__ == want
    assert importlib.metadata.version("pgext") == want
    config_version = (Path(pgext.cmake_prefix_path) / "pgext" / "pgextConfigVersion.cmake").read_text()
    assert f'set(PACKAGE_VERSION "{want}")' in config_version
    requires = [r for r in importlib.metadata.requires("pgext") if "extra ==" not in r]
    mm = re.match(r"\d+\.\d+", torch.__version__).group(0)
    assert requires == [f"torch=={mm}.*"], requires


def test_one_openmp_runtime_and_torch_libraries_shared():
    """The wheel grafted none of torch's libraries: every one loaded is torch's."""
    maps = {line.split()[-1] for line in open("/proc/self/maps") if "/" in line}
    torch_lib = Path(torch.__file__).resolve().parent / "lib"
    gomp = sorted(p for p in maps if "libgomp" in Path(p).name)
    assert gomp == [str(torch_lib / "libgomp.so.1")], gomp
    for name in ("libc10.so", "libtorch_cpu.so"):
        assert [p for p in maps if Path(p).name == name] == [str(torch_lib / name)]
    assert not (PACKAGE.parent / "pgext.libs").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", ["plain", "weighted-masked"])
def test_values_and_gradients_match_reference(dtype, reduction, case):
    shape = (6, 5) if case == "plain" else (37,)
    inp = _inputs(shape, 33, dtype, seed=len(case) * 7 + len(reduction), weight=case != "plain",
                  mask=case != "plain")
    g = torch.Generator().manual_seed(1)
    upstream = (torch.randn(shape if reduction == "none" else (), generator=g, dtype=torch.float64),
                torch.randn(shape if reduction == "none" else (), generator=g, dtype=torch.float64))
    got = _loss_and_grads(pgext.pg_error, *inp, reduction, [u.to(dtype) for u in upstream])
    logit, action, return_, weight = inp
    ref_inp = (_finite_mask(logit.double()), action, return_.double(), None if weight is None else weight.double())
    want = _loss_and_grads(pgext.reference.pg_error, *ref_inp, reduction, upstream)
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    names = ["policy_loss", "entropy_loss", "grad logit", "grad return_", "grad weight"]
    for name, a, e in zip(names, got, want):
        assert a.dtype == dtype, name
        scale = e.abs().max().clamp_min(1)
        assert torch.allclose(a.double(), e, rtol=tol, atol=tol * scale), f"{name}: {(a.double() - e).abs().max()}"
    if case != "plain":
        assert (got[2][torch.isneginf(logit)] == 0).all(), "masked logits get exactly zero gradient"


# ---------------------------------------------------------------- pgext.distributed, Gloo, world 2
WORLD, N, SPLITS = 2, 20, (7, 13)


def _distributed_inputs():
    logit, action, return_, weight = _inputs((4, 3), N, torch.float64, seed=5, weight=True, mask=False)
    return logit, action, return_, weight


def _rank(rank, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        logit, action, return_, weight = _distributed_inputs()
        start = sum(SPLITS[:rank])
        shard = logit[..., start:start + SPLITS[rank]].clone().requires_grad_()
        loss = pgext.distributed.pg_error(pgext.pg_data(shard, action, return_), vocab_start=start, weight=weight)
        (loss.policy_loss - 0.01 * loss.entropy_loss).backward()
        torch.save({"policy": loss.policy_loss.detach(), "entropy": loss.entropy_loss.detach(),
                    "grad": shard.grad}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_gloo_world_of_two(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    logit, action, return_, weight = _distributed_inputs()
    x = logit.clone().requires_grad_()
    want = pgext.pg_error(pgext.pg_data(x, action, return_), weight=weight)
    (want.policy_loss - 0.01 * want.entropy_loss).backward()
    for res in ranks:
        assert torch.allclose(res["policy"], want.policy_loss, rtol=1e-12, atol=1e-12)
        assert torch.allclose(res["entropy"], want.entropy_loss, rtol=1e-12, atol=1e-12)
    grad = torch.cat([res["grad"] for res in ranks], -1)
    assert torch.allclose(grad, x.grad, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- the C++ consumer project
class _PgModule(torch.nn.Module):
    def forward(self, logit, action, return_):
        return torch.ops.pgext.pg_error(logit, action, return_, None, "mean")


def _run(cmd, **kw):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{out[-6000:]}"
    return out


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cpp_consumer_through_cmake_prefix_path(tmp_path):
    """tests/cpp, found through the installed pgext.cmake_prefix_path, as a user's project would."""
    from pgext import _cmake

    scripted = tmp_path / "pg_module.pt"
    torch.jit.script(_PgModule()).save(str(scripted))
    prefix = pgext.cmake_prefix_path + ";" + torch.utils.cmake_prefix_path
    # this machine's CUDA toolkit quirks (an nvcc wrapper, no NVRTC) for find_package(Torch); not Torch_DIR
    machine = [a for a in _cmake.torch_cmake_args() if not a.startswith("-DTorch_DIR=")]
    ninja = ["-G", "Ninja"] if shutil.which("ninja") else []
    build = tmp_path / "build"
    _run(["cmake", "-S", HERE / "cpp", "-B", build, *ninja, *machine, f"-DCMAKE_PREFIX_PATH={prefix}",
          f"-DPGEXT_SCRIPTED_MODULE={scripted}"])
    cache = (build / "CMakeCache.txt").read_text()
    assert f"pgext_DIR:PATH={PACKAGE / 'share' / 'cmake' / 'pgext'}" in cache
    _run(["cmake", "--build", build, "-j", str(_cmake.build_jobs())])
    ldd = _run(["ldd", build / "pgext_cpp_tests"])
    assert re.search(rf"libpgext\.so => {re.escape(str(PACKAGE / 'lib' / 'libpgext.so'))}", ldd), ldd
    out = _run(["ctest", "--test-dir", build, "--output-on-failure"], timeout=600)
    assert "100% tests passed, 0 tests failed out of 9" in out, out[-3000:]
