// AVX-512 path (F, BW, VL, VBMI2, VNNI: Zen 4/5, Ice Lake and later). Compiled with per-function target
// attributes, so the rest of the library still runs on any x86-64; dispatch.cpp only calls it where supported.
//
// The mask decode costs one instruction per 16 floats / 64 int8: vexpandps / vpexpandb place the next kept values
// of the row at the set bits of the mask word, zeros elsewhere, so the product with the dense x needs no gather.
// R weight rows share each x load and give R independent pointer chains; MT rows of X share each expanded weight
// vector (prefill).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels.h"

// GCC 12 warns inside its own _mm512_reduce_add_* headers; nothing here is read uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#define SD_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx512vnni,popcnt,bmi,bmi2")))

namespace sparse_deploy {
namespace {

// ---- fp32 ----

#define SD_UNROLL _Pragma("GCC unroll 16")

// Software prefetch distance into each row's value stream: with R rows in flight the hardware prefetchers alone
// left the fp32 kernel at ~60% of the bandwidth it reaches with this (4096x4096, 50%, one thread).
constexpr int kPrefetchBytes = 1024;
constexpr int kPrefetchBytesInt8 = 16384;  // int8 rows are consumed 4x faster per step

// A plain load the compiler may not fold into the instruction that uses it (GCC turns load + vexpandps into the
// memory form, which is the slow one).
template <typename V>
SD_AVX512 inline V opaque(V v) {
  __asm__("" : "+v"(v));
  return v;
}

// One 16-column step: expand R rows' next values at their mask bits, multiply with MT rows of x.
// Fast: a full 16-float load then a register expand (the memory form of vexpandps is microcoded on AMD Zen); used
// only where that load cannot run past the end of values. Otherwise the fault-suppressing expand-load.
template <int R, int MT, bool Fast>
SD_AVX512 inline void f32_step(const float* x, int64_t k, __mmask16 xm, const uint16_t* bits, const float** vals,
                               __m512 (&acc)[MT][R]) {
  __m512 wv[R];
  SD_UNROLL for (int r = 0; r < R; ++r) {
    const __mmask16 b = bits[r];
    wv[r] = Fast ? _mm512_maskz_expand_ps(b, opaque(_mm512_loadu_ps(vals[r]))) : _mm512_maskz_expandloadu_ps(b, vals[r]);
    vals[r] += _mm_popcnt_u32(b);
    _mm_prefetch(reinterpret_cast<const char*>(vals[r]) + kPrefetchBytes, _MM_HINT_T0);
  }
  SD_UNROLL for (int m = 0; m < MT; ++m) {
    const __m512 xv = _mm512_maskz_loadu_ps(xm, x + m * k);
    SD_UNROLL for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(wv[r], xv, acc[m][r]);
  }
}

// Y[m0 .. m0+MT, n .. n+R] over the 16-column chunks [c0, c1) of K; vals (in/out) are the rows' value cursors.
template <int R, int MT, bool Fast>
SD_AVX512 inline void f32_tile(const float* x, int64_t k, const uint8_t* const* mask, const float** values,
                               int64_t c0, int64_t c1, float* out /* [MT][R] */) {
  const float* vals[R];  // local, so the pointer chains stay in registers
  SD_UNROLL for (int r = 0; r < R; ++r) vals[r] = values[r];
  __m512 acc[MT][R];
  SD_UNROLL for (int m = 0; m < MT; ++m) SD_UNROLL for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  const int64_t full = std::min(c1, k / 16);  // chunks with 16 columns inside K
  uint16_t bits[R];
  for (int64_t c = c0; c < full; ++c) {
    SD_UNROLL for (int r = 0; r < R; ++r) bits[r] = reinterpret_cast<const uint16_t*>(mask[r])[c];
    f32_step<R, MT, Fast>(x + c * 16, k, __mmask16(0xFFFF), bits, vals, acc);
  }
  if (full < c1) {
    SD_UNROLL for (int r = 0; r < R; ++r) bits[r] = reinterpret_cast<const uint16_t*>(mask[r])[full];
    f32_step<R, MT, false>(x + full * 16, k, __mmask16((1u << (k % 16)) - 1), bits, vals, acc);
  }
  SD_UNROLL for (int r = 0; r < R; ++r) values[r] = vals[r];
  SD_UNROLL for (int m = 0; m < MT; ++m) SD_UNROLL for (int r = 0; r < R; ++r) out[m * R + r] = _mm512_reduce_add_ps(acc[m][r]);
}

template <int R, int MT>
SD_AVX512 void f32_rows(const float* x, const SparseRows& w, const float** cursor, int64_t nnz, int64_t n,
                        int64_t c0, int64_t c1, float* y, int64_t ldy) {
  const uint8_t* mask[R];
  for (int r = 0; r < R; ++r) mask[r] = w.mask + (n + r) * w.mask_stride;
  float out[MT * R];
  if (w.row_ptr[n + R] + 16 <= nnz)
    f32_tile<R, MT, true>(x, w.k, mask, cursor, c0, c1, out);
  else
    f32_tile<R, MT, false>(x, w.k, mask, cursor, c0, c1, out);
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) y[m * ldy + n + r] += out[m * R + r];
}

// All rows n0..n1 for MT rows of X. With several rows of X, K is walked in blocks of kBlockChunks * 16 columns so
// those rows of x stay in L1 while every row of W passes over them.
constexpr int64_t kBlockChunks = 32;

template <int MT>
SD_AVX512 void f32_block(const float* x, const SparseRows& w, const float* values, const float* bias, int64_t n0,
                         int64_t n1, float* y, int64_t ldy, const float** cursor /* [n1 - n0] */) {
  constexpr int R = MT == 1 ? 4 : 2;
  const int64_t nnz = w.row_ptr[w.n_rows];
  const int64_t chunks = (w.k + 15) / 16;
  const int64_t step = MT == 1 ? chunks : kBlockChunks;
  for (int64_t n = n0; n < n1; ++n) {
    cursor[n - n0] = values + w.row_ptr[n];
    for (int m = 0; m < MT; ++m) y[m * ldy + n] = bias ? bias[n] : 0.0f;
  }
  for (int64_t c0 = 0; c0 < chunks; c0 += step) {
    const int64_t c1 = std::min(chunks, c0 + step);
    int64_t n = n0;
    for (; n + R <= n1; n += R) f32_rows<R, MT>(x, w, cursor + (n - n0), nnz, n, c0, c1, y, ldy);
    for (; n < n1; ++n) f32_rows<1, MT>(x, w, cursor + (n - n0), nnz, n, c0, c1, y, ldy);
  }
}

// ---- int8 ----

// vpdpbusd multiplies unsigned by signed bytes: the expanded weights are offset to u = w + 128 (one vpxor; the
// dropped positions become 128) and x stays signed, so sum(u * q) = sum(w * q) + 128 * sum(q) over all of the
// zero-padded row of x, subtracted once per row of x (xsum = 128 * sum(q)); every step exact in int32.
template <int R, int MT, bool Fast>
SD_AVX512 inline void int8_tile(const int8_t* xq, int64_t ldq, int64_t k, const uint8_t* const* mask,
                                const int8_t* const* values, const int32_t* xsum, int32_t* out /* [MT][R] */) {
  const int8_t* vals[R];  // local, so the pointer chains stay in registers
  SD_UNROLL for (int r = 0; r < R; ++r) vals[r] = values[r];
  __m512i acc[MT][R];
  SD_UNROLL for (int m = 0; m < MT; ++m) SD_UNROLL for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_si512();
  const __m512i u128 = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t words = (k + 63) / 64;
  for (int64_t wi = 0; wi < words; ++wi) {
    __m512i wu[R];
    SD_UNROLL for (int r = 0; r < R; ++r) {
      const uint64_t b = reinterpret_cast<const uint64_t*>(mask[r])[wi];
      const __m512i wv = Fast ? _mm512_maskz_expand_epi8(b, opaque(_mm512_loadu_si512(vals[r])))
                              : _mm512_maskz_expandloadu_epi8(b, vals[r]);
      wu[r] = _mm512_xor_si512(wv, u128);
      vals[r] += _mm_popcnt_u64(b);
      _mm_prefetch(reinterpret_cast<const char*>(vals[r]) + kPrefetchBytesInt8, _MM_HINT_T0);
    }
    SD_UNROLL for (int m = 0; m < MT; ++m) {
      const __m512i xv = _mm512_loadu_si512(xq + m * ldq + wi * 64);
      SD_UNROLL for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbusd_epi32(acc[m][r], wu[r], xv);
    }
  }
  SD_UNROLL for (int m = 0; m < MT; ++m) SD_UNROLL for (int r = 0; r < R; ++r)
    out[m * R + r] = _mm512_reduce_add_epi32(acc[m][r]) - xsum[m];
}

template <int R, int MT>
SD_AVX512 void int8_rows(const int8_t* xq, const float* x_scale, const int32_t* xsum, const SparseRows& w,
                         const int8_t* values, const float* w_scale, const float* bias, int64_t n, float* y,
                         int64_t ldy) {
  const uint8_t* mask[R];
  const int8_t* vals[R];
  row_starts<R>(w, values, n, mask, vals);
  int32_t out[MT * R];
  const int64_t ldq = quantized_stride_for(w.k);
  if (w.row_ptr[n + R] + 64 <= w.row_ptr[w.n_rows])
    int8_tile<R, MT, true>(xq, ldq, w.k, mask, vals, xsum, out);
  else
    int8_tile<R, MT, false>(xq, ldq, w.k, mask, vals, xsum, out);
  store_int8_tile<R, MT>(out, x_scale, w_scale, bias, n, y, ldy);
}

template <int MT>
SD_AVX512 void int8_block(const int8_t* xq, const float* x_scale, const SparseRows& w, const int8_t* values,
                          const float* w_scale, const float* bias, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  constexpr int R = MT == 1 ? 4 : 2;
  const int64_t ldq = quantized_stride_for(w.k);
  int32_t xsum[MT];  // 128 * sum(q) per row of x
  const __m512i ones = _mm512_set1_epi8(1);
  for (int m = 0; m < MT; ++m) {
    __m512i sum = _mm512_setzero_si512();
    for (int64_t i = 0; i < ldq; i += 64) sum = _mm512_dpbusd_epi32(sum, ones, _mm512_loadu_si512(xq + m * ldq + i));
    xsum[m] = 128 * _mm512_reduce_add_epi32(sum);
  }
  int64_t n = n0;
  for (; n + R <= n1; n += R) int8_rows<R, MT>(xq, x_scale, xsum, w, values, w_scale, bias, n, y, ldy);
  for (; n < n1; ++n) int8_rows<1, MT>(xq, x_scale, xsum, w, values, w_scale, bias, n, y, ldy);
}

constexpr int64_t kPrefillMinRows = 16;  // from this many rows of X: the decode-once GEMM of kernels_avx512_gemm.cpp
constexpr int64_t kMTile = 4;  // rows of X per expanded weight vector

}  // namespace

