// AVX-512 prefill (many rows of X): a panel of W is decoded once into a dense, transposed buffer, then multiplied
// with all rows of X by a register-blocked outer-product tile, as a dense GEMM does; the decode is amortised over
// the M rows instead of being repeated per few rows of X.
//
// fp32: the panel is kPanel rows of W (= columns of Y) x kKBlock columns of K, packed [k][n]; the tile is kMR rows
// of X x kPanel columns of Y, 24 accumulators, per k three panel loads, kMR broadcasts of x and 24 FMAs. Y is the
// accumulator between K blocks; each K block of X (M x 256 floats) stays in L2 while every panel passes over it.
// int8 (VNNI): the panel is packed [k/4][n][4 bytes] (vpdpbusd sums 4 bytes per 32-bit lane) over K blocks of 512,
// the exact int32 sums kept in a small [M][kPanel] buffer between blocks and scaled once; x is offset to u = q + 128
// (vpdpbusd multiplies unsigned by signed bytes) and 128 * sum(w) per row, from the same packed vectors, subtracted.
// A panel over all of K (196-528 KiB, written then read from L2) made M = 16 cost ~30% more.
//
// Both decode 16 rows x 16 lanes at a time with the register vexpandps / vpexpandb of kernels_avx512.cpp, then
// transpose that 16 x 16 block of 32-bit lanes in registers.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels.h"

// GCC 12 warns inside its own AVX-512 headers; nothing here is read uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#define SD_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx512vnni,popcnt,bmi,bmi2")))
#define SD_UNROLL _Pragma("GCC unroll 16")

namespace sparse_deploy {
namespace {

constexpr int kNV = kInt8Panel / 16;  // 16-lane vectors across a panel
constexpr int kPanel = kInt8Panel;     // rows of W decoded together
constexpr int kMR = 8;                 // rows of X per register tile
constexpr int64_t kKBlock = 256;       // fp32: columns of K per packed panel (48 KiB)
constexpr int64_t kKBlockInt8 = kInt8KBlock;  // int8: columns of K per packed panel (24 KiB), int32 sums kept between
// Software prefetch distance into each row's value stream. fp32 visits a row for one K block per pass over all
// panels, too far apart for the hardware prefetchers: this fetches the row's next block while the pass runs
// (4096x4096, M = 128, the decode alone: 10 -> 5 ms). int8 streams 16 rows at once.
constexpr int kPrefetchBytes = 1024;

template <typename V>
SD_AVX512 inline V opaque(V v) {  // keeps GCC from folding load + expand into the slow memory form
  __asm__("" : "+v"(v));
  return v;
}

// r[i] holds row i (16 lanes); afterwards r[j] holds lane j of every row.
SD_AVX512 inline void transpose16(__m512i (&r)[16]) {
  __m512i t[16];
  SD_UNROLL for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  SD_UNROLL for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // r[4q + j]: lanes j, j+4, j+8, j+12 of rows 4q .. 4q+3, one per 128-bit lane
  SD_UNROLL for (int q = 0; q < 2; ++q) SD_UNROLL for (int j = 0; j < 4; ++j) {
    t[8 * q + j] = _mm512_shuffle_i32x4(r[8 * q + j], r[8 * q + 4 + j], 0x88);
    t[8 * q + 4 + j] = _mm512_shuffle_i32x4(r[8 * q + j], r[8 * q + 4 + j], 0xDD);
  }
  SD_UNROLL for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xDD);
  }
}

// Lanes of the 16-lane vector v of a panel that hold real rows of W.
inline __mmask16 lanes(int64_t rows, int v) {
  const int64_t n = std::max<int64_t>(0, std::min<int64_t>(16, rows - 16 * v));
  return __mmask16((1u << n) - 1);
}

// ---- fp32 ----

