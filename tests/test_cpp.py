"""libpgext for C++ programs: the packages, the C++ API, TorchScript and torch.export.

Fast tests check the package that `make build` installed in place: pgext._C
links pgext/lib/libpgext.so, which holds the ops (and no Python), and the
package ships libpgext's headers and CMake package under
pgext.cmake_prefix_path.

The slow tests build tests/cpp (a consumer project using find_package(pgext))
and run its CTest tests against two installs: a real `pip install --target`
of this package (found through that install's pgext.cmake_prefix_path), and
`cmake --install` of the standalone CMake build of the root CMakeLists.txt.
They build and run the README's C++ example, verbatim, against the pip
install, and run the C++ tests once more with AddressSanitizer and
UndefinedBehaviorSanitizer. Build trees live in build/ and are reused; the pip
install reuses the objects of `make build` (same build/ directory), so it
compiles nothing again.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import pgext
from pgext import _build_config
from conftest import ROOT, elf_dynamic, make_inputs, portable_code_reaching_avx, subprocess_env, undefined_symbols

BUILD = ROOT / "build"
CMAKE = shutil.which("cmake")
needs_cmake = pytest.mark.skipif(CMAKE is None, reason="cmake is not installed")
needs_binutils = pytest.mark.skipif(not (shutil.which("readelf") and shutil.which("nm")),
                                    reason="readelf / nm (binutils) are not installed")
installed_build = pytest.mark.skipif(os.environ.get("PGEXT_JIT") == "1",
                                     reason="the suite runs on the JIT build, not the installed package")
PACKAGE_CMAKE_FILES = ("pgextConfig.cmake", "pgextConfigVersion.cmake", "pgextTargets.cmake")


def _ninja():
    ninja = shutil.which("ninja") or shutil.which("ninja", path=os.path.dirname(sys.executable))
    return ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []


def _torch_args():
    from pgext import _cmake

    return _cmake.torch_cmake_args()


def _machine_args():
    """This machine's extra arguments for find_package(Torch) (CUDA toolkit root, NVRTC), without Torch_DIR."""
    return [a for a in _torch_args() if not a.startswith("-DTorch_DIR=")]


def _jobs():
    from pgext import _cmake

    return str(_cmake.build_jobs())


def _run(cmd, timeout=1800, cwd=None, env=None, **extra_env):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**(os.environ if env is None else env), **extra_env})
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


def _nm(*args):
    return subprocess.run(["nm", *map(str, args)], capture_output=True, text=True, check=True).stdout


def _clean_env():
    """The environment without LD_LIBRARY_PATH / LD_PRELOAD: libraries found through RUNPATH only."""
    return {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "LD_PRELOAD", "PYTHONPATH")}


def _ldd(path):
    """{soname: resolved path or 'not found'} of a binary and its dependencies."""
    out = _run(["ldd", path], env=_clean_env())
    return dict(re.findall(r"^\s*(\S+) => (not found|\S+)", out, re.M))


def _code_lines(text):
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _check_cmake_package(cmake_dir, prefix):
    """The CMake files exist, are relocatable (no absolute install path) and use no Python."""
    for name in PACKAGE_CMAKE_FILES:
        assert (cmake_dir / name).is_file(), cmake_dir / name
    for f in cmake_dir.glob("*.cmake"):
        text = f.read_text()
        assert str(prefix) not in text and str(ROOT) not in text, f"{f} hard-codes a path"
        assert not re.search(r"python", "\n".join(_code_lines(text)), re.I), f"{f.name} uses Python"


def _package_dir():
    return Path(pgext.__file__).resolve().parent


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


# ------------------------------------------------------------------------ the package (make build, in place)
def test_cmake_prefix_path_attribute():
    """pgext.cmake_prefix_path, like torch.utils.cmake_prefix_path: a str naming <pgext>/share/cmake."""
    assert isinstance(pgext.cmake_prefix_path, str)
    assert Path(pgext.cmake_prefix_path) == _package_dir() / "share" / "cmake"
    assert "cmake_prefix_path" in pgext.__all__


