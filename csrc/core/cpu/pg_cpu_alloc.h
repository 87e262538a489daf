#pragma once
// Allocation of the CPU kernels' outputs.
#include <ATen/core/Tensor.h>

namespace pgext {
namespace cpu {

// An uninitialized CPU tensor, allocated directly rather than by a dispatched
// at::empty: a small batch's step allocates about eight, and each dispatch
// costs more than the kernels' work on a row.
at::Tensor empty_cpu(at::IntArrayRef sizes, const at::TensorOptions& options);

// An uninitialized (rows, n) tensor. From 2 MiB on it is mapped on transparent
// huge pages where the OS allows (THP mode "madvise" or "always"): a fresh
// tensor of a few hundred MiB otherwise costs more in 4 KiB page faults than
// the kernel's arithmetic. PyTorch does the same for every large CPU tensor,
// but only under THP_MEM_ALLOC_ENABLE=1. PGEXT_HUGE_PAGES=0 turns it off.
// The last such block freed is kept for the next request of the same size
// (the next step's gradient), which then costs no page faults at all;
// PGEXT_GRAD_CACHE=0 turns that off.
at::Tensor empty_logit_sized(int64_t rows, int64_t n, const at::TensorOptions& options);

}  // namespace cpu
}  // namespace pgext
