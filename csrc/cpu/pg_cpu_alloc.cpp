#include "pg_cpu_alloc.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace pgext {
namespace cpu {

namespace {

constexpr size_t kHugePage = size_t(2) << 20;

void free_huge(void* p) {
  std::free(p);
}

// 2 MiB-aligned blocks, a whole number of 2 MiB pages, marked MADV_HUGEPAGE,
// as PyTorch's CPU allocator does under THP_MEM_ALLOC_ENABLE=1.
class HugePageAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    const size_t size = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    void* p = nullptr;
    if (size == 0 || posix_memalign(&p, kHugePage, size) != 0) {
      // Zero bytes, or no memory: let the regular allocator answer.
      return c10::GetCPUAllocator()->allocate(nbytes);
    }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, size, MADV_HUGEPAGE);  // advice: the pages are fine without it
#endif
    return {p, p, &free_huge, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

HugePageAllocator& huge_page_allocator() {
  static HugePageAllocator allocator;
  return allocator;
}

}  // namespace

bool huge_pages_enabled() {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = [] {
    const char* v = std::getenv("PGEXT_HUGE_PAGES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled;
#else
  return false;
#endif
}

at::Tensor empty_logit_sized(int64_t rows, int64_t n, const at::TensorOptions& options) {
  const auto dtype = c10::typeMetaToScalarType(options.dtype());
  const int64_t nbytes = rows * n * static_cast<int64_t>(c10::elementSize(dtype));
  if (nbytes < static_cast<int64_t>(kHugePage) || !huge_pages_enabled()) {
    return at::empty({rows, n}, options);
  }
  return at::detail::empty_generic(
      {rows, n}, &huge_page_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype, std::nullopt);
}

}  // namespace cpu
}  // namespace pgext
