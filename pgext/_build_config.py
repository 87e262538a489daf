"""What pgext's extension is built from: shared by setup.py and the JIT loader.

This module imports nothing from torch, so setup.py can load it before torch's
build helpers read CUDA_HOME.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

# -Wno-psabi: GCC notes that passing at::vec's 32/64-byte vectors by value
# changed ABI in GCC 4.6; every caller is compiled with this compiler.
# -Wno-unknown-pragmas: at::vec's headers say `#pragma unroll`, which GCC
# does not know.
# -fopenmp: at::parallel_for is a header template that parallelizes with
# `#pragma omp parallel` (ATen's OpenMP backend); without the flag every
# kernel silently runs on one thread. The libgomp.so.1 it links is the one
# torch already loaded (same soname), so there is one OpenMP runtime.
CXX_FLAGS = ["-O3", "-std=c++20", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
# sm_80 (A100) and sm_90 (H100) plus PTX so newer GPUs JIT-compile the kernels.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def version() -> str:
    text = (CSRC / "pg_version.h").read_text()
    return re.search(r'#define PGEXT_VERSION "([^"]+)"', text).group(1)


def _isa_specific(path: Path) -> bool:
    return path.name.startswith("kernel_") and path.name != "kernel_default.cpp"


def cpu_sources() -> List[str]:
    """Every C++ source of the extension, the pybind11 module included.

    The AVX2 / AVX-512 kernel files come last: an inline function that several
    files instantiate is linked once, from the first object that has it, and
    that copy must be the portable one, not one compiled for AVX-512.
    """
    files = sorted(CSRC.glob("*.cpp")) + sorted((CSRC / "cpu").glob("*.cpp"), key=lambda f: (_isa_specific(f), f.name))
    return [str(f) for f in files]


def cuda_sources() -> List[str]:
    return [str(f) for f in sorted((CSRC / "cuda").glob("*.cu"))] + [
        str(f) for f in sorted((CSRC / "cuda").glob("*.cpp"))
    ]


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
    return home


def configure_cuda_env(home: str) -> None:
    """Points torch's build helpers at the toolkit; call before importing them."""
    os.environ["CUDA_HOME"] = home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