// Decodes 16-column chunks [c0, c1) of `rows` (<= 16) rows into dst[(c - c0) * 16 + j][i], row stride kPanel.
template <bool Fast>
SD_AVX512 void decode_f32(const uint8_t* const* mask, const float** cur, int64_t rows, int64_t c0, int64_t c1,
                          float* dst) {
  for (int64_t i = 0; i < rows; ++i) _mm_prefetch(reinterpret_cast<const char*>(mask[i]) + 2 * c1, _MM_HINT_T0);  // the next K block
  for (int64_t c = c0; c < c1; ++c) {
    __m512i r[16];
    SD_UNROLL for (int i = 0; i < 16; ++i) {
      if (i >= rows) {
        r[i] = _mm512_setzero_si512();
        continue;
      }
      const __mmask16 b = reinterpret_cast<const uint16_t*>(mask[i])[c];
      const __m512 e = Fast ? _mm512_maskz_expand_ps(b, opaque(_mm512_loadu_ps(cur[i])))
                            : _mm512_maskz_expandloadu_ps(b, cur[i]);
      r[i] = _mm512_castps_si512(e);
      cur[i] += _mm_popcnt_u32(b);
      _mm_prefetch(reinterpret_cast<const char*>(cur[i]) + kPrefetchBytes, _MM_HINT_T0);
    }
    transpose16(r);
    float* out = dst + (c - c0) * 16 * kPanel;
    SD_UNROLL for (int j = 0; j < 16; ++j) _mm512_storeu_si512(out + j * kPanel, r[j]);
  }
}

// y[m, 0 .. kPanel) += x[m, 0 .. kc) . panel over MR rows of x (row stride ldx).
template <int MR>
SD_AVX512 void f32_tile(const float* x, int64_t ldx, const float* panel, int64_t kc, float* y, int64_t ldy,
                        const __mmask16 (&cols)[kNV]) {
  __m512 acc[MR][kNV];
  SD_UNROLL for (int m = 0; m < MR; ++m) SD_UNROLL for (int v = 0; v < kNV; ++v) acc[m][v] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < kc; ++kk) {
    __m512 wv[kNV];
    SD_UNROLL for (int v = 0; v < kNV; ++v) wv[v] = _mm512_loadu_ps(panel + kk * kPanel + 16 * v);
    SD_UNROLL for (int m = 0; m < MR; ++m) {
      const __m512 xb = _mm512_set1_ps(x[m * ldx + kk]);
      SD_UNROLL for (int v = 0; v < kNV; ++v) acc[m][v] = _mm512_fmadd_ps(wv[v], xb, acc[m][v]);
    }
  }
  SD_UNROLL for (int m = 0; m < MR; ++m) SD_UNROLL for (int v = 0; v < kNV; ++v) {
    float* o = y + m * ldy + 16 * v;
    _mm512_mask_storeu_ps(o, cols[v], _mm512_add_ps(_mm512_maskz_loadu_ps(cols[v], o), acc[m][v]));
  }
}

SD_AVX512 void f32_tiles(const float* x, int64_t m_rows, int64_t ldx, const float* panel, int64_t kc, float* y,
                         int64_t ldy, const __mmask16 (&cols)[kNV]) {
  int64_t m = 0;
  for (; m + kMR <= m_rows; m += kMR) f32_tile<kMR>(x + m * ldx, ldx, panel, kc, y + m * ldy, ldy, cols);
  x += m * ldx;
  y += m * ldy;
  switch (m_rows - m) {
    case 7: return f32_tile<7>(x, ldx, panel, kc, y, ldy, cols);
    case 6: return f32_tile<6>(x, ldx, panel, kc, y, ldy, cols);
    case 5: return f32_tile<5>(x, ldx, panel, kc, y, ldy, cols);
    case 4: return f32_tile<4>(x, ldx, panel, kc, y, ldy, cols);
    case 3: return f32_tile<3>(x, ldx, panel, kc, y, ldy, cols);
    case 2: return f32_tile<2>(x, ldx, panel, kc, y, ldy, cols);
    case 1: return f32_tile<1>(x, ldx, panel, kc, y, ldy, cols);
  }
}