@installed_build
def test_package_ships_library_headers_and_cmake_package():
    pkg = _package_dir()
    assert (pkg / "lib" / "libpgext.so").is_file()
    assert not list((pkg / "lib").glob("libpgext.so.*")), "one library file, no versioned copies"
    for header in _build_config.public_headers():
        shipped = pkg / "include" / "pgext" / Path(header).name
        assert shipped.is_file() and shipped.read_bytes() == Path(header).read_bytes(), shipped
    cmake_dir = Path(pgext.cmake_prefix_path) / "pgext"
    _check_cmake_package(cmake_dir, pkg)
    config = (cmake_dir / "pgextConfig.cmake").read_text()
    assert f"set(pgext_WITH_CUDA {'ON' if pgext._C.cuda_compiled() else 'OFF'})" in config
    torch_mm = re.match(r"\d+\.\d+", torch.__version__).group(0)
    assert f'set(pgext_TORCH_VERSION "{torch_mm}")' in config
    assert f'set(PACKAGE_VERSION "{pgext.__version__}")' in (cmake_dir / "pgextConfigVersion.cmake").read_text()


@installed_build
@needs_binutils
def test_module_links_libpgext_and_libpgext_is_python_free():
    pkg = _package_dir()
    module, library = Path(pgext._C.__file__), pkg / "lib" / "libpgext.so"
    mod, lib = elf_dynamic(module), elf_dynamic(library)
    assert "libpgext.so" in mod.get("NEEDED", []), mod
    assert "$ORIGIN/lib" in ":".join(mod.get("RUNPATH", []) + mod.get("RPATH", [])).split(":"), mod
    assert lib.get("SONAME") == ["libpgext.so"], lib
    assert not [n for n in lib.get("NEEDED", []) if "python" in n.lower()], lib["NEEDED"]
    assert "$ORIGIN/../../torch/lib" in ":".join(lib.get("RUNPATH", []) + lib.get("RPATH", [])).split(":"), lib
    # no Python symbol left for the loader to find, no module entry point
    undefined = undefined_symbols(library)
    assert not re.search(r"\b_?Py[A-Z_]\w*", undefined), re.findall(r"\b_?Py[A-Z_]\w*", undefined)[:10]
    assert "PyInit_" not in _nm("-D", "--defined-only", library)
    # the ops are compiled into libpgext only: _C holds no registration and no kernel
    lib_symbols, mod_symbols = _nm("-C", library), _nm("-C", module)
    for marker in ("TORCH_LIBRARY_static_init_pgext", "pg_error_forward"):
        assert marker in lib_symbols, marker
        assert marker not in mod_symbols, f"{marker} compiled into pgext._C"
    assert _ldd(module)["libpgext.so"] == str(library)
    # found without Python having loaded torch and without LD_LIBRARY_PATH, in
    # place too (not next to torch): what a C++ program linking it needs
    missing = [name for name, where in _ldd(library).items() if where == "not found"]
    assert not missing, missing


