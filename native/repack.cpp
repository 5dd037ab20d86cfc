// What the runtime does at load with each packed weight, in place of numpy: the packed file layout -> the kernels'
// row layout, transposing (a MatMul's weight), without decoding the dense weight (the mask is transposed 8 x 8 bits
// at a time, then each nonzero is copied once); and the packed file layout -> the dense weight, for the packed
// weights that stay dense.
//
// Stored: a weight S [R, C] (R = K in, C = N out) as a bit stream over its flattened elements (bit i of byte i / 8
// least significant first marks S.flat[i] != 0) and its nonzero values in row-major order. Out: W = S^T [C, R] as
// the ops take it: mask [C, stride] (bit r of row c, stride >= ceil(R / 8)), values row by row, row_ptr [C + 1].
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// The 8 bits of the stream at bit offsets o .. o + 7 (bit j of the result: o + j), zero at and beyond limit.
inline unsigned bits8(const uint8_t* bits, int64_t o, int64_t limit) {
  if (o >= limit) return 0;
  const int64_t byte = o >> 3;
  const int shift = static_cast<int>(o & 7);
  unsigned v = bits[byte];
  if (shift != 0 && o + 8 - shift < limit) v |= unsigned(bits[byte + 1]) << 8;  // the next byte holds bits < limit
  v >>= shift;
  if (limit - o < 8) v &= (1u << (limit - o)) - 1u;
  return v & 0xFFu;
}

// Transposes an 8 x 8 bit matrix: bit 8a + b (byte a, bit b) <-> bit 8b + a (Hacker's Delight, 7-3).
inline uint64_t transpose8(uint64_t x) {
  x = (x & 0xAA55AA55AA55AA55ull) | ((x & 0x00AA00AA00AA00AAull) << 7) | ((x >> 7) & 0x00AA00AA00AA00AAull);
  x = (x & 0xCCCC3333CCCC3333ull) | ((x & 0x0000CCCC0000CCCCull) << 14) | ((x >> 14) & 0x0000CCCC0000CCCCull);
  x = (x & 0xF0F0F0F00F0F0F0Full) | ((x & 0x00000000F0F0F0F0ull) << 28) | ((x >> 28) & 0x00000000F0F0F0F0ull);
  return x;
}

// Pass 1 of the repack: W's mask from S's bits, 8 x 8 blocks at a time (byte rb of mask row c = the bits of S's rows
// 8rb .. 8rb + 7 in column c), and the nonzeros per row of S and per row of W (a column of S).
void transpose_mask(const uint8_t* bits, int64_t rows, int64_t cols, uint8_t* mask, int64_t stride,
                    int64_t* per_row, int64_t* per_col) {
  const int64_t total = rows * cols;
  for (int64_t r0 = 0; r0 < rows; r0 += 8) {
    for (int64_t c0 = 0; c0 < cols; c0 += 8) {
      const int64_t width = cols - c0 < 8 ? cols - c0 : 8;
      uint64_t block = 0;  // byte a: row r0 + a, columns c0 .. c0 + 7
      for (int a = 0; a < 8 && r0 + a < rows; ++a) {
        const unsigned row_bits = bits8(bits, (r0 + a) * cols + c0, std::min(total, (r0 + a) * cols + c0 + width));
        per_row[r0 + a] += __builtin_popcount(row_bits);
        block |= uint64_t(row_bits) << (8 * a);
      }
      block = transpose8(block);  // byte b: column c0 + b, rows r0 .. r0 + 7
      for (int64_t b = 0; b < width; ++b) {
        const uint8_t byte = static_cast<uint8_t>(block >> (8 * b));
        mask[(c0 + b) * stride + (r0 >> 3)] = byte;
        per_col[c0 + b] += __builtin_popcount(byte);
      }
    }
  }
}

// Pass 2: W's values, gathered: row c of W takes, for each set bit r of its mask row (pass 1), the next value of S's
// row r (read[r]: that row's cursor, an index into values). Rows of S are taken in bands of kBandRows, each band
// over all rows of W (pos[c]: row c's write cursor), so that the rows of S being read stay in the cache; each row of
// W is written in runs. (Scattering S's values to W's rows instead made the writes conflict in the cache where rows
// of W have equal counts, e.g. 1024 int8 each, and ran ~3x slower.)
constexpr int64_t kBandRows = 512;

template <typename T>
void gather_values(const T* src, int64_t rows, int64_t cols, const uint8_t* mask, int64_t stride,
                   const int64_t* row_ptr, int64_t* read /* [rows] */, int64_t* pos /* [cols] */, T* dst) {
  const int64_t words = (rows + 63) / 64;
  std::copy(row_ptr, row_ptr + cols, pos);
  for (int64_t w0 = 0; w0 < words; w0 += kBandRows / 64) {
    const int64_t w1 = std::min(words, w0 + kBandRows / 64);
    for (int64_t c = 0; c < cols; ++c) {
      const uint8_t* row_bits = mask + c * stride;
      T* out = dst + pos[c];
      for (int64_t w = w0; w < w1; ++w) {
        uint64_t word = 0;
        std::memcpy(&word, row_bits + 8 * w, sizeof(word));  // bits at and beyond rows are zero
        while (word) {
          *out++ = src[read[64 * w + __builtin_ctzll(word)]++];
          word &= word - 1;
        }
      }
      pos[c] = out - dst;
    }
  }
}

