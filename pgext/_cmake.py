"""CMake integration of pgext.

``cmake_prefix_path`` (also ``pgext.cmake_prefix_path``) is the directory to
put on CMAKE_PREFIX_PATH so that ``find_package(pgext CONFIG REQUIRED)`` finds
the libpgext that this Python package ships (``pgext/lib/libpgext.so``,
``pgext/include/pgext/*.h``, ``pgext/share/cmake/pgext/*.cmake``, installed by
setup.py), like ``torch.utils.cmake_prefix_path`` for torch::

    cmake -DCMAKE_PREFIX_PATH="$(python -c 'import pgext, torch; print(pgext.cmake_prefix_path + ";" + torch.utils.cmake_prefix_path)')" ...

``torch_cmake_args()`` gives the ``-D`` arguments with which
``find_package(Torch)`` works on a machine whose CUDA toolkit is incomplete
(no NVRTC, an ``nvcc`` wrapper on PATH); the C++ tests (tests/test_cpp.py)
use it. A C++ user with a full CUDA toolkit needs none of those arguments.

Nothing here imports torch (``import pgext`` must stay cheap).
"""
from __future__ import annotations

import glob
import importlib.util
import os
from pathlib import Path
from typing import List, Optional

try:
    from . import _build_config as _config
except ImportError:  # loaded by path (setup.py, tests): no parent package
    _spec = importlib.util.spec_from_file_location(
        "_pgext_build_config", Path(__file__).resolve().with_name("_build_config.py")
    )
    _config = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_config)

PACKAGE_DIR = Path(__file__).resolve().parent

#: Prefix for CMake's CMAKE_PREFIX_PATH: find_package(pgext) finds
#: ``<this>/pgext/pgextConfig.cmake`` (``pgext/share/cmake/pgext``).
cmake_prefix_path: str = str((PACKAGE_DIR / _config.PACKAGE_CMAKE_DIR).parent)

#: The packaged library, ``pgext/lib/libpgext.so`` (what pgext._C links).
library_path: str = str(PACKAGE_DIR / _config.PACKAGE_LIB_DIR / _config.LIBRARY_FILE)


def torch_dir() -> str:
    """torch's CMake package directory (``.../torch/share/cmake/Torch``), found without importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("torch is not installed in this Python environment")
    root = Path(next(iter(spec.submodule_search_locations)))
    return str(root / "share" / "cmake" / "Torch")


def _site_dirs() -> List[Path]:
    """Directories that may hold NVIDIA's pip packages (``nvidia/...``)."""
    dirs = []
    spec = importlib.util.find_spec("torch")
    if spec is not None and spec.submodule_search_locations:
        dirs.append(Path(next(iter(spec.submodule_search_locations))).parent)
    import site
    import sys

    for d in [*site.getsitepackages(), site.getusersitepackages(), *sys.path]:
        if d and Path(d).is_dir() and Path(d) not in dirs:
            dirs.append(Path(d))
    return dirs


def nvrtc_library(cuda_home: str) -> Optional[str]:
    """``libnvrtc.so`` for torch's CMake config when the toolkit lacks it.

    None when the toolkit has NVRTC (CMake finds it there). Otherwise the
    NVRTC of the ``nvidia`` pip packages that torch installed
    (``nvidia/cu13/lib/libnvrtc.so.13`` or ``nvidia/cuda_nvrtc/lib``).
    """
    home = Path(cuda_home)
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
        if glob.glob(str(home / sub / "libnvrtc.so*")):
            return None
    for site_dir in _site_dirs():
        candidates = sorted(glob.glob(str(site_dir / "nvidia" / "*" / "lib" / "libnvrtc.so.*")))
        candidates = [c for c in candidates if ".alt." not in c and "builtins" not in c]
        if candidates:
            return candidates[-1]
    return None


def torch_cmake_args(cuda_home: Optional[str] = None) -> List[str]:
    """``-D`` arguments for ``find_package(Torch)`` on this machine.

    ``Torch_DIR`` (torch of this Python), and for a CUDA build of torch the
    toolkit root (followed through an ``nvcc`` wrapper, see
    ``_build_config.find_cuda_home``) and, when the toolkit has no NVRTC,
    ``CUDA_nvrtc_LIBRARY``. ``cuda_home`` defaults to the toolkit found.
    """
    args = [f"-DTorch_DIR={torch_dir()}"]
    home = cuda_home or _config.find_cuda_home()
    if home is not None and Path(home, "bin", "nvcc").exists():
        args.append(f"-DCUDAToolkit_ROOT={home}")
        # torch's config also runs the old FindCUDA, which would otherwise
        # take the root from the nvcc on PATH (a wrapper's directory).
        args.append(f"-DCUDA_TOOLKIT_ROOT_DIR={home}")
        args.append(f"-DCMAKE_CUDA_COMPILER={Path(home, 'bin', 'nvcc')}")
        nvrtc = nvrtc_library(home)
        if nvrtc is not None:
            args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc}")
    return args


def build_jobs() -> int:
    """Parallel compile jobs: MAX_JOBS as for torch's extensions, else the CPU count."""
    try:
        return max(1, int(os.environ["MAX_JOBS"]))
    except (KeyError, ValueError):
        return os.cpu_count() or 1
