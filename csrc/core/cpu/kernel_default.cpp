// Portable build of the CPU kernels (at::vec falls back to its generic code).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "pg_cpu_kernel_impl.h"