// quantize_rows of kernels_portable.cpp, 16 lanes at a time: the same IEEE division, round half to even and clamp,
// so the same int8 (max ignores NaN as fmax does; a NaN x gives -127 as there).
SD_AVX512 void quantize_rows_avx512(const float* x, int64_t m_rows, int64_t k, int8_t* xq, float* x_scale) {
  const int64_t ldq = quantized_stride_for(k);
  const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
  for (int64_t m = 0; m < m_rows; ++m) {
    const float* xr = x + m * k;
    int8_t* qr = xq + m * ldq;
    __m512 amax = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 16) {
      const __mmask16 in = i + 16 <= k ? __mmask16(0xFFFF) : __mmask16((1u << (k - i)) - 1);
      amax = _mm512_max_ps(_mm512_abs_ps(_mm512_maskz_loadu_ps(in, xr + i)), amax);
    }
    const float s = _mm512_reduce_max_ps(amax) / 127.0f;
    x_scale[m] = s;
    if (s == 0.0f || !std::isfinite(s)) {
      std::memset(qr, 0, static_cast<size_t>(ldq));
      continue;
    }
    const __m512 sv = _mm512_set1_ps(s);
    for (int64_t i = 0; i < ldq; i += 16) {  // zeros beyond K
      const __mmask16 in = i + 16 <= k ? __mmask16(0xFFFF) : i < k ? __mmask16((1u << (k - i)) - 1) : __mmask16(0);
      __m512 q = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(in, xr + i), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q = _mm512_min_ps(_mm512_max_ps(q, lo), hi);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + i), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q)));
    }
  }
}

