"""y = x · Wᵀ for an encoded W: input checks, the copy of x the kernels read, and the kernel call."""

from __future__ import annotations

import numpy as np

from sparse_deploy.errors import InvalidInputError
from sparse_deploy.kernels._gemv import chunked_gemv, csr_gemv
from sparse_deploy.kernels._simd import CHUNK, lane_columns
from sparse_deploy.kernels.formats import (STORAGE, BitmaskMatrix, CSRMatrix, DenseMatrix, EncodedMatrix, NMMatrix,
                                           aligned_zeros, padded_cols)

PREFETCH_BYTES = 16384  # how far ahead of the decode the kernels prefetch the packed values


def _check_x(x: np.ndarray, cols: int) -> np.ndarray:
    """x [cols] or [batch, cols] float32 -> [batch, cols]."""
    if not isinstance(x, np.ndarray):
        raise InvalidInputError(f"x must be a numpy array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise InvalidInputError(f"x must be float32, got {x.dtype}; convert it with x.astype(np.float32)")
    if x.ndim not in (1, 2) or x.shape[-1] != cols or x.size == 0:
        raise InvalidInputError(f"x must have shape [{cols}] or [batch, {cols}] for a weight with {cols} columns, "
                                f"got {x.shape}")
    return x.reshape(1, cols) if x.ndim == 1 else x


def _check_out(out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if out is None:
        return np.empty(shape, np.float32)
    if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != shape or \
            not out.flags.c_contiguous or not out.flags.writeable:
        got = (out.shape, out.dtype) if isinstance(out, np.ndarray) else type(out).__name__
        raise InvalidInputError(f"out must be a writable C-contiguous float32 array of shape {shape}, got {got}")
    return out


def kernel_input(M: EncodedMatrix, x: np.ndarray) -> np.ndarray:
    """The x the kernel reads: float32 [batch, padded_cols], 64-byte aligned, zero padded, in the decoded lane
    order of M's value type (column order for fp32 and CSR)."""
    batch, cols = x.shape
    width = padded_cols(cols)
    out = aligned_zeros((batch, width), np.float32)
    if M.dtype == "fp32" or isinstance(M, CSRMatrix):
        out[:, :cols] = x
        return out
    padded = np.zeros((batch, width), np.float32)
    padded[:, :cols] = x
    np.take(padded.reshape(batch, -1, CHUNK), lane_columns(STORAGE[M.dtype]), axis=2,
            out=out.reshape(batch, -1, CHUNK))
    return out


def gemv(M: EncodedMatrix, x: np.ndarray, out: np.ndarray | None = None,
         prefetch_bytes: int = PREFETCH_BYTES) -> np.ndarray:
    """y = x · Wᵀ (the product a Linear layer computes): x [cols] -> y [rows], x [batch, cols] -> y [batch, rows].

    Runs on numba's thread pool (numba.set_num_threads); ``out`` receives y when given."""
    if not isinstance(M, EncodedMatrix):
        raise InvalidInputError(f"M must be an encoded matrix (see sparse_deploy.kernels.encode), got "
                                f"{type(M).__name__}")
    rows, cols = M.shape
    x2 = _check_x(x, cols)
    result = _check_out(out, (rows,) if x.ndim == 1 else (x2.shape[0], rows))
    y = result.reshape(x2.shape[0], rows)
    xk = kernel_input(M, x2)
    ahead = max(int(prefetch_bytes), 0) // M.values.itemsize
    if isinstance(M, CSRMatrix):
        csr_gemv(M.values, M.row_start, M.indices, M.scales, xk, y, ahead)
    else:
        aux = {BitmaskMatrix: lambda: M.masks, NMMatrix: lambda: M.meta,
               DenseMatrix: lambda: np.zeros(0, np.bool_)}[type(M)]()
        chunked_gemv(M.values, M.row_start, aux, aux, M.scales, xk, y, ahead)
    return result
