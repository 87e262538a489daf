#include "pg_cpu_alloc.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace pgext {
namespace cpu {

namespace {

constexpr size_t kHugePage = size_t(2) << 20;

bool env_enabled(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr || std::strcmp(v, "0") != 0;
}

// The last freed gradient block, kept for the next gradient of the same size.
// A training loop frees its gradient (zero_grad, `logit.grad = None`) and asks
// for one of the same size in the next backward; a fresh block would cost the
// OS's page faults and zeroing again, about half of backward at large N. At
// most one block is held: a request of another size releases it.
// PGEXT_GRAD_CACHE=0 turns the cache off.
class OneBlockCache {
 public:
  void* take(size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    void* p = nullptr;
    if (block_ != nullptr && size_ == size) {
      p = block_;
    } else if (block_ != nullptr) {
      std::free(block_);
    }
    block_ = nullptr;
    size_ = 0;
    return p;
  }

  // Takes ownership of `p`.
  void give(void* p, size_t size) {
    void* old = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      old = block_;
      block_ = p;
      size_ = size;
    }
    std::free(old);
  }

 private:
  std::mutex mutex_;
  void* block_ = nullptr;
  size_t size_ = 0;
};

bool cache_enabled() {
  static const bool enabled = env_enabled("PGEXT_GRAD_CACHE");
  return enabled;
}

// Never destroyed: tensors may be freed during static destruction.
OneBlockCache& block_cache() {
  static auto* cache = new OneBlockCache();
  return *cache;
}

struct Block {
  void* ptr;
  size_t size;
};

void free_block(void* ctx) {
  auto* block = static_cast<Block*>(ctx);
  if (cache_enabled()) {
    block_cache().give(block->ptr, block->size);
  } else {
    std::free(block->ptr);
  }
  delete block;
}

// 2 MiB-aligned blocks, a whole number of 2 MiB pages, marked MADV_HUGEPAGE,
// as PyTorch's CPU allocator does under THP_MEM_ALLOC_ENABLE=1.
class HugePageAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    const size_t size = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    void* p = cache_enabled() && size > 0 ? block_cache().take(size) : nullptr;
    if (p == nullptr) {
      if (size == 0 || posix_memalign(&p, kHugePage, size) != 0) {
        // Zero bytes, or no memory: let the regular allocator answer.
        return c10::GetCPUAllocator()->allocate(nbytes);
      }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      madvise(p, size, MADV_HUGEPAGE);  // advice: the pages are fine without it
#endif
    }
    return {p, new Block{p, size}, &free_block, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

HugePageAllocator& huge_page_allocator() {
  static HugePageAllocator allocator;
  return allocator;
}

// Whether empty_logit_sized asks for huge pages (PGEXT_HUGE_PAGES, read once).
bool huge_pages_enabled() {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = env_enabled("PGEXT_HUGE_PAGES");
  return enabled;
#else
  return false;
#endif
}

}  // namespace

at::Tensor empty_cpu(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::detail::empty_cpu(sizes, options);
}

at::Tensor empty_logit_sized(int64_t rows, int64_t n, const at::TensorOptions& options) {
  const auto dtype = c10::typeMetaToScalarType(options.dtype());
  const int64_t nbytes = rows * n * static_cast<int64_t>(c10::elementSize(dtype));
  if (nbytes < static_cast<int64_t>(kHugePage) || !huge_pages_enabled()) {
    return empty_cpu({rows, n}, options);
  }
  return at::detail::empty_generic(
      {rows, n}, &huge_page_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype, std::nullopt);
}

}  // namespace cpu
}  // namespace pgext
