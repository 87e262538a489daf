// The scheduler behind cuda_host.h: fibers, block barriers, warp exchanges,
// deadlock reports and the pseudo-random schedule.
#include "cuda_host.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <new>
#include <stdexcept>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace cuda_host {
namespace {

constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 128 * 1024;
constexpr size_t kMaxDynamicShared = 48 * 1024;

// ---------------------------------------------------------------- context switch
#if defined(__x86_64__)
// Saves the callee-saved registers on the running stack, stores its pointer
// in *save, and resumes the stack `load` (no system call, unlike
// swapcontext's signal-mask update).
extern "C" void cuda_host_switch(void** save, void* load);
asm(R"(
    .text
    .p2align 4
    .globl cuda_host_switch
    .hidden cuda_host_switch
    .type cuda_host_switch, @function
cuda_host_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cuda_host_switch, .-cuda_host_switch
)");
#endif

enum class State : uint8_t { Runnable, AtBarrier, AtWarp, Finished };

struct Fiber {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t context;
#endif
  State state = State::Runnable;
  WarpOp op = WarpOp::SyncWarp;
  uint32_t mask = 0;
  int arg = 0;
  int width = 0;
  int size = 0;
  uint64_t value = 0;  // in: the lane's value or predicate; out: the result
};

// The lanes of one warp that are waiting in one warp operation.
struct WarpGroup {
  uint32_t mask;
  uint32_t arrived;
};

// splitmix64: a fixed generator, so a seed gives the same schedule everywhere.
struct Rng {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  uint64_t below(uint64_t n) {
    return next() % n;
  }
};

enum class Stop : uint8_t { None, Assert, HarnessError, Exception };

struct Engine {
  std::mutex mutex;
  char* stacks = nullptr;
  size_t stack_stride = 0;

  uint64_t seed = 0;
  uint64_t launches_since_seed = 0;
  int64_t launches = 0;
  std::string last_error;

  // The launch in progress.
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  std::vector<unsigned char> dynamic_shared;
  Rng rng{0};
  bool random = false;

  // The block in progress.
  int threads = 0;
  int live = 0;
  int current = -1;
  std::vector<Fiber> fibers;
  std::vector<std::vector<WarpGroup>> groups;  // per warp
  std::vector<void*> shared_seen;  // static shared variables poisoned in this block
  int at_barrier = 0;
  uint64_t barrier_pred = 0;
#if defined(__x86_64__)
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler;
#endif

  Stop stop = Stop::None;
  std::string stop_message;
  std::exception_ptr exception;
};

Engine& engine() {
  static Engine* e = new Engine();  // never destroyed: fibers may be abandoned
  return *e;
}

void fiber_main();

#if !defined(__x86_64__)
void fiber_main_ucontext() {
  fiber_main();
}
#endif

char* stack_of(Engine& e, int i) {
  return e.stacks + static_cast<size_t>(i) * e.stack_stride;
}

void allocate_stacks(Engine& e) {
  if (e.stacks != nullptr) {
    return;
  }
  const auto page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  e.stack_stride = kStackBytes + page;  // a guard page below each stack
  const size_t bytes = e.stack_stride * kMaxThreads;
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    throw std::bad_alloc();
  }
  e.stacks = static_cast<char*>(p);
  for (int i = 0; i < kMaxThreads; ++i) {
    mprotect(stack_of(e, i), page, PROT_NONE);
  }
}

void start_fiber(Engine& e, int i) {
  Fiber& f = e.fibers[i];
  f.state = State::Runnable;
  char* top = stack_of(e, i) + e.stack_stride;
#if defined(__x86_64__)
  // What cuda_host_switch pops: six registers, then the address it returns
  // to (fiber_main, entered with the stack aligned as after a call).
  auto** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;
  *--sp = reinterpret_cast<void*>(&fiber_main);
  for (int r = 0; r < 6; ++r) {
    *--sp = nullptr;
  }
  f.sp = sp;
#else
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = top - kStackBytes;
  f.context.uc_stack.ss_size = kStackBytes;
  f.context.uc_link = nullptr;
  makecontext(&f.context, &fiber_main_ucontext, 0);
#endif
}