// ---- int8 ----

// Decodes 64-byte chunks [c0, c1) of `rows` (<= 16) rows into dst[((c - c0) * 16 + j) * kPanel + i] as 4-byte
// groups (bytes 4j .. 4j+3 of chunk c of row i); corr (in/out) gets 128 * the sum of each row's bytes.
template <bool Fast>
SD_AVX512 void decode_int8(const uint8_t* const* mask, const int8_t** cur, int64_t rows, int64_t c0, int64_t c1,
                           int64_t ahead, int32_t* dst, __m512i* corr) {
  const __m512i u128 = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i sums[4] = {*corr, _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};  // 4 chains
  for (int64_t c = c0; c < c1; ++c) {
    __m512i r[16];
    SD_UNROLL for (int i = 0; i < 16; ++i) {
      if (i >= rows) {
        r[i] = _mm512_setzero_si512();
        continue;
      }
      const __mmask64 b = reinterpret_cast<const uint64_t*>(mask[i])[c];
      r[i] = Fast ? _mm512_maskz_expand_epi8(b, opaque(_mm512_loadu_si512(cur[i])))
                  : _mm512_maskz_expandloadu_epi8(b, cur[i]);
      cur[i] += _mm_popcnt_u64(b);
      _mm_prefetch(reinterpret_cast<const char*>(cur[i]) + ahead, _MM_HINT_T1);
    }
    transpose16(r);
    int32_t* out = dst + (c - c0) * 16 * kPanel;
    SD_UNROLL for (int j = 0; j < 16; ++j) {
      _mm512_storeu_si512(out + j * kPanel, r[j]);
      sums[j % 4] = _mm512_dpbusd_epi32(sums[j % 4], u128, r[j]);
    }
  }
  *corr = _mm512_add_epi32(_mm512_add_epi32(sums[0], sums[1]), _mm512_add_epi32(sums[2], sums[3]));
}

// The sums of MR rows of x (u = q + 128, row stride ldq) with the panel over k4 steps of 4 bytes, added to part
// ([MR][kPanel] int32, null for the first K block). Into part again, or, when last, finished into y.
struct Int8Out {
  const __m512i* corr;  // [kNV], 128 * sum(w) per row of W
  const float* x_scale;
  const float* w_scale;
  const float* bias;
  float* y;
  int64_t ldy;
  const __mmask16* cols;  // [kNV]
};

template <int MR>
SD_AVX512 void int8_tile(const uint8_t* xu, int64_t ldq, const int32_t* panel, int64_t k4s, int32_t* part,
                         bool first, bool last, const Int8Out& o) {
  __m512i acc[MR][kNV];
  SD_UNROLL for (int m = 0; m < MR; ++m) SD_UNROLL for (int v = 0; v < kNV; ++v)
    acc[m][v] = first ? _mm512_setzero_si512() : _mm512_loadu_si512(part + m * kPanel + 16 * v);
  for (int64_t k4 = 0; k4 < k4s; ++k4) {
    __m512i wv[kNV];
    SD_UNROLL for (int v = 0; v < kNV; ++v) wv[v] = _mm512_loadu_si512(panel + k4 * kPanel + 16 * v);
    SD_UNROLL for (int m = 0; m < MR; ++m) {
      int32_t x4;
      std::memcpy(&x4, xu + m * ldq + 4 * k4, 4);
      const __m512i xb = _mm512_set1_epi32(x4);
      SD_UNROLL for (int v = 0; v < kNV; ++v) acc[m][v] = _mm512_dpbusd_epi32(acc[m][v], xb, wv[v]);
    }
  }
  if (!last) {
    SD_UNROLL for (int m = 0; m < MR; ++m) SD_UNROLL for (int v = 0; v < kNV; ++v)
      _mm512_storeu_si512(part + m * kPanel + 16 * v, acc[m][v]);
    return;
  }
  SD_UNROLL for (int v = 0; v < kNV; ++v) {
    const __m512 ws = _mm512_maskz_loadu_ps(o.cols[v], o.w_scale + 16 * v);
    const __m512 b = o.bias ? _mm512_maskz_loadu_ps(o.cols[v], o.bias + 16 * v) : _mm512_setzero_ps();
    SD_UNROLL for (int m = 0; m < MR; ++m) {
      // as the reference: (xs * ws), then * sum, then + bias, each rounded (opaque: GCC would fuse into an FMA)
      const __m512 s = _mm512_mul_ps(_mm512_set1_ps(o.x_scale[m]), ws);
      const __m512 sum = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[m][v], o.corr[v]));
      _mm512_mask_storeu_ps(o.y + m * o.ldy + 16 * v, o.cols[v], _mm512_add_ps(opaque(_mm512_mul_ps(sum, s)), b));
    }
  }
}

