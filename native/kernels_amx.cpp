// AMX path (Intel Sapphire Rapids and later: AVX-512 + AMX-TILE + AMX-INT8). Everything is the AVX-512 path except
// int8 prefill: the panel of W decoded by kernels_avx512_gemm.cpp ([k/4][48 rows of W][4 bytes], which is the
// layout AMX reads B tiles in) is multiplied with 16 rows of X at a time by tdpbssd (signed x signed bytes, exact
// int32 sums: no offset and no correction), 16 x 16 int32 per tile, three tiles across the panel.
//
// The tile configuration is per thread and ONNX Runtime's own AMX kernels configure a thread once and keep it, so
// each call saves the thread's configuration, loads its own and restores the saved one (or releases the tiles where
// none was loaded) before returning.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels.h"

// GCC 12 warns inside its own AVX-512 headers; nothing here is read uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define SD_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi2,avx512vnni,amx-tile,amx-int8")))

namespace sparse_deploy {
namespace {

constexpr int64_t kMinRows = 16;  // from this many rows of X; fewer take the AVX-512 kernels
constexpr int kTile = 16;         // rows of a tile; a B tile's row holds 16 columns x 4 bytes of K
constexpr int kNT = kInt8Panel / kTile;  // C tiles across a panel
// Tiles (GCC takes their numbers as literals): C 0, 1, 2 (16 rows of X x 16 rows of W, int32); A = 3 (16 rows of
// X x 64 bytes of K); B = 4 (16 rows of 4 bytes of K x 16 rows of W).
static_assert(kNT == 3, "three C tiles across a panel");

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Saves the thread's tile configuration and loads one of 8 tiles of 16 rows x 64 bytes (the one ONNX Runtime's AMX
// GEMM uses too); the destructor puts the saved one back.
class Tiles {
 public:
  SD_AMX Tiles() {
    _tile_storeconfig(&saved_);
    TileConfig mine{};
    mine.palette_id = 1;
    for (int t = 0; t < 8; ++t) {
      mine.rows[t] = kTile;
      mine.colsb[t] = 64;
    }
    _tile_loadconfig(&mine);
  }
  SD_AMX ~Tiles() {
    if (saved_.palette_id != 0)
      _tile_loadconfig(&saved_);
    else
      _tile_release();
  }
  Tiles(const Tiles&) = delete;
  Tiles& operator=(const Tiles&) = delete;

