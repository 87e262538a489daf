"""Builds pgext: libpgext and the pybind11 module pgext._C that links it.

- ``pgext/lib/libpgext.so``: the dispatcher ops with their CPU kernels (and
  CUDA kernels when a toolkit is found), autograd and the C++ API. A plain
  shared library (no Python, no libtorch_python), built with torch's extension
  helpers (BuildExtension, ninja) like an extension, but named and linked as a
  library: SONAME libpgext.so, RUNPATH torch's lib directory next to it
  (and torch's CUDA runtime, see _build_config.library_rpath).
- ``pgext/_C.<abi>.so``: build information (pybind11). It links libpgext
  (RUNPATH $ORIGIN/lib), so Python and C++ programs load the same library and
  its op registrations run once.
- ``pgext/include/pgext/*.h`` and ``pgext/share/cmake/pgext/*.cmake``: the
  public headers and the CMake package of that library, so that
  ``find_package(pgext)`` works with ``pgext.cmake_prefix_path`` on
  CMAKE_PREFIX_PATH (the templates are in cmake/).

The same sources, flags and layout come from pgext/_build_config.py, which the
JIT loader and CMakeLists.txt use too. `setup.py build_ext --inplace` (make
build) and `pip install --no-build-isolation .` both build in build/, so a pip
install after an in-place build compiles nothing again.
"""
import importlib.util
import os
import re
import shutil
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

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

# An Extension only in name: build_ext below gives it the file name
# pgext/lib/libpgext.so. It has no PyInit_ function and is never imported.
LIBRARY = "pgext.lib.libpgext"
MODULE = "pgext._C"
VERSION = config.version()
# Python's CFLAGS usually carry -g: with it libpgext holds about 50 MB of DWARF
# and each file takes 1.7-1.9x as long to compile. PGEXT_DEBUG_INFO=1 asks for
# it; the release wheels do (.ci/dist.py), then move it into their debug archive.
CXX_FLAGS = config.CXX_FLAGS + (["-g"] if config.debug_info_wanted() else ["-g0"])


def relative(paths):
    return [os.path.relpath(p, ROOT) for p in paths]


def library():
    common = dict(
        name=LIBRARY,
        include_dirs=[str(config.CSRC)],
        define_macros=[("PGEXT_WITH_CUDA", "1" if CUDA_HOME else "0"), ("PGEXT_BUILDING_LIBRARY", None)],
        depends=relative(config.headers()),
        extra_link_args=[
            f"-Wl,-soname,{config.LIBRARY_FILE}",
            f"-Wl,-rpath,{config.library_rpath(CUDA_HOME is not None)}",
            # every symbol resolved by the libraries named here: none from Python
            "-Wl,--no-undefined",
            *config.LINK_FLAGS,
        ],
    )
    if CUDA_HOME is None:
        ext = CppExtension(
            sources=relative(config.cpu_sources()),
            extra_compile_args={"cxx": CXX_FLAGS},
            **common,
        )
    else:
        ext = CUDAExtension(
            sources=relative(config.cpu_sources() + config.cuda_sources()),
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": config.NVCC_FLAGS},
            **common,
        )
    # torch's helpers link every extension to libtorch_python; libpgext uses
    # nothing from it and must load in programs without Python.
    ext.libraries = [lib for lib in ext.libraries if lib != "torch_python"]
    return ext


def module():
    # library_dirs gets libpgext's build directory in build_ext.build_extension.
    return CppExtension(
        name=MODULE,
        sources=relative(config.module_sources()),
        include_dirs=[str(config.PUBLIC_INCLUDE)],
        depends=relative(config.public_headers()),
        libraries=[config.LIBRARY_NAME],
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=[f"-Wl,-rpath,{config.MODULE_RPATH}"],
    )


def _configure_file(template: Path, out: Path, values: dict) -> None:
    """CMake's configure_file(@ONLY) for the package's CMake files."""
    text = re.sub(r"@([A-Za-z_][A-Za-z0-9_]*)@", lambda m: values[m.group(1)], template.read_text())
    if not out.exists() or out.read_text() != text:
        out.write_text(text)


def _package_init(template_name: str) -> str:
    """What configure_package_config_file() puts for @PACKAGE_INIT@ (CMake 3.21+)."""
    up = "/".join(".." for _ in Path(config.PACKAGE_CMAKE_DIR).parts) + "/"
    return f"""
####### Expanded from @PACKAGE_INIT@ by pgext's setup.py, as by configure_package_config_file() #######
####### The input file was {template_name}

get_filename_component(PACKAGE_PREFIX_DIR "${{CMAKE_CURRENT_LIST_DIR}}/{up}" ABSOLUTE)

macro(set_and_check _var _file)
  set(${{_var}} "${{_file}}")
  if(NOT EXISTS "${{_file}}")
    message(FATAL_ERROR "File or directory ${{_file}} referenced by variable ${{_var}} does not exist !")
  endif()
endmacro()

macro(check_required_components _NAME)
  foreach(comp ${{${{_NAME}}_FIND_COMPONENTS}})
    if(NOT ${{_NAME}}_${{comp}}_FOUND)
      if(${{_NAME}}_FIND_REQUIRED_${{comp}})
        set(${{_NAME}}_FOUND FALSE)
      endif()
    endif()
  endforeach()
endmacro()

####################################################################################"""