SD_AVX512 void int8_tiles(const uint8_t* xu, int64_t m_rows, int64_t ldq, const int32_t* panel, int64_t k4s,
                          int32_t* part, bool first, bool last, Int8Out o) {
  int64_t m = 0;
  for (; m + kMR <= m_rows; m += kMR, o.x_scale += kMR, o.y += kMR * o.ldy)
    int8_tile<kMR>(xu + m * ldq, ldq, panel, k4s, part + m * kPanel, first, last, o);
  xu += m * ldq;
  part += m * kPanel;
  switch (m_rows - m) {
    case 7: return int8_tile<7>(xu, ldq, panel, k4s, part, first, last, o);
    case 6: return int8_tile<6>(xu, ldq, panel, k4s, part, first, last, o);
    case 5: return int8_tile<5>(xu, ldq, panel, k4s, part, first, last, o);
    case 4: return int8_tile<4>(xu, ldq, panel, k4s, part, first, last, o);
    case 3: return int8_tile<3>(xu, ldq, panel, k4s, part, first, last, o);
    case 2: return int8_tile<2>(xu, ldq, panel, k4s, part, first, last, o);
    case 1: return int8_tile<1>(xu, ldq, panel, k4s, part, first, last, o);
  }
}

}  // namespace

SD_AVX512 void decode_int8_panel_avx512(const uint8_t* const* mask, const int8_t** cur, int64_t rows, int64_t c0,
                                        int64_t c1, int64_t ahead, bool fast, int32_t* dst) {
  __m512i corr = _mm512_setzero_si512();  // not needed by the callers of this one
  if (fast)
    decode_int8<true>(mask, cur, rows, c0, c1, ahead, dst, &corr);
  else
    decode_int8<false>(mask, cur, rows, c0, c1, ahead, dst, &corr);
}

SD_AVX512 void sparse_f32_prefill_avx512(const float* x, int64_t m_rows, const SparseRows& w, const float* values,
                                         const float* bias, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t nnz = w.row_ptr[w.n_rows];
  const int64_t chunks = (w.k + 15) / 16;
  std::vector<const float*> cursor(static_cast<size_t>(n1 - n0));
  std::vector<const uint8_t*> mask(static_cast<size_t>(n1 - n0));
  for (int64_t n = n0; n < n1; ++n) {
    cursor[n - n0] = values + w.row_ptr[n];
    mask[n - n0] = w.mask + n * w.mask_stride;
  }
  for (int64_t m = 0; m < m_rows; ++m)  // row by row: a column walk touches a page per row of Y
    for (int64_t n = n0; n < n1; ++n) y[m * ldy + n] = bias ? bias[n] : 0.0f;
  std::vector<float> panel(static_cast<size_t>(kKBlock * kPanel));
  for (int64_t k0 = 0; k0 < w.k; k0 += kKBlock) {
    const int64_t kc = std::min(kKBlock, w.k - k0);
    const int64_t c0 = k0 / 16, c1 = std::min(chunks, c0 + kKBlock / 16);
    for (int64_t nb = n0; nb < n1; nb += kPanel) {
      const int64_t rows = std::min<int64_t>(kPanel, n1 - nb);
      for (int v = 0; v < kNV && 16 * v < rows; ++v) {
        const int64_t r0 = nb - n0 + 16 * v, rv = std::min<int64_t>(16, rows - 16 * v);
        if (w.row_ptr[nb + 16 * v + rv] + 16 <= nnz)
          decode_f32<true>(&mask[r0], &cursor[r0], rv, c0, c1, panel.data() + 16 * v);
        else
          decode_f32<false>(&mask[r0], &cursor[r0], rv, c0, c1, panel.data() + 16 * v);
      }
      __mmask16 cols[kNV];
      for (int v = 0; v < kNV; ++v) cols[v] = lanes(rows, v);
      f32_tiles(x + k0, m_rows, w.k, panel.data(), kc, y + nb, ldy, cols);
    }
  }
}