 private:
  TileConfig saved_{};
};

// sums [mp][kInt8Panel] (+)= X [mp rows, stride ldq] x panel over kc bytes of K (first: start from zero).
SD_AMX void panel_product(const int8_t* x, int64_t mp, int64_t ldq, const int32_t* panel, int64_t kc, bool first,
                          int32_t* sums) {
  constexpr int64_t ldp = kInt8Panel * sizeof(int32_t);  // bytes per row of the panel and of sums
  for (int64_t m = 0; m < mp; m += kTile) {
    int32_t* c = sums + m * kInt8Panel;
    if (first) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
    } else {
      _tile_loadd(0, c, ldp);
      _tile_loadd(1, c + kTile, ldp);
      _tile_loadd(2, c + 2 * kTile, ldp);
    }
    for (int64_t s = 0; s < kc / 64; ++s) {
      const int32_t* b = panel + s * kTile * kInt8Panel;  // rows 16s .. 16s + 15 of [k/4]
      _tile_loadd(3, x + m * ldq + 64 * s, ldq);
      _tile_loadd(4, b, ldp);
      _tile_dpbssd(0, 3, 4);
      _tile_loadd(4, b + kTile, ldp);
      _tile_dpbssd(1, 3, 4);
      _tile_loadd(4, b + 2 * kTile, ldp);
      _tile_dpbssd(2, 3, 4);
    }
    _tile_stored(0, c, ldp);
    _tile_stored(1, c + kTile, ldp);
    _tile_stored(2, c + 2 * kTile, ldp);
  }
}

template <typename V>
SD_AMX inline V opaque(V v) {  // keeps GCC from fusing the epilogue's multiply and add into an FMA
  __asm__("" : "+v"(v));
  return v;
}

// y[m, nb + j] = (x_scale[m] * w_scale[nb + j]) * sums[m][j] (+ bias), rounded as the reference rounds.
SD_AMX void finish(const int32_t* sums, int64_t m_rows, int64_t rows, const float* x_scale, const float* w_scale,
                   const float* bias, float* y, int64_t ldy) {
  for (int v = 0; v < kNT && kTile * v < rows; ++v) {
    const int64_t left = rows - kTile * v;
    const __mmask16 cols = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    const __m512 ws = _mm512_maskz_loadu_ps(cols, w_scale + kTile * v);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(cols, bias + kTile * v) : _mm512_setzero_ps();
    for (int64_t m = 0; m < m_rows; ++m) {
      const __m512 s = _mm512_mul_ps(_mm512_set1_ps(x_scale[m]), ws);
      const __m512 sum = _mm512_cvtepi32_ps(_mm512_loadu_si512(sums + m * kInt8Panel + kTile * v));
      _mm512_mask_storeu_ps(y + m * ldy + kTile * v, cols, _mm512_add_ps(opaque(_mm512_mul_ps(sum, s)), b));
    }
  }
}

SD_AMX void int8_prefill_amx(const int8_t* xq, const float* x_scale, int64_t m_rows, const SparseRows& w,
                             const int8_t* values, const float* w_scale, const float* bias, int64_t n0, int64_t n1,
                             float* y, int64_t ldy) {
  const int64_t ldq = quantized_stride_for(w.k);  // a multiple of 64: whole A tiles along K
  const int64_t nnz = w.row_ptr[w.n_rows];
  const int64_t mp = (m_rows + kTile - 1) / kTile * kTile;
  std::vector<int8_t> padded;  // X with zero rows up to whole tiles
  if (mp != m_rows) {
    padded.assign(static_cast<size_t>(mp * ldq), 0);
    std::memcpy(padded.data(), xq, static_cast<size_t>(m_rows * ldq));
    xq = padded.data();
  }
  std::vector<int32_t> panel(static_cast<size_t>(kInt8KBlock / 4 * kInt8Panel));
  std::vector<int32_t> sums(static_cast<size_t>(mp * kInt8Panel));
  const uint8_t* mask[kInt8Panel];
  const int8_t* cur[kInt8Panel];
  Tiles tiles;
  for (int64_t nb = n0; nb < n1; nb += kInt8Panel) {
    const int64_t rows = std::min<int64_t>(kInt8Panel, n1 - nb);
    const int64_t ahead = w.row_ptr[nb + rows] - w.row_ptr[nb];  // as the AVX-512 prefill: the next panel's values
    for (int64_t i = 0; i < rows; ++i) {
      mask[i] = w.mask + (nb + i) * w.mask_stride;
      cur[i] = values + w.row_ptr[nb + i];
    }
    for (int64_t k0 = 0; k0 < ldq; k0 += kInt8KBlock) {
      const int64_t kc = std::min(kInt8KBlock, ldq - k0);
      for (int v = 0; v < kNT && kTile * v < rows; ++v) {  // columns of the panel past its rows are not stored
        const int64_t rv = std::min<int64_t>(kTile, rows - kTile * v);
        const bool fast = w.row_ptr[nb + kTile * v + rv] + 64 <= nnz;
        decode_int8_panel_avx512(&mask[kTile * v], &cur[kTile * v], rv, k0 / 64, (k0 + kc) / 64, ahead, fast,
                                 panel.data() + kTile * v);
      }
      panel_product(xq + k0, mp, ldq, panel.data(), kc, k0 == 0, sums.data());
    }
    finish(sums.data(), m_rows, rows, x_scale, w_scale + nb, bias ? bias + nb : nullptr, y + nb, ldy);
  }
}

}  // namespace

bool amx_enabled() {
#if defined(__x86_64__) && defined(__linux__)
  constexpr long kReqXcompPerm = 0x1023;  // ARCH_REQ_XCOMP_PERM
  constexpr long kXtileData = 18;         // XFEATURE_XTILEDATA
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-int8")) return false;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;  // idempotent: granted once per process
#else
  return false;
#endif
}

SD_AMX void sparse_int8_amx(const int8_t* xq, const float* x_scale, int64_t m_rows, const SparseRows& w,
                            const int8_t* values, const float* w_scale, const float* bias, int64_t n0, int64_t n1,
                            float* y, int64_t ldy) {
  if (m_rows < kMinRows) return sparse_int8_avx512(xq, x_scale, m_rows, w, values, w_scale, bias, n0, n1, y, ldy);
  int8_prefill_amx(xq, x_scale, m_rows, w, values, w_scale, bias, n0, n1, y, ldy);
}

}  // namespace sparse_deploy