// The dense S.flat from the stream: branch-free over each byte of bits while 8 more values can be read, bit by bit
// near the end of the values.
template <typename T>
int64_t unpack(const uint8_t* bits, const void* values, int64_t nvalues, int64_t total, void* out) {
  const T* src = static_cast<const T*>(values);
  T* dst = static_cast<T*>(out);
  int64_t v = 0, i = 0;
  for (; i + 8 <= total && v + 8 <= nvalues; i += 8) {
    const unsigned b = bits[i >> 3];
    for (int j = 0; j < 8; ++j) {
      const unsigned bit = (b >> j) & 1u;
      const T value = src[v];  // read whether kept or not: v < nvalues here, and no branch to mispredict
      dst[i + j] = bit ? value : T(0);
      v += bit;
    }
  }
  for (; i < total; ++i) {
    if ((bits[i >> 3] >> (i & 7)) & 1u) {
      dst[i] = v < nvalues ? src[v] : T(0);
      ++v;
    } else {
      dst[i] = T(0);
    }
  }
  return v;
}

template <typename T>
int64_t repack_transposed(const uint8_t* bits, const T* values, int64_t nvalues, int64_t rows, int64_t cols,
                          uint8_t* mask, int64_t stride, T* out, int64_t* row_ptr) {
  std::vector<int64_t> read, pos;  // per row of S: its count of nonzeros, then the index of its next value
  try {
    read.assign(static_cast<size_t>(rows), 0);
    pos.assign(static_cast<size_t>(cols), 0);
  } catch (...) {
    return -1;
  }
  std::memset(mask, 0, static_cast<size_t>(cols * stride));
  std::memset(row_ptr, 0, static_cast<size_t>(cols + 1) * sizeof(int64_t));
  transpose_mask(bits, rows, cols, mask, stride, read.data(), row_ptr + 1);
  for (int64_t c = 0; c < cols; ++c) row_ptr[c + 1] += row_ptr[c];
  const int64_t nnz = row_ptr[cols];
  if (nnz != nvalues) return nnz;
  for (int64_t r = 0, start = 0; r < rows; ++r) {
    const int64_t count = read[static_cast<size_t>(r)];
    read[static_cast<size_t>(r)] = start;
    start += count;
  }
  gather_values(values, rows, cols, mask, stride, row_ptr, read.data(), pos.data(), out);
  return nnz;
}

}  // namespace

extern "C" {

// elem: bytes per value (1, 2, 4 or 8). Returns the number of nonzeros the bits mark (the caller checks it against
// the values it passed before trusting the output; values are read only when they match), or -1 when out of memory
// or for another elem.
__attribute__((visibility("default"))) int64_t SparseDeployRepackTransposed(const uint8_t* bits, const void* values,
                                                                            int64_t nvalues, int64_t rows,
                                                                            int64_t cols, int64_t elem,
                                                                            uint8_t* mask, int64_t stride,
                                                                            void* out, int64_t* row_ptr) {
  switch (elem) {
    case 1: return repack_transposed(bits, static_cast<const uint8_t*>(values), nvalues, rows, cols, mask, stride, static_cast<uint8_t*>(out), row_ptr);
    case 2: return repack_transposed(bits, static_cast<const uint16_t*>(values), nvalues, rows, cols, mask, stride, static_cast<uint16_t*>(out), row_ptr);
    case 4: return repack_transposed(bits, static_cast<const uint32_t*>(values), nvalues, rows, cols, mask, stride, static_cast<uint32_t*>(out), row_ptr);
    case 8: return repack_transposed(bits, static_cast<const uint64_t*>(values), nvalues, rows, cols, mask, stride, static_cast<uint64_t*>(out), row_ptr);
    default: return -1;
  }
}

// Writes the dense S.flat [total] to out (elem bytes per value: 1, 2, 4 or 8; every element written): the values in
// order at the set bits. Returns the number of set bits, which the caller checks against nvalues (no value past
// nvalues is read), or -1 for another elem.
__attribute__((visibility("default"))) int64_t SparseDeployUnpack(const uint8_t* bits, const void* values,
                                                                  int64_t nvalues, int64_t total, int64_t elem,
                                                                  void* out) {
  switch (elem) {
    case 1: return unpack<uint8_t>(bits, values, nvalues, total, out);
    case 2: return unpack<uint16_t>(bits, values, nvalues, total, out);
    case 4: return unpack<uint32_t>(bits, values, nvalues, total, out);
    case 8: return unpack<uint64_t>(bits, values, nvalues, total, out);
    default: return -1;
  }
}

}  // extern "C"