void set_coordinates(Engine& e, int i) {
  threadIdx.x = static_cast<unsigned int>(i) % blockDim.x;
  threadIdx.y = static_cast<unsigned int>(i) / blockDim.x % blockDim.y;
  threadIdx.z = static_cast<unsigned int>(i) / (blockDim.x * blockDim.y);
  e.current = i;
}

void resume(Engine& e, int i) {
  set_coordinates(e, i);
#if defined(__x86_64__)
  cuda_host_switch(&e.scheduler_sp, e.fibers[i].sp);
#else
  swapcontext(&e.scheduler, &e.fibers[i].context);
#endif
}

// The running fiber hands control back to the scheduler.
void yield(Engine& e) {
  Fiber& f = e.fibers[e.current];
#if defined(__x86_64__)
  cuda_host_switch(&f.sp, e.scheduler_sp);
#else
  swapcontext(&f.context, &e.scheduler);
#endif
}

bool in_fiber(const Engine& e) {
  return e.current >= 0;
}

// Stops the launch from inside a fiber: the scheduler abandons the grid.
[[noreturn]] void stop_launch(Engine& e, Stop why, std::string message) {
  e.stop = why;
  e.stop_message = std::move(message);
  yield(e);
  std::abort();  // a stopped fiber is never resumed
}

void fiber_main() {
  Engine& e = engine();
  try {
    e.body(e.ctx);
  } catch (...) {
    e.exception = std::current_exception();
    e.stop = Stop::Exception;
  }
  e.fibers[e.current].state = State::Finished;
  --e.live;
  yield(e);
  std::abort();  // a finished fiber is never resumed
}

std::string dim_string(dim3 d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

std::string where(const Engine& e) {
  return "block " + dim_string(dim3(blockIdx.x, blockIdx.y, blockIdx.z)) + " of grid " + dim_string(gridDim) +
         ", block size " + dim_string(blockDim);
}

// "3, 5-9, 12" for the set bits of `bits` (lanes) offset by `base`.
std::string lane_list(uint32_t bits, int base = 0) {
  std::string out;
  for (int l = 0; l < 32; ++l) {
    if (!(bits >> l & 1u)) {
      continue;
    }
    int end = l;
    while (end + 1 < 32 && (bits >> (end + 1) & 1u)) {
      ++end;
    }
    out += (out.empty() ? "" : ", ") + std::to_string(base + l);
    if (end > l) {
      out += "-" + std::to_string(base + end);
    }
    l = end;
  }
  return out;
}

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::ShflIdx: return "__shfl_sync";
    case WarpOp::ShflUp: return "__shfl_up_sync";
    case WarpOp::ShflDown: return "__shfl_down_sync";
    case WarpOp::ShflXor: return "__shfl_xor_sync";
    case WarpOp::Ballot: return "__ballot_sync";
    case WarpOp::Any: return "__any_sync";
    case WarpOp::All: return "__all_sync";
    case WarpOp::SyncWarp: return "__syncwarp";
  }
  return "?";
}

const char* state_name(State s) {
  switch (s) {
    case State::Runnable: return "running";
    case State::AtBarrier: return "waiting at __syncthreads";
    case State::AtWarp: return "waiting in a warp operation";
    case State::Finished: return "exited";
  }
  return "?";
}

// Why no thread of the block can go on.
std::string deadlock_report(const Engine& e) {
  std::string out = "cuda_host: deadlock in " + where(e) + ": ";
  int exited = 0;
  for (const Fiber& f : e.fibers) {
    exited += f.state == State::Finished;
  }
  if (e.at_barrier > 0) {
    out += std::to_string(e.at_barrier) + " of " + std::to_string(e.threads) +
           " threads wait at __syncthreads (" + std::to_string(exited) + " exited, " +
           std::to_string(e.threads - exited - e.at_barrier) + " wait in warp operations); ";
  }
  for (size_t w = 0; w < e.groups.size(); ++w) {
    for (const WarpGroup& g : e.groups[w]) {
      const int first = __builtin_ctz(g.arrived);
      const Fiber& f = e.fibers[w * 32 + first];
      out += "warp " + std::to_string(w) + ": lanes " + lane_list(g.arrived) + " wait in " + op_name(f.op) +
             " (mask 0x";
      char hex[9];
      std::snprintf(hex, sizeof(hex), "%08x", g.mask);
      out += std::string(hex) + ") for lanes";
      const uint32_t missing = g.mask & ~g.arrived;
      const char* sep = " ";
      for (State s : {State::Finished, State::AtBarrier, State::AtWarp}) {
        uint32_t lanes = 0;
        for (int l = 0; l < 32; ++l) {
          lanes |= ((missing >> l & 1u) && e.fibers[w * 32 + l].state == s ? 1u : 0u) << l;
        }
        if (lanes != 0) {
          out += sep + lane_list(lanes) + " (" + state_name(s) + ")";
          sep = ", ";
        }
      }
      out += " (a warp operation in divergent code?); ";
    }
  }
  return out;
}

