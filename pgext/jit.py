"""Development builds: compile this checkout's sources with ninja at import.

``pgext.jit.load()`` builds (or reuses) the extension with
``torch.utils.cpp_extension.load``; ``PGEXT_JIT=1 python -c "import pgext"``
makes ``import pgext`` use it instead of the installed build. CUDA sources are
compiled too when a CUDA toolkit is found (see ``_build_config.want_cuda``).
The build directory defaults to torch's extension cache; PGEXT_JIT_BUILD_DIR
overrides it.
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
    sources = config.cpu_sources() + (config.cuda_sources() if cuda_home else [])
    build_directory = build_directory or os.environ.get("PGEXT_JIT_BUILD_DIR")
    if build_directory:
        os.makedirs(build_directory, exist_ok=True)
    with_cuda = cuda_home is not None
    _module = cpp_extension.load(
        name="pgext_jit_C",
        sources=sources,
        extra_cflags=config.CXX_FLAGS + [f"-DPGEXT_WITH_CUDA={int(with_cuda)}"],
        extra_cuda_cflags=config.NVCC_FLAGS + [f"-DPGEXT_WITH_CUDA={int(with_cuda)}"],
        extra_ldflags=config.LINK_FLAGS,
        extra_include_paths=[str(config.CSRC)],
        build_directory=build_directory,
        with_cuda=with_cuda,
        verbose=verbose,
    )
    return _module