SD_AVX512 void sparse_f32_avx512(const float* x, int64_t m_rows, const SparseRows& w, const float* values,
                                 const float* bias, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  if (m_rows >= kPrefillMinRows) return sparse_f32_prefill_avx512(x, m_rows, w, values, bias, n0, n1, y, ldy);
  std::vector<const float*> cursor(static_cast<size_t>(n1 - n0));
  int64_t m = 0;
  for (; m + kMTile <= m_rows; m += kMTile)
    f32_block<kMTile>(x + m * w.k, w, values, bias, n0, n1, y + m * ldy, ldy, cursor.data());
  for (; m < m_rows; ++m) f32_block<1>(x + m * w.k, w, values, bias, n0, n1, y + m * ldy, ldy, cursor.data());
}

SD_AVX512 void sparse_int8_avx512(const int8_t* xq, const float* x_scale, int64_t m_rows, const SparseRows& w,
                                  const int8_t* values, const float* w_scale, const float* bias, int64_t n0,
                                  int64_t n1, float* y, int64_t ldy) {
  if (m_rows >= kPrefillMinRows) return sparse_int8_prefill_avx512(xq, x_scale, m_rows, w, values, w_scale, bias, n0, n1, y, ldy);
  const int64_t ldq = quantized_stride_for(w.k);
  int64_t m = 0;
  for (; m + kMTile <= m_rows; m += kMTile)
    int8_block<kMTile>(xq + m * ldq, x_scale + m, w, values, w_scale, bias, n0, n1, y + m * ldy, ldy);
  for (; m < m_rows; ++m) int8_block<1>(xq + m * ldq, x_scale + m, w, values, w_scale, bias, n0, n1, y + m * ldy, ldy);
}

}  // namespace sparse_deploy
