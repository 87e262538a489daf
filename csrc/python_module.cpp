// pgext._C: build information only. The ops themselves are dispatcher ops
// (torch.ops.pgext.*) that live in libpgext. This module links libpgext (the
// installed package: pgext/lib/libpgext.so, found through RUNPATH $ORIGIN/lib)
// and reports what that library says about itself, through the same public
// C++ API that C++ programs use. Loading this module loads libpgext, whose
// static initializers register the ops, once per process.
#include <pgext/pgext.h>

#include <pybind11/pybind11.h>
#include <torch/headeronly/version.h>

#include <string>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pgext build information; the ops live in libpgext (torch.ops.pgext)";
  m.attr("__version__") = pgext::version();
  m.def("cuda_compiled", [] { return pgext::cuda_compiled(); },
        "Whether the CUDA kernels were compiled into libpgext.");
  m.def("torch_version", [] { return std::string(TORCH_VERSION); },
        "The torch version this build was compiled against.");
  m.def("cpu_capability", [] { return std::string(pgext::cpu_capability()); },
        "The CPU kernel build in use: DEFAULT, AVX2 or AVX512.");
}
