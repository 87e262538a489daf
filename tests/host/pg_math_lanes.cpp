// Replays, on the host, how the CUDA forward splits a row among threads
// (csrc/core/cuda/pg_cuda_rows.cuh: for_each_logit, group_combine) with the
// per-row math the kernels call (csrc/core/row_math.h), so that the GPU's math is
// tested on machines without a GPU. Driven by tests/test_math_host.py.
//
// Input, one row per line:
//   <acc: f | d> <threads> <vec> <head> <n> <x_0> ... <x_{n-1}>
// threads <= 32 is a short row's group (one butterfly); a multiple of 32 is a
// long row's block (a butterfly per warp, then one over the warps, in warp
// order). vec is the elements per 16-byte pack, head the elements before the
// row's first 16-byte boundary. Values are anything strtod reads (nan, -inf,
// hexadecimal floats). Output, one line per row: "<lse> <entropy>" in %a.
#include "core/row_math.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {

using pgext::math::RowStats;

// The logits thread t of nt reads, in for_each_logit's order: head elements
// strided by nt, then whole packs t, t + nt, ..., then tail elements strided.
template <typename acc_t>
RowStats<acc_t> thread_stats(const std::vector<acc_t>& x, int64_t head, int64_t vec, int64_t t, int64_t nt) {
  const auto n = static_cast<int64_t>(x.size());
  RowStats<acc_t> st = pgext::math::empty_stats<acc_t>();
  for (int64_t j = t; j < head; j += nt) {
    pgext::math::online_update(st, x[j]);
  }
  const int64_t nvec = (n - head) / vec;
  for (int64_t i = t; i < nvec; i += nt) {
    for (int64_t k = 0; k < vec; ++k) {
      pgext::math::online_update(st, x[head + i * vec + k]);
    }
  }
  for (int64_t j = head + nvec * vec + t; j < n; j += nt) {
    pgext::math::online_update(st, x[j]);
  }
  return st;
}

// group_combine over lanes [first, first + group): every lane combines its
// value with its XOR partner's, from the values before the step.
template <typename acc_t>
void butterfly(std::vector<RowStats<acc_t>>& lanes, size_t first, size_t group) {
  for (size_t offset = group / 2; offset > 0; offset /= 2) {
    const std::vector<RowStats<acc_t>> before(lanes);
    for (size_t l = 0; l < group; ++l) {
      lanes[first + l] = pgext::math::combine(before[first + l], before[first + (l ^ offset)]);
    }
  }
}

template <typename acc_t>
RowStats<acc_t> replay(const std::vector<acc_t>& x, int64_t threads, int64_t vec, int64_t head) {
  std::vector<RowStats<acc_t>> lanes;
  for (int64_t t = 0; t < threads; ++t) {
    lanes.push_back(thread_stats(x, head, vec, t, threads));
  }
  constexpr int64_t kWarp = 32;
  if (threads <= kWarp) {
    butterfly(lanes, 0, static_cast<size_t>(threads));
    return lanes[0];
  }
  const int64_t warps = threads / kWarp;
  std::vector<RowStats<acc_t>> first_warp(kWarp, pgext::math::empty_stats<acc_t>());
  for (int64_t w = 0; w < warps; ++w) {
    butterfly(lanes, static_cast<size_t>(w * kWarp), kWarp);
    first_warp[w] = lanes[w * kWarp];
  }
  butterfly(first_warp, 0, kWarp);
  return first_warp[0];
}

template <typename acc_t>
void run(std::istringstream& in, int64_t threads, int64_t vec, int64_t head, int64_t n) {
  std::vector<acc_t> x;
  std::string word;
  for (int64_t j = 0; j < n && in >> word; ++j) {
    x.push_back(static_cast<acc_t>(std::strtod(word.c_str(), nullptr)));
  }
  if (static_cast<int64_t>(x.size()) != n) {
    std::fprintf(stderr, "expected %lld values\n", static_cast<long long>(n));
    std::exit(2);
  }
  const auto st = replay(x, threads, vec, head);
  const auto r = pgext::math::finish_row(st);
  std::printf("%a %a\n", pgext::math::saved_lse(st.m, r.log_s), static_cast<double>(r.entropy));
}

}  // namespace

int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    std::string acc;
    int64_t threads = 0, vec = 0, head = 0, n = 0;
    if (!(in >> acc >> threads >> vec >> head >> n)) {
      continue;
    }
    const bool power_of_two = threads > 0 && (threads & (threads - 1)) == 0;
    if (!power_of_two || threads > 1024 || vec < 1 || head < 0 || head > n) {
      std::fprintf(stderr, "bad row header: %s\n", line.c_str());
      return 2;
    }
    if (acc == "d") {
      run<double>(in, threads, vec, head, n);
    } else {
      run<float>(in, threads, vec, head, n);
    }
  }
  return 0;
}
