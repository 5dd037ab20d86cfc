// Reference path: plain C++, no intrinsics. The SIMD paths are tested against it.
#include <cmath>
#include <cstring>

#include "kernels.h"

namespace sparse_deploy {

void quantize_rows(const float* x, int64_t m_rows, int64_t k, int8_t* xq, float* x_scale) {
  const int64_t ldq = quantized_stride_for(k);
  for (int64_t m = 0; m < m_rows; ++m) {
    const float* xr = x + m * k;
    int8_t* qr = xq + m * ldq;
    float amax = 0.0f;
    for (int64_t i = 0; i < k; ++i) amax = std::fmax(amax, std::fabs(xr[i]));
    const float s = amax / 127.0f;
    x_scale[m] = s;
    std::memset(qr, 0, static_cast<size_t>(ldq));
    if (s == 0.0f || !std::isfinite(s)) continue;
    for (int64_t i = 0; i < k; ++i) {
      const float q = std::nearbyint(xr[i] / s);  // round half to even, as numpy.rint
      qr[i] = static_cast<int8_t>(std::fmin(127.0f, std::fmax(-127.0f, q)));
    }
  }
}

const char* validate(const SparseRows& w, int64_t nnz) {
  if (w.row_ptr[0] != 0) return "row_ptr[0] must be 0";
  if (w.row_ptr[w.n_rows] != nnz) return "row_ptr[N] must equal the number of values";
  const int64_t full_bytes = w.k / 8;
  const int tail_bits = static_cast<int>(w.k % 8);
  for (int64_t n = 0; n < w.n_rows; ++n) {
    const uint8_t* row = w.mask + n * w.mask_stride;
    if (tail_bits && (row[full_bytes] >> tail_bits)) return "mask has bits set beyond K";
    for (int64_t b = full_bytes + (tail_bits ? 1 : 0); b < w.mask_stride; ++b)
      if (row[b]) return "mask has bits set beyond K";
    int64_t count = 0;
    for (int64_t b = 0; b < w.mask_stride; b += 8) {
      uint64_t word;
      std::memcpy(&word, row + b, 8);
      count += __builtin_popcountll(word);
    }
    if (w.row_ptr[n + 1] - w.row_ptr[n] != count) return "row_ptr does not match the bits set in each mask row";
  }
  return nullptr;
}

void sparse_f32_portable(const float* x, int64_t m_rows, const SparseRows& w, const float* values,
                         const float* bias, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* mask = w.mask + n * w.mask_stride;
    for (int64_t m = 0; m < m_rows; ++m) {
      const float* xr = x + m * w.k;
      const float* v = values + w.row_ptr[n];
      float acc = 0.0f;
      for (int64_t k = 0; k < w.k; ++k)
        if (mask[k >> 3] >> (k & 7) & 1) acc += *v++ * xr[k];
      y[m * ldy + n] = acc + (bias ? bias[n] : 0.0f);
    }
  }
}

void sparse_int8_portable(const int8_t* xq, const float* x_scale, int64_t m_rows, const SparseRows& w,
                          const int8_t* values, const float* w_scale, const float* bias, int64_t n0, int64_t n1,
                          float* y, int64_t ldy) {
  const int64_t ldq = quantized_stride_for(w.k);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* mask = w.mask + n * w.mask_stride;
    for (int64_t m = 0; m < m_rows; ++m) {
      const int8_t* qr = xq + m * ldq;
      const int8_t* v = values + w.row_ptr[n];
      int32_t acc = 0;
      for (int64_t k = 0; k < w.k; ++k)
        if (mask[k >> 3] >> (k & 7) & 1) acc += int32_t{*v++} * int32_t{qr[k]};
      y[m * ldy + n] = static_cast<float>(acc) * (x_scale[m] * w_scale[n]) + (bias ? bias[n] : 0.0f);
    }
  }
}

}  // namespace sparse_deploy
