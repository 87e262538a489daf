#pragma once
// CUDA's execution model on the host, so that pgext's CUDA kernels run,
// unchanged, on the CPU in the test suite (tests/test_cuda_kernels_on_cpu.py).
//
// Every GPU thread of a block is a cooperative fiber on one OS thread. A
// fiber runs until it reaches a synchronization point (__syncthreads, a warp
// shuffle or vote, __syncwarp), where it waits for the threads it synchronizes
// with; the scheduler then runs the other fibers. So barriers and shuffles have
// their real semantics: a shuffle exchanges the values the lanes hold at that
// point, a barrier orders the shared-memory accesses on either side of it, and
// threads that can never meet (a barrier or shuffle in divergent code) are
// reported as a deadlock instead of hanging. Blocks run one after another.
//
// Stricter than the hardware in one respect: a __syncthreads that some
// threads of the block have exited before is reported as a deadlock (CUDA
// allows __syncthreads only where the whole block reaches it).
//
// What this cannot show: speed, the GPU's weak memory ordering (fibers are
// sequentially consistent), the device's exp/log (the host's libm is used) and
// anything under __CUDA_ARCH__, which stays undefined.
//
// The scheduler's order is in thread order by default; set_schedule(seed)
// makes it a pseudo-random one (a different thread order at each step, and
// threads held back for a while), deterministic for a given seed: a missing
// barrier or a race on shared memory then changes the result.
//
// Kernel sources are rewritten by the build (tests/cuda_host/build.py):
// kernel<<<grid, block, shmem, stream>>>(args) becomes
// ::cuda_host::launch(::cuda_host::config(grid, block, shmem, stream), kernel, args).
#include <c10/macros/Macros.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------- keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
// Static shared memory: one instance per kernel instantiation, which is per
// block because blocks run one after another (see shared_declared).
#define __shared__ static

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

using cudaStream_t = struct CUstream_st*;
constexpr int warpSize = 32;

// The running thread's coordinates, set by the scheduler before it resumes a
// fiber (one launch runs at a time in a process).
inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace cuda_host {

// ---------------------------------------------------------------- scheduling
// 0: threads in order; anything else: the seed of a pseudo-random schedule.
void set_schedule(uint64_t seed);
uint64_t schedule();

// Launches so far (diagnostics: tests check that a kernel really ran).
int64_t launch_count();

// ---------------------------------------------------------------- launches
struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t shmem;
  cudaStream_t stream;
};

inline LaunchConfig config(dim3 grid, dim3 block, size_t shmem = 0, cudaStream_t stream = nullptr) {
  return {grid, block, shmem, stream};
}

// Runs body(ctx) as every thread of a grid. Throws std::runtime_error for a
// deadlock or a warp operation in divergent code; a device-side assert or an
// invalid configuration is kept for check_last_error, as CUDA does.
void run_grid(const LaunchConfig& cfg, void (*body)(void*), void* ctx);

// The error of the last launch (a device-side assert, an invalid
// configuration), cleared by reading it, as cudaGetLastError does; empty if
// none. The launch check (c10/cuda/CUDAException.h here) throws it.
std::string take_last_error();

// A device-side assert: the launch stops (the fibers of the grid are
// abandoned, as a trap ends a kernel) and the launch check reports it.
[[noreturn]] void device_assert_failed(const char* cond, const char* msg, const char* file, int line,
                                       const char* func);

template <typename... P, typename... A>
void launch(const LaunchConfig& cfg, void (*kernel)(P...), A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  // The kernel's parameters, converted once as CUDA copies them to the
  // device; each thread gets its own copy when it calls the kernel.
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  struct Call {
    void (*kernel)(P...);
    std::tuple<std::decay_t<P>...>* params;
  } call{kernel, &params};
  run_grid(cfg, [](void* c) {
    auto* call = static_cast<Call*>(c);
    std::apply(call->kernel, *call->params);
  }, &call);
}

// `extern __shared__ T name[];` (rewritten by the build): the launch's
// dynamic shared memory, filled with 0xff bytes at the start of every block
// so that reading it before writing gives garbage.
void* dynamic_shared_memory();
template <typename T>
T* dynamic_shared() {
  return static_cast<T*>(dynamic_shared_memory());
}

// Called (by the rewrite) after the declaration of a static __shared__
// variable: the first thread of a block to get there fills it with 0xff
// bytes, so that reading it before writing gives garbage, not the previous
// block's values.
void shared_declared(void* p, size_t bytes);

// ---------------------------------------------------------------- warps
enum class WarpOp : uint8_t { ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, Any, All, SyncWarp };

// The running lane's part in a warp operation of the lanes of `mask`: waits
// until all of them have reached it, then returns, for a shuffle, the bits
// of `value` held by lane `arg` (per the op and width), for a vote the vote.
uint64_t warp_exchange(WarpOp op, uint32_t mask, uint64_t value, int arg, int width, int size);

// __syncthreads; returns the number of threads of the block that passed
// pred != 0 (for __syncthreads_count/_and/_or).
int block_barrier(int pred);

template <typename T>
T warp_shuffle(WarpOp op, uint32_t mask, T value, int arg, int width) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = warp_exchange(op, mask, bits, arg, width, static_cast<int>(sizeof(T)));
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace cuda_host

