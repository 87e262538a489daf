"""libpgext for C++ programs: the CMake package, the C++ API, TorchScript and torch.export.

The slow tests build libpgext with the root CMakeLists.txt, `cmake --install`
it, build tests/cpp (a consumer project using find_package(pgext)) against the
installed package and run its CTest tests; once more with AddressSanitizer and
UndefinedBehaviorSanitizer. Build trees live in build/ and are reused.
"""
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import pgext
from conftest import ROOT, make_inputs, subprocess_env

BUILD = ROOT / "build"
CMAKE = shutil.which("cmake")
needs_cmake = pytest.mark.skipif(CMAKE is None, reason="cmake is not installed")


def _ninja():
    ninja = shutil.which("ninja") or shutil.which("ninja", path=os.path.dirname(sys.executable))
    return ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []


def _torch_args():
    from pgext import _cmake

    return _cmake.torch_cmake_args()


def _jobs():
    from pgext import _cmake

    return str(_cmake.build_jobs())


def _run(cmd, timeout=1800, **env):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{out[-6000:]}"
    return out


def _configure_build(source, build, args, install=False):
    # a build tree left by an earlier configure with other arguments is reused as is by CMake
    _run([CMAKE, "-S", source, "-B", build, *_ninja(), *_torch_args(), *args])
    _run([CMAKE, "--build", build, "-j", _jobs()])
    if install:
        _run([CMAKE, "--install", build])


def _install_libpgext(name, args=()):
    prefix = BUILD / f"cmake-{name}-install"
    _configure_build(ROOT, BUILD / f"cmake-{name}", [f"-DCMAKE_INSTALL_PREFIX={prefix}", *args], install=True)
    return prefix


def _build_cpp_tests(name, prefix, scripted, args=()):
    build = BUILD / f"cpp-tests-{name}"
    _configure_build(ROOT / "tests" / "cpp", build,
                     [f"-DCMAKE_PREFIX_PATH={prefix}", f"-DPGEXT_SCRIPTED_MODULE={scripted}", *args])
    return build


class PgModule(torch.nn.Module):
    def forward(self, logit, action, return_):
        return torch.ops.pgext.pg_error(logit, action, return_, None, "mean")


@pytest.fixture(scope="session")
def scripted_module(tmp_path_factory):
    path = tmp_path_factory.mktemp("script") / "pg_module.pt"
    torch.jit.script(PgModule()).save(str(path))
    return path


# ------------------------------------------------------------------------ TorchScript, torch.export (Python)
def test_torchscript_save_load_run(scripted_module):
    inp = make_inputs((8,), 13, seed=900, mask=0.2)
    loaded = torch.jit.load(str(scripted_module))
    got = loaded(inp.logit, inp.action, inp.return_)
    want = pgext.pg_error(inp.data)
    assert torch.equal(got[0], want.policy_loss) and torch.equal(got[1], want.entropy_loss)
    assert "pgext::pg_error" in loaded.graph.str() or "pgext::pg_error" in str(loaded.inlined_graph)


def test_torchscript_backward():
    inp = make_inputs((6,), 9, seed=901)
    scripted = torch.jit.script(PgModule())
    x0, x1 = inp.logit.clone().requires_grad_(), inp.logit.clone().requires_grad_()
    p, e = scripted(x0, inp.action, inp.return_)
    (p - 0.01 * e).backward()
    want = pgext.pg_error((x1, inp.action, inp.return_))
    (want.policy_loss - 0.01 * want.entropy_loss).backward()
    assert torch.equal(x0.grad, x1.grad)


class PolicyHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 7)

    def forward(self, obs, action, return_):
        loss = pgext.pg_error(pgext.pg_data(self.linear(obs), action, return_))
        return loss.policy_loss - 0.01 * loss.entropy_loss


def test_torch_export_graph_holds_the_op():
    torch.manual_seed(902)
    model = PolicyHead()
    args = (torch.randn(5, 4), torch.randint(0, 7, (5,)), torch.randn(5))
    exported = torch.export.export(model, args)
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert any(t.startswith("pgext.pg_error") for t in targets), targets
    assert torch.equal(exported.module()(*args), model(*args))


# ------------------------------------------------------------------------ CMake package and C++ tests
@pytest.mark.slow
@needs_cmake
def test_cmake_package_and_cpp_tests(scripted_module):
    prefix = _install_libpgext("standalone")
    cmake_dir = prefix / "lib" / "cmake" / "pgext"
    for f in (prefix / "include" / "pgext" / "pgext.h", cmake_dir / "pgextConfig.cmake",
              cmake_dir / "pgextConfigVersion.cmake", cmake_dir / "pgextTargets.cmake"):
        assert f.is_file(), f
    assert list((prefix / "lib").glob("libpgext.so*")), "libpgext.so not installed"
    # Relocatable and Python-free: no absolute install path, no Python in the package files.
    for f in cmake_dir.glob("*.cmake"):
        text = f.read_text()
        assert str(prefix) not in text, f"{f.name} hard-codes the install prefix"
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        assert not re.search(r"python", code, re.I), f"{f.name} uses Python"
    libs = subprocess.run(["ldd", str(next((prefix / "lib").glob("libpgext.so.*")))], capture_output=True,
                          text=True).stdout
    assert "libpython" not in libs and "torch_python" not in libs, libs

    build = _build_cpp_tests("standalone", prefix, scripted_module)
    out = _run(["ctest", "--test-dir", build, "--output-on-failure"], timeout=600)
    assert "100% tests passed, 0 tests failed out of 5" in out, out[-3000:]


@pytest.mark.slow
@needs_cmake
def test_cpp_tests_under_address_and_undefined_sanitizers(scripted_module):
    """libpgext (CPU kernels) and the C++ tests built with -fsanitize=address,undefined: zero reports."""
    flags = "-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
    san = [f"-DCMAKE_CXX_FLAGS={flags}", f"-DCMAKE_SHARED_LINKER_FLAGS={flags}",
           f"-DCMAKE_EXE_LINKER_FLAGS={flags}", "-DCMAKE_BUILD_TYPE=RelWithDebInfo"]
    prefix = _install_libpgext("asan", [*san, "-DPGEXT_WITH_CUDA=OFF"])
    build = _build_cpp_tests("asan", prefix, scripted_module, san)
    # libtorch keeps its static registries alive until exit: leak checking would
    # only report those, so it is off; every other ASan and UBSan check is on.
    env = dict(ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    exe = build / "pgext_cpp_tests"
    for group in ("values", "grads", "errors", "info"):
        out = _run([exe, group], timeout=600, **env)
        assert "AddressSanitizer" not in out and "runtime error" not in out, out[-4000:]
        assert re.search(r"^\d+ passed, 0 failed$", out, re.M), out[-2000:]
    out = _run([exe, "script", scripted_module], timeout=600, **env)
    assert re.search(r"^\d+ passed, 0 failed$", out, re.M), out[-2000:]
