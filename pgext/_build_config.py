"""What pgext is built from: shared by setup.py, the JIT loader and CMake.

Two binaries, in every build:

- ``libpgext``: the dispatcher ops, their CPU (and CUDA) kernels, autograd and
  the C++ API (``csrc/include/pgext/pgext.h``). A plain shared library with no
  Python in it: ``cpu_sources()`` and ``cuda_sources()``.
- ``pgext._C``: the pybind11 build-information module
  (``module_sources()``), linked to libpgext.

The package layout below is where setup.py puts libpgext, its headers and its
CMake package inside the installed ``pgext`` directory.

This module imports nothing from torch, so setup.py can load it before torch's
build helpers read CUDA_HOME.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
#: The public headers: ``csrc/include/pgext/*.h`` is ``<pgext/*.h>``.
PUBLIC_INCLUDE = CSRC / "include"
PYTHON_MODULE_SOURCE = CSRC / "python" / "module.cpp"
#: The CUDA kernels (the row kernels' CUDA backend).
CUDA_DIR = CSRC / "core" / "cuda"

# Inside the installed package (paths relative to the ``pgext`` directory):
#   lib/libpgext.so                  the library (SONAME libpgext.so)
#   include/pgext/*.h                its public headers
#   share/cmake/pgext/*.cmake        its CMake package (find_package(pgext))
#   _C.<abi>.so                      links lib/libpgext.so (RUNPATH $ORIGIN/lib)
PACKAGE_LIB_DIR = "lib"
PACKAGE_INCLUDE_DIR = "include"
PACKAGE_CMAKE_DIR = "share/cmake/pgext"
LIBRARY_NAME = "pgext"  # -lpgext
LIBRARY_FILE = "libpgext.so"
#: RUNPATH of pgext._C: the libpgext next to it.
MODULE_RPATH = "$ORIGIN/" + PACKAGE_LIB_DIR
#: RUNPATH of the packaged libpgext: torch's libraries in the same
#: site-packages (pgext/lib -> torch/lib); see library_rpath().
LIBRARY_RPATH = "$ORIGIN/../../torch/lib"

# -Wno-psabi: GCC notes that passing at::vec's 32/64-byte vectors by value
# changed ABI in GCC 4.6; every caller is compiled with this compiler.
# -Wno-unknown-pragmas: at::vec's headers say `#pragma unroll`, which GCC
# does not know.
# -fopenmp: at::parallel_for is a header template that parallelizes with
# `#pragma omp parallel` (ATen's OpenMP backend); without the flag every
# kernel silently runs on one thread. The libgomp.so.1 it links is the one
# torch already loaded (same soname), so there is one OpenMP runtime.
# -DAT_PER_OPERATOR_HEADERS: ATen's own headers (TensorOperators.h,
# ExpandUtils.h) then include the few ATen/ops/*.h they use instead of all of
# ATen's ~2,700; the files that define TORCH_ASSERT_ONLY_METHOD_OPERATORS
# (and so cannot include all of them) compile about a quarter faster.
# <ATen/ATen.h> still includes everything.
CXX_FLAGS = ["-O3", "-std=c++20", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi", "-fopenmp", "-DAT_PER_OPERATOR_HEADERS"]
LINK_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
# sm_80 (A100) and sm_90 (H100) plus PTX so newer GPUs JIT-compile the kernels.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def version() -> str:
    text = (CSRC / "core" / "version.h").read_text()
    return re.search(r'#define PGEXT_VERSION "([^"]+)"', text).group(1)


def _isa_specific(path: Path) -> bool:
    """A kernel source or object built for AVX2 / AVX-512 (kernel_avx2.cpp, kernel_avx2.o)."""
    return path.stem.startswith("kernel_") and path.stem != "kernel_default"


def isa_specific_last(paths: List[str]) -> List[str]:
    """paths in their order, the AVX2 / AVX-512 kernel files moved to the end.

    An inline function that several objects instantiate (a c10 or std template,
    say) is linked once, from the first object that has it. That copy must be
    a portable one, not one compiled for AVX2, which the portable kernels
    would call. Among themselves they stay in name order (avx2, avx512,
    avx512_bf16), so the copy kept never needs more than its callers' build.
    setup.py links its objects in this order: setuptools sorts the sources,
    which puts kernel_avx2 before kernel_default.
    """
    return sorted(paths, key=lambda p: _isa_specific(Path(p)))


def cpu_sources() -> List[str]:
    """The C++ sources of libpgext (every one but the pybind11 module), the
    AVX2 / AVX-512 kernel files last (see isa_specific_last)."""
    files = [f for f in sorted(CSRC.rglob("*.cpp"))
             if f.parent != PYTHON_MODULE_SOURCE.parent and not f.is_relative_to(CUDA_DIR)]
    _check_unique_stems(files + [Path(f) for f in _cuda_files()])
    return isa_specific_last([str(f) for f in files])


def _check_unique_stems(files: List[Path]) -> None:
    # torch.utils.cpp_extension.load (the JIT build) names each object after
    # its source's file name alone, so two sources of one name in different
    # folders would collide there: every source gets a name of its own.
    seen = {}
    for f in files:
        if f.stem in seen:
            raise RuntimeError(f"pgext sources {seen[f.stem]} and {f} share the name {f.stem!r}: "
                               "the JIT build names objects by file name only; rename one")
        seen[f.stem] = f


def module_sources() -> List[str]:
    """The sources of the pybind11 module pgext._C (it links libpgext)."""
    return [str(PYTHON_MODULE_SOURCE)]


def public_headers() -> List[str]:
    """``csrc/include/pgext/*.h``: installed as ``<pgext/*.h>``."""
    return [str(f) for f in sorted((PUBLIC_INCLUDE / "pgext").glob("*.h"))]


def headers() -> List[str]:
    """Every header of the sources (build dependencies)."""
    return [str(f) for f in sorted(CSRC.rglob("*")) if f.suffix in (".h", ".cuh")]


def _cuda_files() -> List[Path]:
    return sorted(CUDA_DIR.glob("*.cu")) + sorted(CUDA_DIR.glob("*.cpp"))


def cuda_sources() -> List[str]:
    return [str(f) for f in _cuda_files()]


def library_rpath(with_cuda: bool) -> str:
    """RUNPATH of the packaged libpgext (``site-packages/pgext/lib``).

    torch's libraries next to the package (``LIBRARY_RPATH``) and, for a CUDA
    build, the directory of the CUDA runtime that torch's pip dependencies
    install (``site-packages/nvidia/cu13/lib``), where there is one, the way
    torch's own libraries find it: a C++ program that loads libpgext before
    anything has loaded libcudart must find it without a CUDA toolkit. Both
    relative to libpgext first, then by absolute path.
    """
    torch_lib = torch_library_dir()
    if torch_lib is None:
        return LIBRARY_RPATH
    site = torch_lib.parent.parent
    dirs = [torch_lib]
    if with_cuda:
        dirs += sorted({lib.parent for lib in site.glob("nvidia/*/lib/libcudart.so*")})
    relative = ["$ORIGIN/../../" + d.relative_to(site).as_posix() for d in dirs]
    # Then the same directories by absolute path, for a libpgext that is not
    # next to torch (an in-place build, a `pip install --user` over a system
    # torch): a C++ program does not link libc10_cuda itself (--as-needed),
    # so only libpgext's RUNPATH can find it there.
    return ":".join(relative + [str(d.resolve()) for d in dirs])


