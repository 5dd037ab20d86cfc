// AVX-512 path (placeholder until the vector kernels land: runs the reference code).
#include "kernels.h"

namespace sparse_deploy {

void sparse_f32_avx512(const float* x, int64_t m_rows, const SparseRows& w, const float* values, const float* bias,
                     int64_t n0, int64_t n1, float* y, int64_t ldy) {
  sparse_f32_portable(x, m_rows, w, values, bias, n0, n1, y, ldy);
}
void sparse_int8_avx512(const int8_t* xq, const float* x_scale, int64_t m_rows, const SparseRows& w,
                      const int8_t* values, const float* w_scale, const float* bias, int64_t n0, int64_t n1,
                      float* y, int64_t ldy) {
  sparse_int8_portable(xq, x_scale, m_rows, w, values, w_scale, bias, n0, n1, y, ldy);
}

}  // namespace sparse_deploy