void check_width(Engine& e, int width) {
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    stop_launch(e, Stop::HarnessError,
                "cuda_host: shuffle width " + std::to_string(width) + " is not a power of two <= 32 in " + where(e));
  }
}

// Completes the warp operation of group g (every lane of g.mask arrived):
// each lane's result goes to its Fiber::value.
void complete(Engine& e, int warp, const WarpGroup& g) {
  Fiber* lanes = &e.fibers[warp * 32];
  const Fiber& first = lanes[__builtin_ctz(g.mask)];
  uint64_t in[32];
  uint32_t votes = 0;
  for (int l = 0; l < 32; ++l) {
    if (g.mask >> l & 1u) {
      in[l] = lanes[l].value;
      votes |= (lanes[l].value != 0 ? 1u : 0u) << l;
    }
  }
  for (int l = 0; l < 32; ++l) {
    if (!(g.mask >> l & 1u)) {
      continue;
    }
    Fiber& f = lanes[l];
    const int w = f.width;
    const int seg = l & ~(w - 1);
    int src = l;
    switch (f.op) {
      case WarpOp::ShflIdx: src = seg + (f.arg & (w - 1)); break;
      case WarpOp::ShflUp: src = l - seg >= f.arg ? l - f.arg : l; break;
      case WarpOp::ShflDown: src = l - seg + f.arg < w ? l + f.arg : l; break;
      case WarpOp::ShflXor: src = (l ^ f.arg) < seg + w ? (l ^ f.arg) & 31 : l; break;
      default: break;
    }
    switch (f.op) {
      case WarpOp::Ballot: f.value = votes; break;
      case WarpOp::Any: f.value = votes != 0; break;
      case WarpOp::All: f.value = votes == g.mask; break;
      case WarpOp::SyncWarp: f.value = 0; break;
      default:
        // A lane outside the mask holds nothing defined: garbage bits.
        f.value = (g.mask >> src & 1u) ? in[src] : ~uint64_t(0);
        break;
    }
    f.state = State::Runnable;
  }
  (void)first;
}

void run_block(Engine& e) {
  const int n = e.threads;
  e.live = n;
  e.at_barrier = 0;
  e.barrier_pred = 0;
  for (auto& g : e.groups) {
    g.clear();
  }
  e.shared_seen.clear();
  for (int i = 0; i < n; ++i) {
    start_fiber(e, i);
  }
  if (!e.dynamic_shared.empty()) {
    std::memset(e.dynamic_shared.data(), 0xff, e.dynamic_shared.size());
  }
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) {
    order[i] = i;
  }
  while (e.live > 0) {
    if (e.random) {
      for (int i = n - 1; i > 0; --i) {
        std::swap(order[i], order[e.rng.below(i + 1)]);
      }
    }
    bool ran = false;
    bool held = false;
    for (int i : order) {
      if (e.fibers[i].state != State::Runnable) {
        continue;
      }
      // The random schedule holds a thread back for a step half of the
      // time, so that threads drift apart by several synchronization points.
      if (e.random && (e.rng.next() & 1u)) {
        held = true;
        continue;
      }
      resume(e, i);
      ran = true;
      if (e.stop != Stop::None) {
        return;
      }
    }
    if (!ran && !held) {
      e.stop = Stop::HarnessError;
      e.stop_message = deadlock_report(e);
      return;
    }
  }
}

