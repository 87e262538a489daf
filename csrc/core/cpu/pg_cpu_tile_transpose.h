#pragma once
// Short-row tiles (pg_cpu_short_rows.h) moved by vector transposes in
// blocks of 8 rows by 8 columns, for the AVX2 build: float32 tiles come in
// as two 4 x 4 transposes in 128-bit lanes; bfloat16 tiles come in, and
// backward's gradients go out, as 16-bit words in 128-bit unpacks, which this
// CPU generation (Zen 1) issues as one operation each. Element by element,
// the copies cost more than a short row's arithmetic. Include only from
// pg_cpu_short_rows.h.
#include "pg_cpu_rows.h"
#include "pg_cpu_vec.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace pgext {
namespace cpu {
namespace CPU_CAPABILITY {

#if defined(CPU_CAPABILITY_AVX2)
// A tile has W = 8 rows (float lanes); it moves in blocks of 8 columns.
constexpr int64_t kTileRows = 8;

// The 8 rows of a tile from row r0 on, rows from `live` on repeating the
// last live row.
template <typename scalar_t>
inline void tile_row_pointers(const LogitRows<scalar_t>& x, int64_t r0, int64_t live, const scalar_t** row) {
  for (int64_t i = 0; i < kTileRows; ++i) {
    row[i] = x.row(r0 + std::min(i, live - 1));
  }
}

// The 4 x 4 transposes in both 128-bit lanes of a, b, c, d (in place).
inline void transpose_4x4_lanes(__m256& a, __m256& b, __m256& c, __m256& d) {
  const __m256 ab_lo = _mm256_unpacklo_ps(a, b);
  const __m256 ab_hi = _mm256_unpackhi_ps(a, b);
  const __m256 cd_lo = _mm256_unpacklo_ps(c, d);
  const __m256 cd_hi = _mm256_unpackhi_ps(c, d);
  a = _mm256_shuffle_ps(ab_lo, cd_lo, 0x44);
  b = _mm256_shuffle_ps(ab_lo, cd_lo, 0xEE);
  c = _mm256_shuffle_ps(ab_hi, cd_hi, 0x44);
  d = _mm256_shuffle_ps(ab_hi, cd_hi, 0xEE);
}

// Logit j of row r0 + i into tile[j * 8 + i], for all n (at least 8)
// columns; rows from `live` on repeat the last live row. The last block of
// columns overlaps the one before when n is not a multiple of 8, so that no
// load reads past a row.
inline void load_float_tile(const LogitRows<float>& x, int64_t r0, int64_t live, float* tile) {
  const float* row[kTileRows];
  tile_row_pointers(x, r0, live, row);
  for (int64_t c = 0; c < x.n; c += 8) {
    const int64_t c0 = std::min(c, x.n - 8);
    // v[h][i]: columns 4h..4h+3 of row i in the low lane, of row i + 4 in
    // the high one; transposed, column 4h + i of rows 0-3 and 4-7
    __m256 v[2][4];
    for (int64_t h = 0; h < 2; ++h) {
      for (int64_t i = 0; i < 4; ++i) {
        v[h][i] = _mm256_insertf128_ps(
            _mm256_castps128_ps256(_mm_loadu_ps(row[i] + c0 + 4 * h)), _mm_loadu_ps(row[i + 4] + c0 + 4 * h), 1);
      }
      transpose_4x4_lanes(v[h][0], v[h][1], v[h][2], v[h][3]);
      for (int64_t i = 0; i < 4; ++i) {
        _mm256_store_ps(tile + (c0 + 4 * h + i) * kTileRows, v[h][i]);
      }
    }
  }
}

// load_float_tile for bfloat16 logits, widened to float.
inline void load_bf16_tile(const LogitRows<at::BFloat16>& x, int64_t r0, int64_t live, float* tile) {
  const at::BFloat16* row[kTileRows];
  tile_row_pointers(x, r0, live, row);
  const __m128i zero = _mm_setzero_si128();
  for (int64_t c = 0; c < x.n; c += 8) {
    const int64_t c0 = std::min(c, x.n - 8);
    __m128i a[8];
    for (int64_t i = 0; i < 8; ++i) {
      a[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row[i] + c0));
    }
    // words of rows (0, 1), (2, 3), ... interleaved, then pairs of rows, then
    // quads: column j ends up in the 8 words of col[j]
    __m128i b[8], q[8], col[8];
    for (int64_t i = 0; i < 4; ++i) {
      b[2 * i] = _mm_unpacklo_epi16(a[2 * i], a[2 * i + 1]);
      b[2 * i + 1] = _mm_unpackhi_epi16(a[2 * i], a[2 * i + 1]);
    }
    for (int64_t h = 0; h < 2; ++h) {  // rows 0-3, then 4-7
      const __m128i* bh = b + 4 * h;
      q[4 * h + 0] = _mm_unpacklo_epi32(bh[0], bh[2]);  // columns 0, 1
      q[4 * h + 1] = _mm_unpackhi_epi32(bh[0], bh[2]);  // 2, 3
      q[4 * h + 2] = _mm_unpacklo_epi32(bh[1], bh[3]);  // 4, 5
      q[4 * h + 3] = _mm_unpackhi_epi32(bh[1], bh[3]);  // 6, 7
    }
    for (int64_t k = 0; k < 4; ++k) {
      col[2 * k] = _mm_unpacklo_epi64(q[k], q[k + 4]);
      col[2 * k + 1] = _mm_unpackhi_epi64(q[k], q[k + 4]);
    }
    // A bfloat16 is the high half of its float.
    for (int64_t j = 0; j < 8; ++j) {
      float* dst = tile + (c0 + j) * kTileRows;
      _mm_store_si128(reinterpret_cast<__m128i*>(dst), _mm_unpacklo_epi16(zero, col[j]));
      _mm_store_si128(reinterpret_cast<__m128i*>(dst + 4), _mm_unpackhi_epi16(zero, col[j]));
    }
  }
}

// The first `count` (1 to 8) words of v at dst.
inline void store_bf16_words(__m128i v, int64_t count, at::BFloat16* dst) {
  if (count == 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), v);
    return;
  }
  if (count & 4) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), v);
    v = _mm_srli_si128(v, 8);
    dst += 4;
  }
  if (count & 2) {
    const int32_t two = _mm_cvtsi128_si32(v);
    std::memcpy(dst, &two, sizeof(two));
    v = _mm_srli_si128(v, 4);
    dst += 2;
  }
  if (count & 1) {
    const uint16_t one = static_cast<uint16_t>(_mm_extract_epi16(v, 0));
    std::memcpy(dst, &one, sizeof(one));
  }
}

