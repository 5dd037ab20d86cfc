// AVX2 + FMA path (x86-64-v3: Haswell and later, AMD Zen 1-3). Per-function target attributes; dispatch.cpp only
// calls it where supported.
//
// fp32: each mask byte selects a row of two 256-entry tables: vpermps indices that move the next popcount(byte)
// values of the row to the byte's set bits, and a lane mask that zeroes the rest.
// int8: 16 columns (two mask bytes) per 128-bit lane: one pshufb expands the packed values; its control's halves
// are loaded straight from a table indexed by (values before the byte, byte), so no control is built in registers.
// The products are exact in int32 through the sign trick: pmaddubsw(|w|, sign(x, w)) pairs stay within
// +-2 * 127 * 127 < 32767, then pmaddwd with ones.
// R weight rows share each x load; MT rows of X share each expanded weight vector (int8 with several rows of X).
// fp32 prefill (16+ rows of X): panels of W decoded once and transposed, then a register-blocked GEMM.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "kernels.h"

#define SD_AVX2 __attribute__((target("avx2,fma,popcnt,bmi,bmi2")))
#define SD_UNROLL _Pragma("GCC unroll 16")

namespace sparse_deploy {
namespace {

// How far ahead of each row's cursor the value stream is prefetched. A row's values are contiguous with the next
// row's, so this runs into the rows of the following tiles (measured best on an AMD EPYC Zen 3; 1 KiB was 20% slower).
constexpr int kPrefetchBytes = 32768;      // fp32
constexpr int kPrefetchBytesInt8 = 16384;  // int8 rows are consumed 4x faster per step

struct ExpandTables {
  alignas(32) int32_t index[256][8];  // vpermps source lane for each destination lane
  alignas(32) int32_t keep[256][8];   // all ones where the bit is set
  // pshufb control for the 8 columns of mask byte b whose first value is the o-th byte of the lane's source
  // (o = 0..8 values of the lane's first byte before it): o + rank of each set bit, 0x80 (zero) elsewhere
  uint64_t shuffle[9][256];
};

constexpr ExpandTables make_tables() {
  ExpandTables t{};
  for (int b = 0; b < 256; ++b) {
    int rank = 0;
    for (int i = 0; i < 8; ++i) {
      const bool set = (b >> i) & 1;
      t.index[b][i] = set ? rank : 0;
      t.keep[b][i] = set ? -1 : 0;
      for (int o = 0; o < 9; ++o) t.shuffle[o][b] |= uint64_t(set ? o + rank : 0x80) << (8 * i);
      rank += set;
    }
  }
  return t;
}

constexpr ExpandTables kTables = make_tables();

template <typename V>
SD_AVX2 inline V opaque(V v) {
  __asm__("" : "+x"(v));
  return v;
}

SD_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

SD_AVX2 inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// ---- fp32 ----

// The 8 columns of mask byte b (count = popcount(b) set bits) with the next count values from p at its set bits,
// zeros elsewhere. Fast: 8 floats can be read at p; else only count are (a masked load).
template <bool Fast>
SD_AVX2 inline __m256 expand8(const float* p, unsigned b, int count) {
  const __m256 packed =
      Fast ? _mm256_loadu_ps(p)
           : _mm256_maskload_ps(p, _mm256_load_si256(reinterpret_cast<const __m256i*>(kTables.keep[(1u << count) - 1])));
  const __m256i index = _mm256_load_si256(reinterpret_cast<const __m256i*>(kTables.index[b]));
  const __m256 keep = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(kTables.keep[b])));
  return _mm256_and_ps(_mm256_permutevar8x32_ps(packed, index), keep);
}

// One 8-column step. Fast: an 8-float load that cannot run past the end of values; else a masked load.
template <int R, int MT, bool Fast>
SD_AVX2 inline void f32_step(const float* x, int64_t k, const __m256i* xm, const uint8_t* bits, const float** vals,
                             __m256 (&acc)[MT][R]) {
  __m256 wv[R];
  SD_UNROLL for (int r = 0; r < R; ++r) {
    const int count = _mm_popcnt_u32(bits[r]);
    wv[r] = expand8<Fast>(vals[r], bits[r], count);
    vals[r] += count;
    _mm_prefetch(reinterpret_cast<const char*>(vals[r]) + kPrefetchBytes, _MM_HINT_T0);
  }
  SD_UNROLL for (int m = 0; m < MT; ++m) {
    const __m256 xv = xm ? _mm256_maskload_ps(x + m * k, *xm) : _mm256_loadu_ps(x + m * k);
    SD_UNROLL for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(wv[r], xv, acc[m][r]);
  }
}

