// pgext._C: build information only. The ops themselves are dispatcher ops
// (torch.ops.pgext.*), registered when this library is loaded.
#include "cpu/pg_cpu_kernel.h"
#include "pg_version.h"

#include <pybind11/pybind11.h>
#include <torch/headeronly/version.h>

#ifndef PGEXT_WITH_CUDA
#define PGEXT_WITH_CUDA 0
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pgext build information; the ops live in torch.ops.pgext";
  m.attr("__version__") = PGEXT_VERSION;
  m.def("cuda_compiled", [] { return PGEXT_WITH_CUDA != 0; },
        "Whether the CUDA kernels were compiled into this build.");
  m.def("torch_version", [] { return std::string(TORCH_VERSION); },
        "The torch version this build was compiled against.");
  m.def("cpu_capability", [] { return std::string(pgext::cpu::active_capability()); },
        "The CPU kernel build in use: DEFAULT, AVX2 or AVX512.");
}
