"""y = x · Wᵀ for an encoded W: the checks on x and out, and the choice of kernel."""

from __future__ import annotations

import numba
import numpy as np

from sparse_deploy.errors import InvalidInputError
from sparse_deploy.kernels._gemv import chunked_gemv, chunked_gemv_u8, csr_gemv
from sparse_deploy.kernels._simd import CHUNK, lane_columns
from sparse_deploy.kernels.formats import STORAGE, BitmaskMatrix, CSRMatrix, EncodedMatrix, NMMatrix, padded_cols

PREFETCH_BYTES = 16384  # how far ahead of the decode the kernels prefetch the packed values
_LANE_ORDER = {"fp32": None, "bf16": lane_columns(STORAGE["bf16"]), "int8": lane_columns(STORAGE["int8"])}


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


def gemv(M: EncodedMatrix, x: np.ndarray, out: np.ndarray | None = None, *, quantize_x: bool = True,
         prefetch_bytes: int = PREFETCH_BYTES) -> np.ndarray:
    """y = x · Wᵀ (the product a Linear layer computes): x [cols] -> y [rows], x [batch, cols] -> y [batch, rows].

    int8 weights (dense, bitmask, 2:4) multiply x quantized to uint8 per batch row, as ONNX Runtime's dynamic
    quantization does, with exact int32 sums (AVX512-VNNI where the CPU has it): x's rounding then bounds the
    error, |Δy| <= scale_x / 2 · Σ_j |W[r, j]|. quantize_x=False multiplies float32 x instead (exact in x,
    ~3x the instructions); int8 CSR always does. Runs on numba's thread pool (numba.set_num_threads); ``out``
    receives y when given."""
    if not isinstance(M, EncodedMatrix):
        raise InvalidInputError(f"M must be an encoded matrix (see sparse_deploy.kernels.encode), got "
                                f"{type(M).__name__}")
    rows, cols = M.shape
    x2 = _check_x(x, cols)
    result = _check_out(out, (rows,) if x.ndim == 1 else (x2.shape[0], rows))
    y = result.reshape(x2.shape[0], rows)
    x2 = np.ascontiguousarray(x2)
    ahead = max(int(prefetch_bytes), 0) // M.values.itemsize
    groups = min(rows, numba.get_num_threads())  # one contiguous row range per thread
    if isinstance(M, CSRMatrix):
        csr_gemv(M.values, M.row_start, M.indices, M.scales, x2, y, ahead, groups)
        return result
    if isinstance(M, BitmaskMatrix):
        aux = M.masks
    elif isinstance(M, NMMatrix):
        aux = M.meta
    else:
        aux = np.zeros(0, np.bool_)
    if M.dtype == "int8" and quantize_x:
        chunked_gemv_u8(M.values, M.row_start, aux, aux, M.scales, M.row_sums, x2, padded_cols(cols),
                        M.block_cols // CHUNK, y, ahead, groups)
    else:
        chunked_gemv(M.values, M.row_start, aux, aux, M.scales, x2, _LANE_ORDER[M.dtype], padded_cols(cols),
                     M.block_cols // CHUNK, y, ahead, groups)
    return result
