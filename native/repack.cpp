// The packed file layout -> the kernels' row layout, transposing: what the runtime does at load for each packed
// MatMul weight, in one pass over the nonzeros instead of decoding the dense weight and transposing it.
//
// Stored: a weight S [R, C] (R = K in, C = N out) as a bit stream over its flattened elements (bit i of byte i / 8
// least significant first marks S.flat[i] != 0) and its nonzero values in row-major order. Out: W = S^T [C, R] as
// the ops take it: mask [C, stride] (bit r of row c, stride >= ceil(R / 8)), values row by row, row_ptr [C + 1].
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Calls visit(i) for every set bit i < total of the stream, in increasing order.
template <typename Visit>
void for_each_set_bit(const uint8_t* bits, int64_t total, Visit&& visit) {
  for (int64_t byte = 0, base = 0; base < total; ++byte, base += 8) {
    unsigned b = bits[byte];
    if (base + 8 > total) b &= (1u << (total - base)) - 1u;
    while (b) {
      visit(base + __builtin_ctz(b));
      b &= b - 1;
    }
  }
}

}  // namespace

extern "C" {

// elem: bytes per value (4 for fp32, 1 for int8). Returns the number of nonzeros the bits mark (the caller checks it
// against the values it passed before trusting the output), or -1 when out of memory.
__attribute__((visibility("default"))) int64_t SparseDeployRepackTransposed(const uint8_t* bits, const void* values,
                                                                            int64_t nvalues, int64_t rows,
                                                                            int64_t cols, int64_t elem,
                                                                            uint8_t* mask, int64_t stride,
                                                                            void* out, int64_t* row_ptr) {
  const int64_t total = rows * cols;
  std::vector<int64_t> next;
  try {
    next.assign(static_cast<size_t>(cols), 0);
  } catch (...) {
    return -1;
  }
  // pass 1: nonzeros per output row (a column of S)
  int64_t nnz = 0;
  for_each_set_bit(bits, total, [&](int64_t i) {
    ++next[static_cast<size_t>(i % cols)];
    ++nnz;
  });
  if (nnz != nvalues) return nnz;
  row_ptr[0] = 0;
  for (int64_t c = 0; c < cols; ++c) {
    row_ptr[c + 1] = row_ptr[c] + next[static_cast<size_t>(c)];
    next[static_cast<size_t>(c)] = row_ptr[c];
  }
  std::memset(mask, 0, static_cast<size_t>(cols * stride));
  // pass 2: each nonzero S[r, c], in stored order, goes to the end of W's row c so far
  const char* src = static_cast<const char*>(values);
  char* dst = static_cast<char*>(out);
  int64_t v = 0, r = 0, c0 = 0;  // S's row and the flat index of its first element
  for_each_set_bit(bits, total, [&](int64_t i) {
    while (i >= c0 + cols) {
      c0 += cols;
      ++r;
    }
    const int64_t c = i - c0;
    std::memcpy(dst + next[static_cast<size_t>(c)]++ * elem, src + v++ * elem, static_cast<size_t>(elem));
    mask[c * stride + (r >> 3)] |= static_cast<uint8_t>(1u << (r & 7));
  });
  return nnz;
}

}  // extern "C"
