"""Builds pgext: the dispatcher ops (CPU, and CUDA when a toolkit is found)
and the pgext._C build-information module, in one extension."""
import importlib.util
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_pgext_build_config", ROOT / "pgext" / "_build_config.py")
config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(config)

# torch reads CUDA_HOME when its build helpers are imported: settle it first.
CUDA_HOME = config.want_cuda()
if CUDA_HOME is not None:
    config.configure_cuda_env(CUDA_HOME)

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def relative(paths):
    return [os.path.relpath(p, ROOT) for p in paths]


def extension():
    common = dict(
        name="pgext._C",
        include_dirs=[str(config.CSRC)],
        define_macros=[("PGEXT_WITH_CUDA", "1" if CUDA_HOME else "0")],
    )
    if CUDA_HOME is None:
        return CppExtension(
            sources=relative(config.cpu_sources()),
            extra_compile_args={"cxx": config.CXX_FLAGS},
            extra_link_args=config.LINK_FLAGS,
            **common,
        )
    return CUDAExtension(
        sources=relative(config.cpu_sources() + config.cuda_sources()),
        extra_compile_args={"cxx": config.CXX_FLAGS, "nvcc": config.NVCC_FLAGS},
        extra_link_args=config.LINK_FLAGS,
        **common,
    )


setup(
    version=config.version(),
    packages=find_packages(include=["pgext", "pgext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
