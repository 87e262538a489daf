"""Development builds: compile this checkout's sources with ninja at import.

``pgext.jit.load()`` builds (or reuses) the two binaries of the installed
package with ``torch.utils.cpp_extension.load``, in the same shape: a plain
shared library with the ops and kernels (``pgext_jit_lib.so``, not linked to
libtorch_python) and the pybind11 build-information module
(``pgext_jit_C``) that links it. ``PGEXT_JIT=1 python -c "import pgext"``
makes ``import pgext`` use them instead of the installed build. CUDA sources
are compiled too when a CUDA toolkit is found (see
``_build_config.want_cuda``). The build directory defaults to torch's
extension cache; PGEXT_JIT_BUILD_DIR overrides it (the library is built in
its ``lib`` subdirectory, the module in ``module``).
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Optional

from . import _build_config as config

_module: Optional[ModuleType] = None


def load(verbose: bool = False, build_directory: Optional[str] = None) -> ModuleType:
    """Compiles (incrementally) and loads the extension from the sources."""
    global _module
    if _module is not None:
        return _module
    if not config.CSRC.is_dir():
        raise RuntimeError(
            f"pgext.jit needs the C++ sources next to the package ({config.CSRC}); "
            "it is meant for a source checkout"
        )
    cuda_home = config.want_cuda()
    if cuda_home is not None:
        config.configure_cuda_env(cuda_home)
    from torch.utils import cpp_extension

    if cuda_home is not None:
        # torch may have imported cpp_extension (and guessed CUDA_HOME) already.
        cpp_extension.CUDA_HOME = cuda_home
    build_directory = build_directory or os.environ.get("PGEXT_JIT_BUILD_DIR")

    def subdir(name: str) -> Optional[str]:
        if not build_directory:
            return None  # torch's cache: a directory per extension name
        path = os.path.join(build_directory, name)
        os.makedirs(path, exist_ok=True)
        return path

    with_cuda = cuda_home is not None
    define = [f"-DPGEXT_WITH_CUDA={int(with_cuda)}"]
    # The ops and kernels. load() links every build to libtorch_python;
    # --as-needed drops it, as nothing here uses it. Loaded (once) here, so
    # that its op registrations run before the module below is imported.
    library = cpp_extension.load(
        name="pgext_jit_lib",
        sources=config.isa_specific_last(config.cpu_sources() + (config.cuda_sources() if with_cuda else [])),
        extra_cflags=config.CXX_FLAGS + define + ["-DPGEXT_BUILDING_LIBRARY"],
        extra_cuda_cflags=config.NVCC_FLAGS + define + ["-DPGEXT_BUILDING_LIBRARY"],
        extra_ldflags=["-Wl,--as-needed", *config.LINK_FLAGS],
        extra_include_paths=[str(config.CSRC)],
        build_directory=subdir("lib"),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=verbose,
    )
    library_dir, library_file = os.path.split(library)
    # The build-information module, linked to that library by its path.
    _module = cpp_extension.load(
        name="pgext_jit_C",
        sources=config.module_sources(),
        extra_cflags=config.CXX_FLAGS,
        extra_ldflags=[f"-L{library_dir}", f"-l:{library_file}", f"-Wl,-rpath,{library_dir}"],
        extra_include_paths=[str(config.PUBLIC_INCLUDE)],
        build_directory=subdir("module"),
        with_cuda=False,
        verbose=verbose,
    )
    return _module
