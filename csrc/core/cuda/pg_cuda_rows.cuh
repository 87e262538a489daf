#pragma once
// Device helpers shared by the forward and backward kernels of pg_error: how
// the threads working on one row split it, aligned 16-byte loads, and the
// shuffle reduction of the row statistics.
//
// A row of logits has unit stride but may start anywhere (any row stride,
// storage offsets, overlapping or expanded rows). Each row is cut into
//   head:  the elements before the first 16-byte boundary (< kVec of them),
//   body:  whole 16-byte packs, loaded with one vector load each,
//   tail:  the elements after the last whole pack (< kVec of them),
// so vector loads are always aligned, whatever the row stride. A pointer that
// is not even aligned to its element size (possible only with from_blob) has
// no body: the whole row is read element by element.
#include "../row_math.h"

#include <c10/macros/Macros.h>

#include <cstdint>

namespace pgext {
namespace cuda {

constexpr int kWarpSize = 32;
// Rows of at most this many logits get a warp (or part of one); longer rows a
// block.
constexpr int64_t kShortRow = 1024;

// kVec elements of scalar_t in one aligned 16-byte pack.
template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));
  scalar_t v[kVec];
};

// Number of leading elements of a row of n starting at x that precede its
// first 16-byte boundary (n when the row can never be aligned).
template <typename scalar_t>
__device__ __forceinline__ int64_t head_len(const scalar_t* x, int64_t n) {
  const auto addr = reinterpret_cast<std::uintptr_t>(x);
  if (addr % sizeof(scalar_t) != 0) {
    return n;
  }
  const auto head = static_cast<int64_t>((16 - addr % 16) % 16 / sizeof(scalar_t));
  return head < n ? head : n;
}

// The elements of row x[0, n) that belong to thread t of the nt threads
// sharing the row, each converted to acc_t and passed to f in a fixed order
// (the order depends on n, t, nt and the row's alignment only: results are
// bitwise reproducible). Two packs are loaded before either is used, so that
// each thread keeps two 16-byte loads in flight.
template <typename acc_t, typename scalar_t, typename F>
__device__ __forceinline__ void for_each_logit(
    const scalar_t* __restrict__ x, int64_t n, int64_t t, int64_t nt, F&& f) {
  using P = Pack<scalar_t>;
  constexpr int V = P::kVec;
  const int64_t head = head_len(x, n);
  for (int64_t j = t; j < head; j += nt) {
    f(static_cast<acc_t>(x[j]));
  }
  const int64_t nvec = (n - head) / V;
  const P* __restrict__ xv = reinterpret_cast<const P*>(x + head);
  int64_t i = t;
  for (; i + nt < nvec; i += 2 * nt) {
    const P a = xv[i];
    const P b = xv[i + nt];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      f(static_cast<acc_t>(a.v[k]));
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      f(static_cast<acc_t>(b.v[k]));
    }
  }
  if (i < nvec) {
    const P a = xv[i];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      f(static_cast<acc_t>(a.v[k]));
    }
  }
  for (int64_t j = head + nvec * V + t; j < n; j += nt) {
    f(static_cast<acc_t>(x[j]));
  }
}

// Combines the statistics of the `group` consecutive lanes (a power of two,
// at most 32) that share a row, with a butterfly of shuffles. Every lane of
// the warp must call it. The result is only used from the group's first lane:
// math::combine is not bitwise symmetric once the compiler contracts it into
// FMAs, so lanes may differ in the last bit, but each lane's value is a fixed
// function of the inputs.
template <typename acc_t>
__device__ __forceinline__ math::RowStats<acc_t> group_combine(math::RowStats<acc_t> st, int group) {
  for (int offset = group / 2; offset > 0; offset /= 2) {
    math::RowStats<acc_t> other;
    other.m = __shfl_xor_sync(0xffffffffu, st.m, offset);
    other.s = __shfl_xor_sync(0xffffffffu, st.s, offset);
    other.u = __shfl_xor_sync(0xffffffffu, st.u, offset);
    st = math::combine(st, other);
  }
  return st;
}

// Threads per row for short rows (n <= kShortRow): about two packs per
// thread, a power of two between 4 and a warp.
inline int short_row_group(int64_t n, int vec) {
  const int64_t want = (n + 2 * vec - 1) / (2 * vec);
  int group = 4;
  while (group < kWarpSize && group < want) {
    group *= 2;
  }
  return group;
}

// Blocks for `units` units of work of `per_block` each, capped at the grid's
// x limit: the kernels loop over their work with a grid stride.
inline unsigned int grid_size(int64_t units, int64_t per_block) {
  const int64_t blocks = (units + per_block - 1) / per_block;
  constexpr int64_t kMaxGrid = 0x7fffffff;
  return static_cast<unsigned int>(blocks < kMaxGrid ? blocks : kMaxGrid);
}

}  // namespace cuda
}  // namespace pgext
