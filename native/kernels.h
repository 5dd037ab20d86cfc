// Sparse matrix products over the packed row layout; plain functions over raw pointers, no global state.
//
// Layout of a sparse weight W [N, K] (N outputs, K inputs):
//   mask     uint8 [N, mask_stride], mask_stride = 8 * ceil(K / 64): bit k of row n (byte k/8, bit k%8,
//            least significant first) is set where W[n, k] is kept; bits at k >= K are zero.
//   values   [nnz], the kept weights of row 0, then row 1, ... (row-major order).
//   row_ptr  int64 [N + 1], row n's values are values[row_ptr[n] : row_ptr[n + 1]].
// Every function computes Y[m, n] for the rows n in [n0, n1) and all m in [0, M), so callers split N over threads.
#pragma once

#include <cstddef>
#include <cstdint>

namespace sparse_deploy {

struct SparseRows {
  const uint8_t* mask;
  const int64_t* row_ptr;
  int64_t n_rows;       // N
  int64_t k;            // K
  int64_t mask_stride;  // bytes per mask row, 8 * ceil(K / 64)
};

inline int64_t mask_stride_for(int64_t k) { return 8 * ((k + 63) / 64); }
// Quantized activations are stored with rows padded to this many int8 (zeros beyond K).
inline int64_t quantized_stride_for(int64_t k) { return 64 * ((k + 63) / 64); }

// Where rows n .. n + R - 1 start: their mask rows and their first kept values (the tiles read R rows at once).
template <int R, typename T>
inline void row_starts(const SparseRows& w, const T* values, int64_t n, const uint8_t* (&mask)[R],
                       const T* (&vals)[R]) {
  for (int r = 0; r < R; ++r) {
    mask[r] = w.mask + (n + r) * w.mask_stride;
    vals[r] = values + w.row_ptr[n + r];
  }
}

// The int8 tiles' epilogue: y[m, n + r] = x_scale[m] * w_scale[n + r] * sums[m, r] (+ bias[n + r]).
template <int R, int MT>
inline void store_int8_tile(const int32_t* sums, const float* x_scale, const float* w_scale, const float* bias,
                            int64_t n, float* y, int64_t ldy) {
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r)
      y[m * ldy + n + r] =
          static_cast<float>(sums[m * R + r]) * (x_scale[m] * w_scale[n + r]) + (bias ? bias[n + r] : 0.0f);
}

// Y[m, n] = sum_k X[m, k] * W[n, k] (+ bias[n]); X is [M, K] contiguous, Y has row stride ldy; bias may be null.
using SparseF32Fn = void (*)(const float* x, int64_t m_rows, const SparseRows& w, const float* values,
                             const float* bias, int64_t n0, int64_t n1, float* y, int64_t ldy);

// Y[m, n] = x_scale[m] * w_scale[n] * sum_k xq[m, k] * W[n, k] (+ bias[n]), the sum exact in int32.
// xq is [M, quantized_stride_for(K)], zero-padded, from quantize_rows.
using SparseInt8Fn = void (*)(const int8_t* xq, const float* x_scale, int64_t m_rows, const SparseRows& w,
                              const int8_t* values, const float* w_scale, const float* bias, int64_t n0,
                              int64_t n1, float* y, int64_t ldy);

// Per row of X [M, K]: s = max|x| / 127, q = clamp(rint(x / s), -127, 127) (q = 0 where s = 0); writes xq with
// row stride quantized_stride_for(K), zero-padded.
void quantize_rows(const float* x, int64_t m_rows, int64_t k, int8_t* xq, float* x_scale);
void quantize_rows_avx512(const float* x, int64_t m_rows, int64_t k, int8_t* xq, float* x_scale);  // same result
using QuantizeFn = void (*)(const float* x, int64_t m_rows, int64_t k, int8_t* xq, float* x_scale);

// Checks the layout (row_ptr starts at 0, never decreases, ends at nnz, matches each row's bit count; no bits
// beyond K). Returns null when valid, else a static message.
const char* validate(const SparseRows& w, int64_t nnz);

void sparse_f32_portable(const float* x, int64_t m_rows, const SparseRows& w, const float* values,
                         const float* bias, int64_t n0, int64_t n1, float* y, int64_t ldy);
void sparse_int8_portable(const int8_t* xq, const float* x_scale, int64_t m_rows, const SparseRows& w,
                          const int8_t* values, const float* w_scale, const float* bias, int64_t n0, int64_t n1,
                          float* y, int64_t ldy);

void sparse_f32_avx2(const float* x, int64_t m_rows, const SparseRows& w, const float* values, const float* bias,
                     int64_t n0, int64_t n1, float* y, int64_t ldy);
void sparse_int8_avx2(const int8_t* xq, const float* x_scale, int64_t m_rows, const SparseRows& w,
                      const int8_t* values, const float* w_scale, const float* bias, int64_t n0, int64_t n1,
                      float* y, int64_t ldy);

void sparse_f32_avx512(const float* x, int64_t m_rows, const SparseRows& w, const float* values,
                       const float* bias, int64_t n0, int64_t n1, float* y, int64_t ldy);
void sparse_int8_avx512(const int8_t* xq, const float* x_scale, int64_t m_rows, const SparseRows& w,
                        const int8_t* values, const float* w_scale, const float* bias, int64_t n0, int64_t n1,
                        float* y, int64_t ldy);
// The AVX-512 path's kernels for many rows of X (prefill); sparse_*_avx512 call them from kPrefillMinRows rows on.
void sparse_f32_prefill_avx512(const float* x, int64_t m_rows, const SparseRows& w, const float* values,
                               const float* bias, int64_t n0, int64_t n1, float* y, int64_t ldy);
void sparse_int8_prefill_avx512(const int8_t* xq, const float* x_scale, int64_t m_rows, const SparseRows& w,
                                const int8_t* values, const float* w_scale, const float* bias, int64_t n0,
                                int64_t n1, float* y, int64_t ldy);

// The int8 prefill panel of the AVX-512 path, shared with the AMX path: kInt8Panel rows of W decoded over K blocks
// of kInt8KBlock bytes into [k/4][kInt8Panel][4 bytes] (dst points at the panel's column 16v for rows 16v..16v+15;
// rows <= 16, 64-byte chunks [c0, c1) of K; cursors advanced; fast: 64 bytes can be read past each row's cursor).
constexpr int kInt8Panel = 48;
constexpr int64_t kInt8KBlock = 512;
void decode_int8_panel_avx512(const uint8_t* const* mask, const int8_t** cur, int64_t rows, int64_t c0, int64_t c1,
                              int64_t ahead, bool fast, int32_t* dst);

// The AMX path (AVX-512 + AMX-INT8): the AVX-512 kernels, with int8 prefill multiplied in AMX tiles.
void sparse_int8_amx(const int8_t* xq, const float* x_scale, int64_t m_rows, const SparseRows& w,
                     const int8_t* values, const float* w_scale, const float* bias, int64_t n0, int64_t n1,
                     float* y, int64_t ldy);
// Asks Linux for the AMX tile state (once per process); false where the OS or the CPU refuses.
bool amx_enabled();

// The instruction-set paths; cpu_supports() asks the running CPU (and, for amx, the OS).
enum class Isa { portable, avx2, avx512, amx };
bool cpu_supports(Isa isa);
const char* isa_name(Isa isa);

struct KernelSet {
  Isa isa;
  SparseF32Fn f32;
  SparseInt8Fn int8;
  QuantizeFn quantize;
};
KernelSet kernels_for(Isa isa);

}  // namespace sparse_deploy
