"""Matrix-vector kernels for pruned weights on the CPU (numpy + numba; no torch, so the runtime can use them).

    M = encode(W, "bitmask", "bf16")   # or encode_bitmask / encode_nm (2:4) / encode_csr / encode_dense
    y = gemv(M, x)                      # x [cols] or [batch, cols] float32 -> y = x · Wᵀ
    W_rounded = decode(M)               # the float32 matrix the kernel multiplies by
"""

from sparse_deploy.kernels.formats import (VALUE_TYPES, BitmaskMatrix, CSRMatrix, DenseMatrix, EncodedMatrix,
                                           NMMatrix, ValueType, decode, encode, encode_bitmask, encode_csr,
                                           encode_dense, encode_nm, quantize)
from sparse_deploy.kernels.multiply import gemv

FORMATS = ("dense", "bitmask", "2:4", "csr")

__all__ = ["FORMATS", "VALUE_TYPES", "BitmaskMatrix", "CSRMatrix", "DenseMatrix", "EncodedMatrix", "NMMatrix",
           "ValueType", "decode", "encode", "encode_bitmask", "encode_csr", "encode_dense", "encode_nm", "gemv",
           "quantize"]