def write_package_files(package_dir: Path) -> None:
    """libpgext's public headers and CMake package, inside ``package_dir`` (``.../pgext``)."""
    include = package_dir / config.PACKAGE_INCLUDE_DIR / "pgext"
    include.mkdir(parents=True, exist_ok=True)
    wanted = {Path(h).name for h in config.public_headers()}
    for stale in include.glob("*.h"):
        if stale.name not in wanted:
            stale.unlink()
    for header in config.public_headers():
        shutil.copy2(header, include / Path(header).name)

    cmake_dir = package_dir / config.PACKAGE_CMAKE_DIR
    cmake_dir.mkdir(parents=True, exist_ok=True)
    major, minor = VERSION.split(".")[:2]
    values = {
        "PACKAGE_INIT": _package_init("pgextConfig.cmake.in"),
        # pgextConfig.cmake.in, as CMakeLists.txt fills it in
        "PGEXT_WITH_CUDA_BOOL": "ON" if CUDA_HOME else "OFF",
        "PGEXT_TORCH_VERSION_MAJOR_MINOR": re.match(r"\d+\.\d+", torch.__version__).group(0),
        # cmake/package/*.cmake.in
        "PGEXT_VERSION": VERSION,
        "PGEXT_VERSION_MAJOR": major,
        "PGEXT_VERSION_MINOR": minor,
        "PGEXT_PACKAGE_CMAKE_DIR": config.PACKAGE_CMAKE_DIR,
        "PGEXT_CMAKE_DIR_TO_PREFIX": "/".join(".." for _ in Path(config.PACKAGE_CMAKE_DIR).parts),
        "PGEXT_PACKAGE_LIB_DIR": config.PACKAGE_LIB_DIR,
        "PGEXT_PACKAGE_INCLUDE_DIR": config.PACKAGE_INCLUDE_DIR,
        "PGEXT_LIBRARY_FILE": config.LIBRARY_FILE,
    }
    cmake_src = ROOT / "cmake"
    _configure_file(cmake_src / "pgextConfig.cmake.in", cmake_dir / "pgextConfig.cmake", values)
    for name in ("pgextConfigVersion.cmake", "pgextTargets.cmake"):
        _configure_file(cmake_src / "package" / f"{name}.in", cmake_dir / name, values)


class build_ext(BuildExtension):
    """torch's BuildExtension (ninja), plus: libpgext as a plain shared
    library, linked before pgext._C, and the package's headers and CMake files."""

    def finalize_options(self):
        super().finalize_options()
        self.parallel = None  # libpgext must be linked before pgext._C links it

    def get_ext_filename(self, fullname):
        if fullname.split(".")[-1] == LIBRARY.split(".")[-1]:
            return os.path.join(*fullname.split(".")[:-1], config.LIBRARY_FILE)
        return super().get_ext_filename(fullname)

    def build_extension(self, ext):
        # pgext._C links the libpgext just linked in build_lib (with --inplace,
        # setuptools copies both into the source tree afterwards). With ninja,
        # torch's BuildExtension builds every extension each time: ninja
        # recompiles what changed, the links always run.
        if ext.name == MODULE:
            library_dir = os.path.dirname(self.get_ext_fullpath(LIBRARY))
            ext.library_dirs = [library_dir, *ext.library_dirs]
        # setuptools links the objects of its sorted sources; restore the
        # order that keeps AVX2 code out of the portable kernels.
        link = self.compiler.link_shared_object
        self.compiler.link_shared_object = lambda objects, *a, **k: link(config.isa_specific_last(objects), *a, **k)
        try:
            super().build_extension(ext)
        finally:
            self.compiler.link_shared_object = link

    def run(self):
        build_py = self.get_finalized_command("build_py")
        source_package = Path(build_py.get_package_dir("pgext"))
        if self.inplace:
            # setuptools builds in build_lib, then copies to the source tree
            (source_package / config.PACKAGE_LIB_DIR).mkdir(parents=True, exist_ok=True)
        super().run()
        write_package_files(Path(self.build_lib) / "pgext")
        if self.inplace:
            write_package_files(source_package)


# The binary uses torch's C++ ABI, which changes between minor releases: pin
# the major.minor it was built against (pyproject.toml: dynamic dependencies).
TORCH_REQUIREMENT = "torch==" + ".".join(torch.__version__.split("+")[0].split(".")[:2]) + ".*"

setup(
    version=VERSION,
    install_requires=[TORCH_REQUIREMENT],
    packages=find_packages(include=["pgext", "pgext.*"]),
    ext_modules=[library(), module()],
    cmdclass={"build_ext": build_ext.with_options(use_ninja=True)},
)