template <int R, int MT, bool Fast>
SD_AVX2 void f32_tile(const float* x, int64_t k, const uint8_t* const* mask, const float* const* values, float* out) {
  const float* vals[R];  // local, so the pointer chains stay in registers
  SD_UNROLL for (int r = 0; r < R; ++r) vals[r] = values[r];
  __m256 acc[MT][R];
  SD_UNROLL for (int m = 0; m < MT; ++m) SD_UNROLL for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  const int64_t full = k / 8;
  uint8_t bits[R];
  for (int64_t c = 0; c < full; ++c) {
    SD_UNROLL for (int r = 0; r < R; ++r) bits[r] = mask[r][c];
    f32_step<R, MT, Fast>(x + c * 8, k, nullptr, bits, vals, acc);
  }
  if (full * 8 < k) {
    SD_UNROLL for (int r = 0; r < R; ++r) bits[r] = mask[r][full];
    const __m256i tail = _mm256_load_si256(reinterpret_cast<const __m256i*>(kTables.keep[(1u << (k % 8)) - 1]));
    f32_step<R, MT, false>(x + full * 8, k, &tail, bits, vals, acc);
  }
  SD_UNROLL for (int m = 0; m < MT; ++m) SD_UNROLL for (int r = 0; r < R; ++r) out[m * R + r] = hsum(acc[m][r]);
}

template <int R, int MT>
SD_AVX2 void f32_rows(const float* x, const SparseRows& w, const float* values, const float* bias, int64_t n,
                      float* y, int64_t ldy) {
  const uint8_t* mask[R];
  const float* vals[R];
  row_starts<R>(w, values, n, mask, vals);
  float out[MT * R];
  if (w.row_ptr[n + R] + 8 <= w.row_ptr[w.n_rows])
    f32_tile<R, MT, true>(x, w.k, mask, vals, out);
  else
    f32_tile<R, MT, false>(x, w.k, mask, vals, out);
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) y[m * ldy + n + r] = out[m * R + r] + (bias ? bias[n + r] : 0.0f);
}

template <int MT>
SD_AVX2 void f32_block(const float* x, const SparseRows& w, const float* values, const float* bias, int64_t n0,
                       int64_t n1, float* y, int64_t ldy) {
  constexpr int R = MT == 1 ? 4 : 2;
  int64_t n = n0;
  for (; n + R <= n1; n += R) f32_rows<R, MT>(x, w, values, bias, n, y, ldy);
  for (; n < n1; ++n) f32_rows<1, MT>(x, w, values, bias, n, y, ldy);
}

// ---- fp32 prefill: decode a panel of W once, transposed, then a register-blocked GEMM over all rows of X ----
//
// A panel is kPanel rows of W over kPanelK columns, decoded into wp[k][kPanel] (zeros for missing rows and for
// columns beyond K). The micro-kernel keeps MR rows of X x kPanel outputs in 2 * MR accumulators: per column k it
// loads two vectors of the panel and broadcasts one x per row, so every load feeds 2 or MR FMAs.

constexpr int kPanel = 16;
constexpr int64_t kPanelK = 256;
constexpr int kMicroRows = 6;
constexpr int64_t kPrefillMinRows = 16;