std::string invalid_config(const LaunchConfig& c) {
  const uint64_t threads = uint64_t(c.block.x) * c.block.y * c.block.z;
  if (threads == 0 || threads > kMaxThreads || c.block.z > 64) {
    return "block " + dim_string(c.block);
  }
  if (c.grid.x == 0 || c.grid.x > 0x7fffffffu || c.grid.y == 0 || c.grid.y > 65535 || c.grid.z == 0 ||
      c.grid.z > 65535) {
    return "grid " + dim_string(c.grid);
  }
  if (c.shmem > kMaxDynamicShared) {
    return std::to_string(c.shmem) + " bytes of dynamic shared memory";
  }
  return "";
}

}  // namespace

void set_schedule(uint64_t seed) {
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.mutex);
  e.seed = seed;
  e.launches_since_seed = 0;
}

uint64_t schedule() {
  return engine().seed;
}

int64_t launch_count() {
  return engine().launches;
}

std::string take_last_error() {
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.mutex);
  std::string out;
  out.swap(e.last_error);
  return out;
}

void* dynamic_shared_memory() {
  Engine& e = engine();
  return e.dynamic_shared.empty() ? nullptr : e.dynamic_shared.data();
}

void run_grid(const LaunchConfig& cfg, void (*body)(void*), void* ctx) {
  Engine& e = engine();
  std::lock_guard<std::mutex> lock(e.mutex);
  if (in_fiber(e)) {
    throw std::runtime_error("cuda_host: kernel launch from a kernel (dynamic parallelism) is not emulated");
  }
  ++e.launches;
  if (const std::string bad = invalid_config(cfg); !bad.empty()) {
    e.last_error = "CUDA error: invalid configuration argument (cuda_host: " + bad + ")";
    return;
  }
  allocate_stacks(e);
  e.body = body;
  e.ctx = ctx;
  e.random = e.seed != 0;
  e.rng = Rng{e.seed * 0x2545f4914f6cdd1dull + ++e.launches_since_seed};
  e.dynamic_shared.assign(cfg.shmem, 0xff);
  e.threads = static_cast<int>(cfg.block.x * cfg.block.y * cfg.block.z);
  e.fibers.assign(e.threads, Fiber());
  e.groups.assign((e.threads + 31) / 32, {});
  e.stop = Stop::None;
  e.exception = nullptr;
  gridDim = cfg.grid;
  blockDim = cfg.block;

  const uint64_t blocks = uint64_t(cfg.grid.x) * cfg.grid.y * cfg.grid.z;
  // The random schedule also runs the blocks in a random order (small grids).
  std::vector<uint64_t> block_order;
  if (e.random && blocks <= (1u << 20)) {
    block_order.resize(blocks);
    for (uint64_t b = 0; b < blocks; ++b) {
      block_order[b] = b;
    }
    for (uint64_t b = blocks; b > 1; --b) {
      std::swap(block_order[b - 1], block_order[e.rng.below(b)]);
    }
  }
  for (uint64_t k = 0; k < blocks && e.stop == Stop::None; ++k) {
    const uint64_t b = block_order.empty() ? k : block_order[k];
    blockIdx.x = static_cast<unsigned int>(b % cfg.grid.x);
    blockIdx.y = static_cast<unsigned int>(b / cfg.grid.x % cfg.grid.y);
    blockIdx.z = static_cast<unsigned int>(b / (uint64_t(cfg.grid.x) * cfg.grid.y));
    run_block(e);
  }
  e.current = -1;
  const Stop stop = e.stop;
  e.stop = Stop::None;
  switch (stop) {
    case Stop::None: return;
    case Stop::Assert: e.last_error = e.stop_message; return;
    case Stop::HarnessError: throw std::runtime_error(e.stop_message);
    case Stop::Exception: std::rethrow_exception(e.exception);
  }
}

void shared_declared(void* p, size_t bytes) {
  Engine& e = engine();
  if (!in_fiber(e)) {
    return;
  }
  for (void* seen : e.shared_seen) {
    if (seen == p) {
      return;
    }
  }
  e.shared_seen.push_back(p);
  std::memset(p, 0xff, bytes);
}