// ---------------------------------------------------------------- intrinsics
inline void __syncthreads() {
  ::cuda_host::block_barrier(0);
}
inline int __syncthreads_count(int pred) {
  return ::cuda_host::block_barrier(pred != 0);
}
inline int __syncthreads_and(int pred) {
  return ::cuda_host::block_barrier(pred != 0) == static_cast<int>(blockDim.x * blockDim.y * blockDim.z);
}
inline int __syncthreads_or(int pred) {
  return ::cuda_host::block_barrier(pred != 0) > 0;
}
inline void __syncwarp(unsigned int mask = 0xffffffffu) {
  ::cuda_host::warp_exchange(::cuda_host::WarpOp::SyncWarp, mask, 0, 0, warpSize, 0);
}

template <typename T>
T __shfl_sync(unsigned int mask, T value, int src_lane, int width = warpSize) {
  return ::cuda_host::warp_shuffle(::cuda_host::WarpOp::ShflIdx, mask, value, src_lane, width);
}
template <typename T>
T __shfl_up_sync(unsigned int mask, T value, unsigned int delta, int width = warpSize) {
  return ::cuda_host::warp_shuffle(::cuda_host::WarpOp::ShflUp, mask, value, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_down_sync(unsigned int mask, T value, unsigned int delta, int width = warpSize) {
  return ::cuda_host::warp_shuffle(::cuda_host::WarpOp::ShflDown, mask, value, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_xor_sync(unsigned int mask, T value, int lane_mask, int width = warpSize) {
  return ::cuda_host::warp_shuffle(::cuda_host::WarpOp::ShflXor, mask, value, lane_mask, width);
}
inline unsigned int __ballot_sync(unsigned int mask, int pred) {
  return static_cast<unsigned int>(
      ::cuda_host::warp_exchange(::cuda_host::WarpOp::Ballot, mask, pred != 0, 0, warpSize, 0));
}
inline int __any_sync(unsigned int mask, int pred) {
  return static_cast<int>(::cuda_host::warp_exchange(::cuda_host::WarpOp::Any, mask, pred != 0, 0, warpSize, 0));
}
inline int __all_sync(unsigned int mask, int pred) {
  return static_cast<int>(::cuda_host::warp_exchange(::cuda_host::WarpOp::All, mask, pred != 0, 0, warpSize, 0));
}

// Fibers take turns only at synchronization points, so a read-modify-write
// between two of them is atomic.
template <typename T>
T __ldg(const T* p) {
  return *p;
}
template <typename T, typename U>
T atomicAdd(T* p, U v) {
  const T old = *p;
  *p = static_cast<T>(old + v);
  return old;
}
template <typename T, typename U>
T atomicSub(T* p, U v) {
  const T old = *p;
  *p = static_cast<T>(old - v);
  return old;
}
template <typename T, typename U>
T atomicMax(T* p, U v) {
  const T old = *p;
  *p = old < static_cast<T>(v) ? static_cast<T>(v) : old;
  return old;
}
template <typename T, typename U>
T atomicMin(T* p, U v) {
  const T old = *p;
  *p = static_cast<T>(v) < old ? static_cast<T>(v) : old;
  return old;
}
template <typename T, typename U>
T atomicExch(T* p, U v) {
  const T old = *p;
  *p = static_cast<T>(v);
  return old;
}
template <typename T, typename U, typename V>
T atomicCAS(T* p, U compare, V v) {
  const T old = *p;
  if (old == static_cast<T>(compare)) {
    *p = static_cast<T>(v);
  }
  return old;
}
template <typename T, typename U>
T atomicAnd(T* p, U v) {
  const T old = *p;
  *p = old & static_cast<T>(v);
  return old;
}
template <typename T, typename U>
T atomicOr(T* p, U v) {
  const T old = *p;
  *p = old | static_cast<T>(v);
  return old;
}
inline void __threadfence() {}
inline void __threadfence_block() {}

// ---------------------------------------------------------------- asserts
// c10 compiles device asserts out (or to a host assert) outside nvcc; here
// they stop the launch and reach the launch check, as on the GPU.
#undef CUDA_KERNEL_ASSERT
#undef CUDA_KERNEL_ASSERT_MSG
#undef CUDA_KERNEL_ASSERT_PRINTF
#define CUDA_KERNEL_ASSERT(cond)                                                                  \
  do {                                                                                            \
    if (C10_UNLIKELY(!(cond))) {                                                                  \
      ::cuda_host::device_assert_failed(#cond, "", __FILE__, __LINE__, __func__);                 \
    }                                                                                             \
  } while (0)
#define CUDA_KERNEL_ASSERT_MSG(cond, msg)                                                         \
  do {                                                                                            \
    if (C10_UNLIKELY(!(cond))) {                                                                  \
      ::cuda_host::device_assert_failed(#cond, msg, __FILE__, __LINE__, __func__);                \
    }                                                                                             \
  } while (0)
#define CUDA_KERNEL_ASSERT_PRINTF(cond, msg, ...) CUDA_KERNEL_ASSERT_MSG(cond, msg)