SD_AVX512 void sparse_int8_prefill_avx512(const int8_t* xq, const float* x_scale, int64_t m_rows,
                                          const SparseRows& w, const int8_t* values, const float* w_scale,
                                          const float* bias, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t ldq = quantized_stride_for(w.k);
  const int64_t nnz = w.row_ptr[w.n_rows];
  std::vector<uint8_t> xu(static_cast<size_t>(m_rows * ldq));  // u = q + 128
  const __m512i u128 = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t i = 0; i < m_rows * ldq; i += 64)
    _mm512_storeu_si512(xu.data() + i, _mm512_xor_si512(_mm512_loadu_si512(xq + i), u128));
  std::vector<int32_t> panel(static_cast<size_t>(kKBlockInt8 / 4 * kPanel));
  std::vector<int32_t> part(static_cast<size_t>(m_rows * kPanel));  // int32 sums between K blocks
  const uint8_t* mask[kPanel];
  const int8_t* cur[kPanel];
  for (int64_t nb = n0; nb < n1; nb += kPanel) {
    const int64_t rows = std::min<int64_t>(kPanel, n1 - nb);
    __m512i corr[kNV];
    __mmask16 cols[kNV];
    bool fast[kNV];
    for (int v = 0; v < kNV; ++v) {
      corr[v] = _mm512_setzero_si512();
      cols[v] = lanes(rows, v);
      const int64_t rv = std::max<int64_t>(0, std::min<int64_t>(16, rows - 16 * v));
      fast[v] = w.row_ptr[nb + 16 * v + rv] + 64 <= nnz;
    }
    // Each row prefetches the same place in the next panel's values (contiguous after this panel's), so the
    // next panel's rows start in L2 rather than as 48 cold streams.
    const int64_t ahead = w.row_ptr[nb + rows] - w.row_ptr[nb];
    for (int64_t i = 0; i < rows; ++i) {
      mask[i] = w.mask + (nb + i) * w.mask_stride;
      cur[i] = values + w.row_ptr[nb + i];
    }
    for (int64_t k0 = 0; k0 < ldq; k0 += kKBlockInt8) {
      const int64_t kc = std::min(kKBlockInt8, ldq - k0);
      for (int v = 0; v < kNV && 16 * v < rows; ++v) {
        const int64_t rv = std::min<int64_t>(16, rows - 16 * v);
        if (fast[v])
          decode_int8<true>(&mask[16 * v], &cur[16 * v], rv, k0 / 64, (k0 + kc) / 64, ahead, panel.data() + 16 * v, &corr[v]);
        else
          decode_int8<false>(&mask[16 * v], &cur[16 * v], rv, k0 / 64, (k0 + kc) / 64, ahead, panel.data() + 16 * v, &corr[v]);
      }
      const Int8Out out{corr, x_scale, w_scale + nb, bias ? bias + nb : nullptr, y + nb, ldy, cols};
      int8_tiles(xu.data() + k0, m_rows, ldq, panel.data(), kc / 4, part.data(), k0 == 0, k0 + kc == ldq, out);
    }
  }
}

}  // namespace sparse_deploy