uint64_t warp_exchange(WarpOp op, uint32_t mask, uint64_t value, int arg, int width, int size) {
  Engine& e = engine();
  if (!in_fiber(e)) {
    throw std::runtime_error(std::string("cuda_host: ") + op_name(op) + " called outside a kernel");
  }
  const int me = e.current;
  const int warp = me / 32;
  const int lane = me % 32;
  const uint32_t bit = 1u << lane;
  if (!(mask & bit)) {
    stop_launch(e, Stop::HarnessError,
                std::string("cuda_host: lane ") + std::to_string(lane) + " of warp " + std::to_string(warp) +
                    " calls " + op_name(op) + " with a mask that leaves it out, in " + where(e));
  }
  const int lanes_here = std::min(32, e.threads - warp * 32);
  if (lanes_here < 32 && (mask >> lanes_here) != 0) {
    stop_launch(e, Stop::HarnessError,
                std::string("cuda_host: ") + op_name(op) + " in warp " + std::to_string(warp) +
                    " names lanes that do not exist (the block has " + std::to_string(e.threads) +
                    " threads), in " + where(e));
  }
  check_width(e, width);
  Fiber& f = e.fibers[me];
  f.op = op;
  f.mask = mask;
  f.arg = arg;
  f.width = width;
  f.size = size;
  f.value = value;

  // The lanes of one mask meet in one operation. Groups with other,
  // overlapping masks may be pending at the same time (lanes that left a
  // half-warp shuffle wait in a full-warp one for the other half).
  auto& groups = e.groups[warp];
  WarpGroup* g = nullptr;
  for (WarpGroup& candidate : groups) {
    if (candidate.mask == mask) {
      g = &candidate;
      break;
    }
  }
  if (g == nullptr) {
    groups.push_back({mask, 0});
    g = &groups.back();
  } else {
    const Fiber& other = e.fibers[warp * 32 + __builtin_ctz(g->arrived)];
    if (other.op != op || other.width != width || other.size != size) {
      stop_launch(e, Stop::HarnessError,
                  std::string("cuda_host: warp ") + std::to_string(warp) + ": lane " + std::to_string(lane) +
                      " calls " + op_name(op) + " while lanes " + lane_list(g->arrived) + " wait in " +
                      op_name(other.op) + " with the same mask (different operations, widths or sizes: " +
                      "divergent code?), in " + where(e));
    }
  }
  g->arrived |= bit;
  f.state = State::AtWarp;
  if (g->arrived == g->mask) {
    const WarpGroup done = *g;
    groups.erase(groups.begin() + (g - groups.data()));
    complete(e, warp, done);
  }
  yield(e);
  return e.fibers[me].value;
}

int block_barrier(int pred) {
  Engine& e = engine();
  if (!in_fiber(e)) {
    throw std::runtime_error("cuda_host: __syncthreads called outside a kernel");
  }
  Fiber& f = e.fibers[e.current];
  f.state = State::AtBarrier;
  e.barrier_pred += pred != 0;
  if (++e.at_barrier == e.threads) {
    // Every thread of the block arrived (none exited: a barrier some threads
    // have left can never complete, and is reported as a deadlock).
    for (Fiber& other : e.fibers) {
      other.state = State::Runnable;
      other.value = e.barrier_pred;
    }
    e.at_barrier = 0;
    e.barrier_pred = 0;
  }
  const int me = e.current;
  yield(e);
  return static_cast<int>(e.fibers[me].value);
}

void device_assert_failed(const char* cond, const char* msg, const char* file, int line, const char* func) {
  Engine& e = engine();
  std::string text = std::string("CUDA error: device-side assert triggered\n") + file + ":" + std::to_string(line) +
                     ": " + func + ": block: [" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) +
                     "," + std::to_string(blockIdx.z) + "], thread: [" + std::to_string(threadIdx.x) + "," +
                     std::to_string(threadIdx.y) + "," + std::to_string(threadIdx.z) + "] Assertion `" + cond +
                     "` failed" + (msg[0] != '\0' ? std::string(": ") + msg : std::string(".")) + " (cuda_host)";
  if (!in_fiber(e)) {
    throw std::runtime_error(text);
  }
  stop_launch(e, Stop::Assert, std::move(text));
}

}  // namespace cuda_host