// Writes rows [0, live) of n columns at dst from column pairs:
// pairs[k * 8 + i] holds row i's bfloat16 columns 2k (low half) and 2k + 1
// (high half), bf16_merge_rounded's layout. Pair vectors are read in groups
// of 4, so `pairs` holds a multiple of 4 of them.
inline void store_bf16_tile(const uint32_t* pairs, int64_t live, int64_t n, at::BFloat16* dst) {
  for (int64_t c = 0; c < n; c += 8) {
    const uint32_t* p = pairs + (c / 2) * kTileRows;
    const auto load = [&](int64_t k) {
      return _mm256_load_si256(reinterpret_cast<const __m256i*>(p + k * kTileRows));
    };
    const __m256i m0 = load(0), m1 = load(1), m2 = load(2), m3 = load(3);
    // In each 128-bit lane (rows 0-3, rows 4-7): dwords of pair vectors
    // (0, 1) and (2, 3) interleaved, then their halves joined into rows.
    const __m256i e0 = _mm256_unpacklo_epi32(m0, m1);
    const __m256i e1 = _mm256_unpackhi_epi32(m0, m1);
    const __m256i e2 = _mm256_unpacklo_epi32(m2, m3);
    const __m256i e3 = _mm256_unpackhi_epi32(m2, m3);
    const __m256i rows_04 = _mm256_unpacklo_epi64(e0, e2);
    const __m256i rows_15 = _mm256_unpackhi_epi64(e0, e2);
    const __m256i rows_26 = _mm256_unpacklo_epi64(e1, e3);
    const __m256i rows_37 = _mm256_unpackhi_epi64(e1, e3);
    const __m128i row[8] = {
        _mm256_castsi256_si128(rows_04), _mm256_castsi256_si128(rows_15),
        _mm256_castsi256_si128(rows_26), _mm256_castsi256_si128(rows_37),
        _mm256_extracti128_si256(rows_04, 1), _mm256_extracti128_si256(rows_15, 1),
        _mm256_extracti128_si256(rows_26, 1), _mm256_extracti128_si256(rows_37, 1)};
    const int64_t count = std::min<int64_t>(8, n - c);
    for (int64_t i = 0; i < live; ++i) {
      store_bf16_words(row[i], count, dst + i * n + c);
    }
  }
}
#endif

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace pgext
