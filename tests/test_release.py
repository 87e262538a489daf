"""The release artifacts as a user gets them: the sdist and the CPU-only wheel built from it.

.ci/dist.py (what `make dist` runs, here for the CPU-only variant only)
builds the sdist, builds the wheel from that sdist, strips it and repairs it
with auditwheel into build/test-dist/. The tests check the artifacts, then
install the wheel into a new virtual environment (torch from the package
index) and run tests/installed/smoke_installed.py there, from a directory
outside the checkout: import, values and gradients against the reference,
pgext.distributed on Gloo, and the C++ consumer project through the installed
pgext.cmake_prefix_path. The versions of csrc/core/version.h, the sdist, the
wheel and the installed package (Python, CMake) must agree.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile

import pytest
import torch

from conftest import ROOT, elf_dynamic, elf_sections

pytestmark = pytest.mark.slow
OUT = ROOT / "build" / "test-dist"
VERSION = re.search(r'#define PGEXT_VERSION "([^"]+)"', (ROOT / "csrc" / "core" / "version.h").read_text()).group(1)
TORCH_MM = re.match(r"\d+\.\d+", torch.__version__).group(0)
# the torch this checkout builds and tests with (the Makefile's TORCH_SPEC)
TORCH_SPEC = "torch==" + torch.__version__.split("+")[0]


def _run(cmd, timeout=3600, **kw):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{out[-8000:]}"
    return out


def _env():
    # nothing of this checkout's Python set-up leaks into the tools or the new environment
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PGEXT_JIT", "LD_LIBRARY_PATH")}


@pytest.fixture(scope="module")
def artifacts():
    """.ci/dist.py --variants cpu: {'sdist', 'wheel', 'debug'}; the seconds it took in 'seconds'."""
    start = time.monotonic()
    _run([sys.executable, ROOT / ".ci" / "dist.py", "--variants", "cpu", "--out", OUT], env=_env(), cwd=ROOT)
    (sdist,) = OUT.glob("pgext-*.tar.gz")
    (wheel,) = (OUT / "cpu").glob("pgext-*.whl")
    (debug,) = (OUT / "cpu").glob("pgext-*.debug.tar.gz")
    return {"sdist": sdist, "wheel": wheel, "debug": debug, "seconds": time.monotonic() - start}


def _git_files(*paths):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = _run(["git", "ls-files", "--", *paths], cwd=ROOT)
    return {line for line in out.splitlines() if line}


def test_sdist_has_every_source_and_no_build_output(artifacts):
    prefix = f"pgext-{VERSION}/"
    with tarfile.open(artifacts["sdist"]) as tar:
        names = {n[len(prefix):] for n in tar.getnames() if n.startswith(prefix)}
        pkg_info = tar.extractfile(prefix + "PKG-INFO").read().decode()
    wanted = _git_files("csrc", "cmake", "tests", "docs", "examples", "benchmarks", "requirements", "Makefile",
                        "CMakeLists.txt", "setup.py", "pyproject.toml", "MANIFEST.in", "LICENSE", "README.md", "pgext")
    assert not wanted - names, f"missing from the sdist: {sorted(wanted - names)}"
    outputs = [n for n in names if re.search(r"\.(so|o|pyc)$|\.so\.|(^|/)build/|^pgext/(lib|include|share)/", n)]
    assert not outputs, outputs
    assert re.search(rf"^Version: {re.escape(VERSION)}$", pkg_info, re.M), pkg_info[:500]


def _wheel_metadata(wheel):
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(f"pgext-{VERSION}.dist-info/METADATA").decode(), zf.read(
            f"pgext-{VERSION}.dist-info/WHEEL").decode(), zf.namelist()


def test_wheel_is_manylinux_pins_torch_and_grafts_nothing(artifacts):
    wheel = artifacts["wheel"]
    assert re.fullmatch(rf"pgext-{re.escape(VERSION)}-cp3\d+-cp3\d+-manylinux_2_\d+_x86_64\.whl", wheel.name), wheel
    metadata, wheel_info, names = _wheel_metadata(wheel)
    assert re.search(rf"^Version: {re.escape(VERSION)}$", metadata, re.M)
    assert re.findall(r"^Requires-Dist: torch.*$", metadata, re.M) == [f"Requires-Dist: torch=={TORCH_MM}.*"]
    assert re.search(r"^Tag: cp3\d+-cp3\d+-manylinux_2_\d+_x86_64$", wheel_info, re.M), wheel_info
    for f in ("pgext/lib/libpgext.so", "pgext/include/pgext/pgext.h", "pgext/share/cmake/pgext/pgextConfig.cmake"):
        assert f in names, f
    # torch's libraries and its OpenMP runtime are shared with the installed torch, never copied
    assert not [n for n in names if n.startswith("pgext.libs/") or re.search(r"lib(torch|c10|gomp)", n)], names


def _build_id(path):
    return re.search(r"Build ID: ([0-9a-f]+)", _run(["readelf", "-n", path])).group(1)


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf (binutils) is not installed")
def test_wheel_binaries_are_stripped_and_their_debug_information_archived(artifacts, tmp_path):
    with zipfile.ZipFile(artifacts["wheel"]) as zf:
        binaries = [n for n in zf.namelist() if n.endswith(".so")]
        zf.extractall(tmp_path / "wheel", binaries)
    with tarfile.open(artifacts["debug"]) as tar:
        tar.extractall(tmp_path / "debug", filter="data")
    assert len(binaries) == 2, binaries  # libpgext and pgext._C
    for name in binaries:
        binary, debug = tmp_path / "wheel" / name, tmp_path / "debug" / (name + ".debug")
        sections = elf_sections(binary)
        assert not [s for s in sections if s.startswith(".debug_")], f"{name} keeps {sorted(sections)}"
        assert ".gnu_debuglink" in sections and ".symtab" in sections, sections
        assert debug.is_file(), f"no debug information for {name}"
        assert ".debug_info" in elf_sections(debug)
        assert _build_id(debug) == _build_id(binary), name
        # the build machine's paths are gone; torch is found next to pgext in site-packages
        dynamic = elf_dynamic(binary)
        runpath = dynamic.get("RUNPATH", []) + dynamic.get("RPATH", [])
        assert runpath and all(p.startswith("$ORIGIN") for p in runpath[0].split(":")), runpath


@pytest.fixture(scope="module")
def smoke_python(artifacts):
    """A new virtual environment with the wheel and torch from the package index installed."""
    venv = OUT / "venv"
    shutil.rmtree(venv, ignore_errors=True)
    _run([sys.executable, "-m", "venv", venv], env=_env())
    python = venv / "bin" / "python"
    # --no-compile: compiling all of torch's modules to bytecode costs more than the suite saves
    _run([python, "-m", "pip", "install", "--quiet", "--no-compile", artifacts["wheel"], TORCH_SPEC, "pytest"],
         env=_env())
    yield python
    shutil.rmtree(venv, ignore_errors=True)  # torch and its CUDA libraries: 5 GB of disk


def test_installed_wheel_smoke_suite(smoke_python, tmp_path):
    suite = tmp_path / "smoke"
    shutil.copytree(ROOT / "tests" / "installed", suite)
    shutil.copytree(ROOT / "tests" / "cpp", suite / "cpp")
    env = {**_env(), "PGEXT_SMOKE_VERSION": VERSION, "PGEXT_SMOKE_CUDA": "0", "PGEXT_SMOKE_CHECKOUT": str(ROOT),
           "PYTHONNOUSERSITE": "1"}
    proc = subprocess.run([smoke_python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "smoke_installed.py"],
                          cwd=suite, env=env, capture_output=True, text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    assert re.search(r"\b\d+ passed\b", out), out[-3000:]
    if shutil.which("cmake") is not None:
        assert "skipped" not in out, out[-3000:]  # the C++ consumer was built and run