@installed_build
def test_one_libpgext_per_process_and_registered_once():
    """import pgext maps pgext/lib/libpgext.so once; loading it again (as a C++ user's
    torch.ops.load_library would) is the same library: no second registration, no error."""
    code = textwrap.dedent(
        """
        import json, torch, pgext
        from pgext import _cmake
        def mapped():
            return sorted({l.split()[-1] for l in open("/proc/self/maps") if "libpgext" in l})
        before = mapped()
        torch.ops.load_library(_cmake.library_path)
        x = torch.randn(3, 4, requires_grad=True)
        loss = pgext.pg_error((x, torch.tensor([0, 1, 3]), torch.ones(3)))
        loss.policy_loss.backward()
        print(json.dumps({"before": before, "after": mapped(), "lib": _cmake.library_path,
                          "grad": bool(torch.isfinite(x.grad).all())}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["before"] == res["after"] == [res["lib"]], res
    assert Path(res["lib"]).parent.parent == _package_dir()
    assert res["grad"]


# ------------------------------------------------------------------------ CMake packages and C++ tests
@pytest.fixture(scope="session")
def standalone_prefix():
    """libpgext built by the root CMakeLists.txt and `cmake --install`ed under build/."""
    if CMAKE is None:
        pytest.skip("cmake is not installed")
    # One CUDA architecture: the CMake build's CUDA set-up is what is tested
    # here; `make build` compiles the default list.
    return _install_libpgext("standalone", ["-DTORCH_CUDA_ARCH_LIST=9.0"])


@pytest.fixture(scope="session")
def pip_site():
    """A real `pip install --no-build-isolation --no-deps --target build/pip-install/site .`.

    pip builds in this checkout's build/ directory, like `make build`, so it
    finds the objects compiled there and only links. torch (and the NVIDIA
    libraries torch depends on) are linked into the target directory, so that
    it looks like a site-packages with pgext installed next to torch.
    """
    if os.environ.get("PGEXT_JIT") == "1":
        pytest.skip("the suite runs on the JIT build")
    root = BUILD / "pip-install"
    shutil.rmtree(root, ignore_errors=True)
    site = root / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-compile",
          "--target", site, ROOT], timeout=3600, MAX_JOBS=_jobs())
    torch_dir = Path(torch.__file__).resolve().parent
    os.symlink(torch_dir, site / "torch")
    if (torch_dir.parent / "nvidia").is_dir():
        os.symlink(torch_dir.parent / "nvidia", site / "nvidia")
    return site


def _site_python(site, code, cwd):
    """Runs Python code with the pip install (not this checkout) on the path; returns its last line as JSON."""
    env = {**_clean_env(), "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"}
    out = _run([sys.executable, "-c", code], timeout=600, cwd=cwd, env=env)
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
@needs_binutils
def test_pip_install_ships_libpgext_and_links_it(pip_site, tmp_path):
    pkg = pip_site / "pgext"
    library = pkg / "lib" / "libpgext.so"
    assert library.is_file() and (pkg / "include" / "pgext" / "pgext.h").is_file()
    modules = list(pkg.glob("_C.*.so"))
    assert len(modules) == 1, modules
    _check_cmake_package(pkg / "share" / "cmake" / "pgext", pip_site)
    # the files are the wheel's: pip uninstall removes them
    record = next(pip_site.glob("pgext-*.dist-info")) / "RECORD"
    listed = {line.split(",")[0] for line in record.read_text().splitlines()}
    for f in ("pgext/lib/libpgext.so", "pgext/include/pgext/pgext.h",
              *(f"pgext/share/cmake/pgext/{n}" for n in PACKAGE_CMAKE_FILES)):
        assert f in listed, f"{f} missing from RECORD"
    # it runs with the torch minor release it was built against only (C++ ABI)
    metadata = (record.parent / "METADATA").read_text()
    torch_mm = re.match(r"\d+\.\d+", torch.__version__).group(0)
    assert re.findall(r"^Requires-Dist: torch.*$", metadata, re.M) == [f"Requires-Dist: torch=={torch_mm}.*"]
    # RUNPATHs resolve in the installed layout, with no LD_LIBRARY_PATH
    assert _ldd(modules[0])["libpgext.so"] == str(library)
    missing = {k: v for k, v in _ldd(library).items() if v == "not found"}
    assert not missing, missing
    assert not [n for n in elf_dynamic(library).get("NEEDED", []) if "python" in n.lower()]

    res = _site_python(pip_site, textwrap.dedent(
        """
        import json, torch, pgext
        x = torch.randn(5, 7, requires_grad=True)
        loss = pgext.pg_error((x, torch.tensor([0, 1, 2, 3, 6]), torch.ones(5)))
        (loss.policy_loss - 0.01 * loss.entropy_loss).backward()
        maps = sorted({l.split()[-1] for l in open("/proc/self/maps") if "libpgext" in l})
        print(json.dumps({"file": pgext.__file__, "mode": pgext.build_mode(), "prefix": pgext.cmake_prefix_path,
                          "maps": maps, "finite": bool(torch.isfinite(x.grad).all())}))
        """), cwd=tmp_path)
    assert Path(res["file"]) == pkg / "__init__.py", res
    assert res["mode"] == "installed" and res["finite"]
    assert Path(res["prefix"]) == pkg / "share" / "cmake"
    assert res["maps"] == [str(library)], res


def _pip_prefix_path(site, cwd):
    """What the README's command line gives CMake: pgext.cmake_prefix_path;torch.utils.cmake_prefix_path."""
    res = _site_python(site, "import json, pgext, torch; "
                             "print(json.dumps(pgext.cmake_prefix_path + ';' + torch.utils.cmake_prefix_path))", cwd)
    assert res.split(";")[0] == str(site / "pgext" / "share" / "cmake"), res
    return res


@pytest.mark.slow
@needs_cmake
def test_cpp_tests_against_pip_install(pip_site, scripted_module, tmp_path):
    prefix = _pip_prefix_path(pip_site, tmp_path)
    build = BUILD / "cpp-tests-pip"
    # No Torch_DIR: torch is found through the prefix path too, as a user's would be.
    _run([CMAKE, "-S", ROOT / "tests" / "cpp", "-B", build, *_ninja(), *_machine_args(),
          f"-DCMAKE_PREFIX_PATH={prefix}", f"-DPGEXT_SCRIPTED_MODULE={scripted_module}"])
    cache = (build / "CMakeCache.txt").read_text()
    assert f"pgext_DIR:PATH={pip_site / 'pgext' / 'share' / 'cmake' / 'pgext'}" in cache
    _run([CMAKE, "--build", build, "-j", _jobs()])
    assert _ldd(build / "pgext_cpp_tests")["libpgext.so"] == str(pip_site / "pgext" / "lib" / "libpgext.so")
    out = _run(["ctest", "--test-dir", build, "--output-on-failure"], timeout=600)
    assert "100% tests passed, 0 tests failed out of 9" in out, out[-3000:]


def _readme_section(title):
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def _code_blocks(section, lang):
    return re.findall(rf"^```{lang}\n(.*?)^```$", section, re.M | re.S)


def _cuda_toolchain_file(path):
    """This machine's find_package(Torch) arguments as a toolchain file, given
    through the CMAKE_TOOLCHAIN_FILE environment variable: the README's
    commands run as written (a machine with a full CUDA toolkit needs none of it)."""
    lines = []
    for arg in _machine_args():
        name, value = arg[2:].split("=", 1)
        lines.append(f'set({name} "{value}" CACHE STRING "this machine\'s CUDA toolkit")')
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
@needs_cmake
def test_readme_cpp_example_against_pip_install(pip_site, tmp_path):
    """The README's app.cpp, CMakeLists.txt and command lines (pgext.cmake_prefix_path), run verbatim."""
    section = _readme_section("Using pgext from C++")
    (cpp,), (cmakelists,) = _code_blocks(section, "cpp"), _code_blocks(section, "cmake")
    commands = [b for b in _code_blocks(section, "bash") if "pgext.cmake_prefix_path" in b]
    assert len(commands) == 1, commands
    app = tmp_path / "app"
    app.mkdir()
    (app / "app.cpp").write_text(cpp)
    (app / "CMakeLists.txt").write_text(cmakelists)
    # `python` in the commands: this interpreter, with the pip install (not this checkout) on its path
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nPYTHONPATH="{pip_site}" exec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = {**_clean_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "CMAKE_BUILD_PARALLEL_LEVEL": _jobs(), "PYTHONNOUSERSITE": "1"}
    if _machine_args():
        env["CMAKE_TOOLCHAIN_FILE"] = str(_cuda_toolchain_file(tmp_path / "cuda-toolkit.cmake"))
    out = _run(["bash", "-euo", "pipefail", "-c", commands[0]], timeout=1800, cwd=app, env=env)
    cache = (app / "build" / "CMakeCache.txt").read_text()
    assert f"pgext_DIR:PATH={pip_site / 'pgext' / 'share' / 'cmake' / 'pgext'}" in cache
    assert _ldd(app / "build" / "app")["libpgext.so"] == str(pip_site / "pgext" / "lib" / "libpgext.so")
    got = {k: float(v) for k, v in re.findall(r"^(policy_loss|entropy_loss|grad_norm) (\S+)$", out, re.M)}
    assert set(got) == {"policy_loss", "entropy_loss", "grad_norm"}, out[-3000:]

    # The same inputs in Python (C++ and Python draw from the same CPU generator),
    # the numbers from the reference in float64.
    torch.manual_seed(0)
    logit = torch.randn(64, 18, requires_grad=True)
    action = torch.randint(0, 18, (64,))
    return_ = torch.randn(64)
    ref = pgext.reference.pg_error(pgext.pg_data(logit.double(), action, return_.double()))
    (ref.policy_loss - 0.01 * ref.entropy_loss).backward()
    assert got["policy_loss"] == pytest.approx(ref.policy_loss.item(), rel=1e-4, abs=1e-5)
    assert got["entropy_loss"] == pytest.approx(ref.entropy_loss.item(), rel=1e-4)
    assert got["grad_norm"] == pytest.approx(logit.grad.norm().item(), rel=1e-4)


# find_package(pgext <request>) in CMake script mode: sets what find_package sets
# for a version file, includes it and prints its answer.
_VERSION_REQUEST_CMAKE = r"""
function(request text)
  if(text MATCHES "^(.+)\\.\\.\\.(<?)(.+)$")
    set(PACKAGE_FIND_VERSION_RANGE "${text}")
    set(PACKAGE_FIND_VERSION_RANGE_MIN INCLUDE)
    if(CMAKE_MATCH_2)
      set(PACKAGE_FIND_VERSION_RANGE_MAX EXCLUDE)
    else()
      set(PACKAGE_FIND_VERSION_RANGE_MAX INCLUDE)
    endif()
    set(PACKAGE_FIND_VERSION_MIN "${CMAKE_MATCH_1}")
    set(PACKAGE_FIND_VERSION_MAX "${CMAKE_MATCH_3}")
    set(PACKAGE_FIND_VERSION "${CMAKE_MATCH_1}")
    foreach(end IN ITEMS MIN MAX)
      string(REPLACE "." ";" parts "${PACKAGE_FIND_VERSION_${end}};0;0")
      list(GET parts 0 PACKAGE_FIND_VERSION_${end}_MAJOR)
      list(GET parts 1 PACKAGE_FIND_VERSION_${end}_MINOR)
    endforeach()
  else()
    set(PACKAGE_FIND_VERSION "${text}")
  endif()
  if(NOT PACKAGE_FIND_VERSION STREQUAL "")
    string(REPLACE "." ";" parts "${PACKAGE_FIND_VERSION};0;0;0")
    list(GET parts 0 PACKAGE_FIND_VERSION_MAJOR)
    list(GET parts 1 PACKAGE_FIND_VERSION_MINOR)
    list(GET parts 2 PACKAGE_FIND_VERSION_PATCH)
  endif()
  include("${FILE}")
  message("[${text}] compatible=${PACKAGE_VERSION_COMPATIBLE} exact=${PACKAGE_VERSION_EXACT} unsuitable=${PACKAGE_VERSION_UNSUITABLE}")
endfunction()
"""


@pytest.mark.slow
@needs_cmake
def test_pip_and_cmake_packages_agree(pip_site, standalone_prefix):
    """The pip package's CMake config is the CMake build's (same template, same
    values), and its version file answers find_package's version requests as
    the CMake build's (write_basic_package_version_file, SameMinorVersion) does."""
    pip_dir = pip_site / "pgext" / "share" / "cmake" / "pgext"
    cmake_dir = standalone_prefix / "lib" / "cmake" / "pgext"
    pip_config, cmake_config = (_code_lines((d / "pgextConfig.cmake").read_text()) for d in (pip_dir, cmake_dir))
    assert pip_config == cmake_config
    assert (pip_site / "pgext" / "include" / "pgext" / "pgext.h").read_bytes() == \
        (standalone_prefix / "include" / "pgext" / "pgext.h").read_bytes()

    major, minor, patch = (pgext.__version__.split(".") + ["0", "0"])[:3]
    this, nxt, after = f"{major}.{minor}", f"{major}.{int(minor) + 1}", f"{major}.{int(minor) + 2}"
    requests = ["", major, this, pgext.__version__, f"{this}.{int(patch) + 1}", f"{int(major) + 1}.0", nxt,
                f"{this}...{nxt}", f"{this}...<{nxt}", f"{this}...<{after}", f"{this}.0...{pgext.__version__}",
                f"{major}.0...{this}", f"{this}...{this}.99"]
    script = BUILD / "pgext-version-requests.cmake"
    script.write_text(_VERSION_REQUEST_CMAKE + "".join(f'request("{r}")\n' for r in requests))
    answers = {name: _run([CMAKE, f"-DFILE={d / 'pgextConfigVersion.cmake'}", "-P", script])
               for name, d in (("pip", pip_dir), ("cmake", cmake_dir))}
    assert answers["pip"] == answers["cmake"], answers
    assert f"[{this}] compatible=TRUE" in answers["pip"]
    assert f"[{pgext.__version__}] compatible=TRUE exact=TRUE" in answers["pip"]
    assert f"[{nxt}] compatible=FALSE" in answers["pip"]


@pytest.mark.slow
@needs_cmake
@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
def test_cmake_and_pip_builds_keep_avx_out_of_portable_code(pip_site, standalone_prefix):
    """Both builds link the portable objects first (see test_dispatch.py's
    test_portable_code_never_reaches_avx_instructions for the in-place one)."""
    for library in (pip_site / "pgext" / "lib" / "libpgext.so", next((standalone_prefix / "lib").glob("libpgext.so.*"))):
        assert portable_code_reaching_avx(library) == [], library


@pytest.mark.slow
@needs_cmake
def test_cmake_package_and_cpp_tests(standalone_prefix, scripted_module):
    prefix = standalone_prefix
    cmake_dir = prefix / "lib" / "cmake" / "pgext"
    assert (prefix / "include" / "pgext" / "pgext.h").is_file()
    _check_cmake_package(cmake_dir, prefix)
    assert list((prefix / "lib").glob("libpgext.so*")), "libpgext.so not installed"
    libs = subprocess.run(["ldd", str(next((prefix / "lib").glob("libpgext.so.*")))], capture_output=True,
                          text=True).stdout
    assert "libpython" not in libs and "torch_python" not in libs, libs
    # -fopenmp reaches the CMake build too: at::parallel_for is serial without it
    assert "GOMP_parallel" in undefined_symbols(next((prefix / "lib").glob("libpgext.so.*")))

    build = _build_cpp_tests("standalone", prefix, scripted_module)
    linked = [v for k, v in _ldd(build / "pgext_cpp_tests").items() if k.startswith("libpgext.so")]
    assert len(linked) == 1 and linked[0].startswith(f"{prefix / 'lib'}/"), linked
    out = _run(["ctest", "--test-dir", build, "--output-on-failure"], timeout=600)
    assert "100% tests passed, 0 tests failed out of 9" in out, out[-3000:]


@pytest.mark.slow
@needs_cmake
def test_cpp_tests_under_address_and_undefined_sanitizers(scripted_module):
    """libpgext (CPU kernels) and the C++ tests built with -fsanitize=address,undefined: zero reports."""
    flags = "-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
    # -O1 -g1 (line tables: reports still name file and line) compiles in half
    # the time of -O2 -g; ASan's documentation asks for -O1 or higher.
    san = [f"-DCMAKE_CXX_FLAGS={flags}", f"-DCMAKE_SHARED_LINKER_FLAGS={flags}",
           f"-DCMAKE_EXE_LINKER_FLAGS={flags}", "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
           "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g1 -DNDEBUG"]
    prefix = _install_libpgext("asan", [*san, "-DPGEXT_WITH_CUDA=OFF"])
    build = _build_cpp_tests("asan", prefix, scripted_module, san)
    # libtorch keeps its static registries alive until exit: leak checking would
    # only report those, so it is off; every other ASan and UBSan check is on.
    env = dict(ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    exe = build / "pgext_cpp_tests"
    for group in ("values", "grads", "errors", "broadcast", "log_prob_entropy", "losses", "linear", "info"):
        out = _run([exe, group], timeout=600, **env)
        assert "AddressSanitizer" not in out and "runtime error" not in out, out[-4000:]
        assert re.search(r"^\d+ passed, 0 failed$", out, re.M), out[-2000:]
    out = _run([exe, "script", scripted_module], timeout=600, **env)
    assert re.search(r"^\d+ passed, 0 failed$", out, re.M), out[-2000:]