// 8 x 8 transpose of rows r[0..7] (in place).
SD_AVX2 inline void transpose8(__m256 (&r)[8]) {
  __m256 t[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  __m256 u[8];
  for (int i = 0; i < 2; ++i) {
    u[4 * i + 0] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// Rows [0, rows) of the panel (cursors cur[r] advanced), columns [k0, k0 + kb) (k0 and kb multiples of 8, within
// the mask row) into wp[kb][kPanel].
SD_AVX2 void decode_panel(const uint8_t* const* mask, const float** cur, int rows, int64_t k0, int64_t kb, float* wp) {
  for (int64_t c = 0; c < kb; c += 8) {
    for (int half = 0; half < kPanel; half += 8) {
      __m256 r8[8];
      for (int i = 0; i < 8; ++i) {
        const int r = half + i;
        if (r >= rows) {
          r8[i] = _mm256_setzero_ps();
          continue;
        }
        const unsigned b = mask[r][(k0 + c) / 8];
        const int count = _mm_popcnt_u32(b);
        r8[i] = expand8<false>(cur[r], b, count);
        cur[r] += count;
      }
      transpose8(r8);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(wp + (c + i) * kPanel + half, r8[i]);
    }
  }
}

// y[i, 0..kPanel) += sum over k in [0, kn) of x[i, k] * wp[k, :] for the MR rows of X at x (row stride k_stride).
template <int MR>
SD_AVX2 void micro_tile(const float* x, int64_t k_stride, const float* wp, int64_t kn, float* y, int64_t ldy, int cols) {
  __m256 acc[MR][2];
  SD_UNROLL for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t kk = 0; kk < kn; ++kk) {
    const __m256 w0 = _mm256_loadu_ps(wp + kk * kPanel), w1 = _mm256_loadu_ps(wp + kk * kPanel + 8);
    SD_UNROLL for (int i = 0; i < MR; ++i) {
      const __m256 xb = _mm256_broadcast_ss(x + i * k_stride + kk);
      acc[i][0] = _mm256_fmadd_ps(w0, xb, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(w1, xb, acc[i][1]);
    }
  }
  SD_UNROLL for (int i = 0; i < MR; ++i) {
    float* yr = y + i * ldy;
    if (cols == kPanel) {
      _mm256_storeu_ps(yr, _mm256_add_ps(_mm256_loadu_ps(yr), acc[i][0]));
      _mm256_storeu_ps(yr + 8, _mm256_add_ps(_mm256_loadu_ps(yr + 8), acc[i][1]));
    } else {  // the last panel of the range: only its outputs are written
      alignas(32) float out[kPanel];
      _mm256_store_ps(out, acc[i][0]);
      _mm256_store_ps(out + 8, acc[i][1]);
      for (int j = 0; j < cols; ++j) yr[j] += out[j];
    }
  }
}

SD_AVX2 void micro_rows(const float* x, int64_t m_rows, int64_t k, const float* wp, int64_t kn, float* y, int64_t ldy,
                        int cols) {
  int64_t m = 0;
  for (; m + kMicroRows <= m_rows; m += kMicroRows) micro_tile<kMicroRows>(x + m * k, k, wp, kn, y + m * ldy, ldy, cols);
  switch (m_rows - m) {
    case 5: return micro_tile<5>(x + m * k, k, wp, kn, y + m * ldy, ldy, cols);
    case 4: return micro_tile<4>(x + m * k, k, wp, kn, y + m * ldy, ldy, cols);
    case 3: return micro_tile<3>(x + m * k, k, wp, kn, y + m * ldy, ldy, cols);
    case 2: return micro_tile<2>(x + m * k, k, wp, kn, y + m * ldy, ldy, cols);
    case 1: return micro_tile<1>(x + m * k, k, wp, kn, y + m * ldy, ldy, cols);
    default: return;
  }
}

SD_AVX2 void f32_prefill(const float* x, int64_t m_rows, const SparseRows& w, const float* values, const float* bias,
                         int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t kp = (w.k + 7) / 8 * 8;
  alignas(32) float wp[kPanelK * kPanel];  // 16 KiB: the decoded panel, reused for every K block
  for (int64_t nb = n0; nb < n1; nb += kPanel) {
    const int rows = static_cast<int>(std::min<int64_t>(kPanel, n1 - nb));
    const uint8_t* mask[kPanel];
    const float* cur[kPanel];
    for (int r = 0; r < rows; ++r) {
      mask[r] = w.mask + (nb + r) * w.mask_stride;
      cur[r] = values + w.row_ptr[nb + r];
    }
    for (int64_t m = 0; m < m_rows; ++m)
      for (int r = 0; r < rows; ++r) y[m * ldy + nb + r] = bias ? bias[nb + r] : 0.0f;
    for (int64_t k0 = 0; k0 < kp; k0 += kPanelK) {
      const int64_t kb = std::min(kPanelK, kp - k0);
      decode_panel(mask, cur, rows, k0, kb, wp);
      micro_rows(x + k0, m_rows, w.k, wp, std::min(kb, w.k - k0), y + nb, ldy, rows);
    }
  }
}

// ---- int8 ----

// The pshufb control for 16 columns (mask bytes b0, b1), from two table loads.
SD_AVX2 inline __m128i control16(unsigned b0, unsigned b1) {
  const __m128i lo = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(&kTables.shuffle[0][b0]));
  const double* hi = reinterpret_cast<const double*>(&kTables.shuffle[_mm_popcnt_u32(b0)][b1]);
  return _mm_castpd_si128(_mm_loadh_pd(_mm_castsi128_pd(lo), hi));
}

// 16 bytes from p; near the end of the values array only the n that exist, zeros after them.
template <bool Fast>
SD_AVX2 inline __m128i load16(const int8_t* p, int n) {
  if (Fast) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  alignas(16) int8_t buf[16] = {};
  for (int i = 0; i < n; ++i) buf[i] = p[i];
  return _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
}

template <int R, int MT, bool Fast>
SD_AVX2 void int8_tile(const int8_t* xq, int64_t ldq, int64_t k, const uint8_t* const* mask, const int8_t* const* values,
                       int32_t* out) {
  const int8_t* vals[R];  // local, so the pointer chains stay in registers
  SD_UNROLL for (int r = 0; r < R; ++r) vals[r] = values[r];
  __m256i acc[MT][R];
  SD_UNROLL for (int m = 0; m < MT; ++m) SD_UNROLL for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t groups = (k + 31) / 32;  // 32 columns: 4 mask bytes (mask rows are whole 64-bit words)
  for (int64_t g = 0; g < groups; ++g) {
    __m256i wv[R];
    SD_UNROLL for (int r = 0; r < R; ++r) {
      uint32_t bits;
      std::memcpy(&bits, mask[r] + 4 * g, 4);
      const unsigned b0 = bits & 0xff, b1 = (bits >> 8) & 0xff, b2 = (bits >> 16) & 0xff, b3 = bits >> 24;
      const int n_lo = _mm_popcnt_u32(bits & 0xffff), n_all = _mm_popcnt_u32(bits);
      const __m256i packed = _mm256_inserti128_si256(_mm256_castsi128_si256(load16<Fast>(vals[r], n_lo)),
                                                     load16<Fast>(vals[r] + n_lo, n_all - n_lo), 1);
      const __m256i control = _mm256_inserti128_si256(_mm256_castsi128_si256(control16(b0, b1)), control16(b2, b3), 1);
      wv[r] = _mm256_shuffle_epi8(packed, control);
      vals[r] += n_all;
      _mm_prefetch(reinterpret_cast<const char*>(vals[r]) + kPrefetchBytesInt8, _MM_HINT_T0);
    }
    SD_UNROLL for (int m = 0; m < MT; ++m) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * ldq + 32 * g));
      SD_UNROLL for (int r = 0; r < R; ++r) {
        const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(wv[r]), _mm256_sign_epi8(xv, wv[r]));
        acc[m][r] = _mm256_add_epi32(acc[m][r], _mm256_madd_epi16(pairs, ones));
      }
    }
  }
  SD_UNROLL for (int m = 0; m < MT; ++m) SD_UNROLL for (int r = 0; r < R; ++r) out[m * R + r] = hsum(acc[m][r]);
}