def find_cuda_home() -> Optional[str]:
    """The CUDA toolkit root, or None when there is no toolkit.

    CUDA_HOME / CUDA_PATH win. Otherwise the nvcc on PATH is followed; when it
    is a small wrapper script (`exec /real/bin/nvcc "$@"`), the root it names
    is used, since torch's own guess from such a wrapper is wrong.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return home
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        default = Path("/usr/local/cuda")
        return str(default) if (default / "bin" / "nvcc").exists() else None
    nvcc_path = Path(nvcc).resolve()
    try:
        head = nvcc_path.read_bytes()[:4096]
    except OSError:
        head = b""
    if head.startswith(b"#!"):
        match = re.search(rb"(/\S+)/bin/nvcc\b", head)
        if match and (Path(match.group(1).decode()) / "bin" / "nvcc").exists():
            return match.group(1).decode()
    return str(nvcc_path.parent.parent)


def debug_info_wanted() -> bool:
    """PGEXT_DEBUG_INFO=1: setup.py compiles with -g (else -g0, over Python's -g)."""
    return os.environ.get("PGEXT_DEBUG_INFO", "0") == "1"


def want_cuda() -> Optional[str]:
    """The toolkit root to build the CUDA kernels with, or None for CPU only.

    PGEXT_CPU_ONLY=1 forces a CPU-only build; FORCE_CUDA=1 makes a missing
    toolkit an error instead of a silent CPU-only build. A GPU is not needed.
    """
    if os.environ.get("PGEXT_CPU_ONLY", "0") == "1":
        return None
    home = find_cuda_home()
    force = os.environ.get("FORCE_CUDA", "0") == "1"
    if home is None or not cuda_sources():
        if force:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit (nvcc) or no CUDA sources were found")
        return None
    torch_lib = torch_library_dir()
    if torch_lib is not None and not (torch_lib / "libc10_cuda.so").exists():
        # a CPU-only torch has no CUDA libraries to link the kernels against
        if force:
            raise RuntimeError(f"FORCE_CUDA=1 but the torch in {torch_lib.parent} was built without CUDA")
        return None
    return home


def torch_library_dir() -> Optional[Path]:
    """torch's lib directory, found without importing torch (setup.py must
    configure CUDA_HOME before torch's build helpers are imported)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def configure_cuda_env(home: str) -> None:
    """Points torch's build helpers at the toolkit; call before importing them."""
    os.environ["CUDA_HOME"] = home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