template <int R, int MT>
SD_AVX2 void int8_rows(const int8_t* xq, const float* x_scale, const SparseRows& w, const int8_t* values,
                       const float* w_scale, const float* bias, int64_t n, float* y, int64_t ldy) {
  const uint8_t* mask[R];
  const int8_t* vals[R];
  row_starts<R>(w, values, n, mask, vals);
  int32_t out[MT * R];
  const int64_t ldq = quantized_stride_for(w.k);
  if (w.row_ptr[n + R] + 32 <= w.row_ptr[w.n_rows])
    int8_tile<R, MT, true>(xq, ldq, w.k, mask, vals, out);
  else
    int8_tile<R, MT, false>(xq, ldq, w.k, mask, vals, out);
  store_int8_tile<R, MT>(out, x_scale, w_scale, bias, n, y, ldy);
}

template <int MT>
SD_AVX2 void int8_block(const int8_t* xq, const float* x_scale, const SparseRows& w, const int8_t* values,
                        const float* w_scale, const float* bias, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  constexpr int R = MT == 1 ? 4 : 2;
  int64_t n = n0;
  for (; n + R <= n1; n += R) int8_rows<R, MT>(xq, x_scale, w, values, w_scale, bias, n, y, ldy);
  for (; n < n1; ++n) int8_rows<1, MT>(xq, x_scale, w, values, w_scale, bias, n, y, ldy);
}

constexpr int64_t kMTile = 4;

}  // namespace

SD_AVX2 void sparse_f32_avx2(const float* x, int64_t m_rows, const SparseRows& w, const float* values,
                             const float* bias, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  if (m_rows >= kPrefillMinRows) return f32_prefill(x, m_rows, w, values, bias, n0, n1, y, ldy);
  int64_t m = 0;
  for (; m + kMTile <= m_rows; m += kMTile) f32_block<kMTile>(x + m * w.k, w, values, bias, n0, n1, y + m * ldy, ldy);
  for (; m < m_rows; ++m) f32_block<1>(x + m * w.k, w, values, bias, n0, n1, y + m * ldy, ldy);
}

SD_AVX2 void sparse_int8_avx2(const int8_t* xq, const float* x_scale, int64_t m_rows, const SparseRows& w,
                              const int8_t* values, const float* w_scale, const float* bias, int64_t n0, int64_t n1,
                              float* y, int64_t ldy) {
  const int64_t ldq = quantized_stride_for(w.k);
  int64_t m = 0;
  for (; m + kMTile <= m_rows; m += kMTile)
    int8_block<kMTile>(xq + m * ldq, x_scale + m, w, values, w_scale, bias, n0, n1, y + m * ldy, ldy);
  for (; m < m_rows; ++m) int8_block<1>(xq + m * ldq, x_scale + m, w, values, w_scale, bias, n0, n1, y + m * ldy, ldy);
}

}  // namespace sparse_deploy
