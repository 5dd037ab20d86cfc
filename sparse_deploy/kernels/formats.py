"""Weight formats for the CPU matrix-vector kernels, their encoders from a dense pruned matrix, and decoders back.

Every format holds a weight W [rows, cols] in one of three value types:

- ``fp32``: float32 values;
- ``bf16``: the top 16 bits of float32 (round to nearest even), stored as uint16 and widened in registers;
- ``int8``: symmetric per-row quantization, W[r] ≈ scales[r] · q[r] with q in [-127, 127].

Columns are padded with zeros to a multiple of 64 (one kernel step, one mask word). Arrays are C-contiguous;
those read as vectors start on a 64-byte boundary. ``row_start[r]`` is where row r's values begin, so any
thread can start at any row and a row block's values are contiguous.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar, Literal

import numpy as np

from sparse_deploy.errors import InvalidInputError

ValueType = Literal["fp32", "bf16", "int8"]
VALUE_TYPES: tuple[ValueType, ...] = ("fp32", "bf16", "int8")
STORAGE = {"fp32": np.dtype(np.float32), "bf16": np.dtype(np.uint16), "int8": np.dtype(np.int8)}
CHUNK = 64  # columns per mask word and per kernel step
PAD = 64  # spare zero values after packed arrays: vector reads near the end stay inside the array
ALIGN = 64  # bytes
MAX_CSR_COLS = 1 << 16  # column indices are uint16


def aligned_zeros(shape: int | tuple[int, ...], dtype) -> np.ndarray:
    """np.zeros whose data starts on a 64-byte boundary (numpy's own allocations are often 16 mod 64, which
    makes every 64-byte vector load straddle two cache lines)."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape))
    raw = np.zeros(size * dtype.itemsize + ALIGN, dtype=np.uint8)
    skip = -raw.ctypes.data % ALIGN
    return raw[skip : skip + size * dtype.itemsize].view(dtype).reshape(shape)


def padded_cols(cols: int) -> int:
    return -(-cols // CHUNK) * CHUNK


@dataclass(frozen=True, eq=False)
class EncodedMatrix:
    """What every format has: the logical shape, value type, packed values, row starts and int8 scales."""

    shape: tuple[int, int]
    dtype: ValueType
    values: np.ndarray  # STORAGE[dtype], 1-D, packed row after row, PAD zeros at the end
    row_start: np.ndarray  # int64 [rows + 1]: row r's values are values[row_start[r] : row_start[r + 1]]
    scales: np.ndarray  # float32 [rows] for int8, else empty

    format: ClassVar[str] = ""

    @property
    def nbytes(self) -> int:
        """Bytes of all arrays, i.e. what one matrix-vector product reads."""
        return sum(getattr(self, f.name).nbytes for f in fields(self) if isinstance(getattr(self, f.name), np.ndarray))


@dataclass(frozen=True, eq=False)
class DenseMatrix(EncodedMatrix):
    """Dense rows of padded_cols(cols) values: the baseline the sparse formats are measured against."""

    format: ClassVar[str] = "dense"


@dataclass(frozen=True, eq=False)
class BitmaskMatrix(EncodedMatrix):
    """A bit per weight and the nonzero values packed in row-major order.

    masks[r, c] bit j set <=> W[r, 64c + j] != 0; its value is the next one in the row's packed values, so the
    values of word c start at row_start[r] + popcount of the row's earlier words."""

    masks: np.ndarray  # uint64 [rows, padded_cols / 64]

    format: ClassVar[str] = "bitmask"


@dataclass(frozen=True, eq=False)
class NMMatrix(EncodedMatrix):
    """2:4 sparsity: two values kept in every aligned group of four columns, with their 2-bit in-group indices.

    Group g of a row keeps values[row_start[r] + 2g + {0, 1}] at columns 4g + i0 and 4g + i1 (i0 < i1), where
    nibble g of the row's metadata is i0 | i1 << 2 (nibble g is bits 4(g % 8).. of meta[r, g // 8])."""

    meta: np.ndarray  # uint32 [rows, padded_cols / 32]

    format: ClassVar[str] = "2:4"


@dataclass(frozen=True, eq=False)
class CSRMatrix(EncodedMatrix):
    """Compressed sparse rows with uint16 column indices (cols <= 65536)."""

    indices: np.ndarray  # uint16, aligned with values (PAD zeros at the end)

    format: ClassVar[str] = "csr"


def _check_weight(W: np.ndarray, dtype: str) -> np.ndarray:
    if dtype not in STORAGE:
        raise InvalidInputError(f"value type {dtype!r} is not supported; use one of {', '.join(VALUE_TYPES)}")
    W = np.asarray(W)
    if W.ndim != 2 or 0 in W.shape:
        raise InvalidInputError(f"weight must be a non-empty 2-D [rows, cols] array, got shape {W.shape}")
    if not np.issubdtype(W.dtype, np.floating):
        raise InvalidInputError(f"weight must be floating point, got {W.dtype}; convert it with .astype(np.float32)")
    W = W.astype(np.float32, copy=False)
    if not np.isfinite(W).all():
        raise InvalidInputError("weight contains NaN or inf; only finite weights can be encoded")
    return W


def quantize(W: np.ndarray, dtype: ValueType) -> tuple[np.ndarray, np.ndarray]:
    """(stored values [rows, cols] in STORAGE[dtype], scales float32 [rows] for int8 else empty)."""
    W = _check_weight(W, dtype)
    if dtype == "fp32":
        return W, np.zeros(0, np.float32)
    if dtype == "bf16":
        bits = W.view(np.uint32)
        rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))  # round to nearest even
        stored = (rounded >> np.uint32(16)).astype(np.uint16)
        if not np.isfinite(widen(stored, np.zeros(0, np.float32))).all():
            raise InvalidInputError("weight has values beyond the bf16 range (|w| > 3.39e38); scale it down first")
        return stored, np.zeros(0, np.float32)
    peak = np.abs(W).max(axis=1)
    scales = (peak / 127.0).astype(np.float32)  # symmetric per-row scale: q = round(w / s) in [-127, 127]
    safe = np.where(scales > 0, scales, np.float32(1.0))[:, None]
    q = np.clip(np.rint(W / safe), -127, 127).astype(np.int8)
    return q, scales


def widen(stored: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Stored values -> float32 (the exact value each kernel multiplies by)."""
    if stored.dtype == np.uint16:
        return (stored.astype(np.uint32) << np.uint32(16)).view(np.float32)
    if stored.dtype == np.int8:
        return stored.astype(np.float32) * scales.reshape(-1, *([1] * (stored.ndim - 1)))
    return stored.astype(np.float32, copy=True)


def _pad_rows(stored: np.ndarray) -> np.ndarray:
    """[rows, cols] -> [rows, padded_cols], zero padded, aligned."""
    rows, cols = stored.shape
    out = aligned_zeros((rows, padded_cols(cols)), stored.dtype)
    out[:, :cols] = stored
    return out


def _packed(values: np.ndarray) -> np.ndarray:
    out = aligned_zeros(values.size + PAD, values.dtype)
    out[: values.size] = values.reshape(-1)
    return out


def _row_start(counts: np.ndarray) -> np.ndarray:
    start = np.zeros(counts.size + 1, np.int64)
    np.cumsum(counts, out=start[1:])
    return start


def encode_dense(W: np.ndarray, dtype: ValueType = "fp32") -> DenseMatrix:
    stored, scales = quantize(W, dtype)
    padded = _pad_rows(stored)
    rows, width = padded.shape
    return DenseMatrix(W.shape, dtype, _packed(padded), np.arange(rows + 1, dtype=np.int64) * width, scales)


def encode_bitmask(W: np.ndarray, dtype: ValueType = "fp32") -> BitmaskMatrix:
    stored, scales = quantize(W, dtype)
    padded = _pad_rows(stored)
    bits = padded != 0  # [rows, padded_cols]; stored zeros (pruned, or rounded to 0) are not kept
    masks = np.packbits(bits, axis=1, bitorder="little").view("<u8")  # bit j of word c <-> column 64c + j
    return BitmaskMatrix(W.shape, dtype, _packed(padded[bits]), _row_start(bits.sum(axis=1)), scales,
                         np.ascontiguousarray(masks.astype(np.uint64)))


def encode_nm(W: np.ndarray, dtype: ValueType = "fp32") -> NMMatrix:
    """2:4: every aligned group of four columns must hold at most two nonzeros (after rounding to dtype)."""
    stored, scales = quantize(W, dtype)
    rows, cols = stored.shape
    if cols % 4:
        raise InvalidInputError(f"2:4 needs a multiple of 4 columns, got {cols}; pad the weight or use bitmask")
    groups = _pad_rows(stored).reshape(rows, -1, 4)  # [rows, padded_cols / 4, 4]
    nonzero = groups != 0
    crowded = nonzero.sum(axis=2) > 2
    if crowded.any():
        r, g = np.argwhere(crowded)[0]
        raise InvalidInputError(f"weight is not 2:4 sparse: row {r}, columns {4 * g}..{4 * g + 3} hold more than "
                                f"two nonzeros; prune with pattern 2:4 or use the bitmask format")
    # kept positions: the nonzeros first, then the lowest zero positions, each pair in increasing order
    order = np.argsort(~nonzero, axis=2, kind="stable")[:, :, :2]
    kept = np.sort(order, axis=2)  # [rows, groups, 2] = (i0, i1)
    values = np.take_along_axis(groups, kept, axis=2)
    nibbles = (kept[:, :, 0] | (kept[:, :, 1] << 2)).astype(np.uint32).reshape(rows, -1, 8)
    meta = np.zeros(nibbles.shape[:2], np.uint32)
    for k in range(8):  # nibble k of each word holds group 8·word + k
        meta |= nibbles[:, :, k] << np.uint32(4 * k)
    return NMMatrix(W.shape, dtype, _packed(values), np.arange(rows + 1, dtype=np.int64) * values.shape[1] * 2,
                    scales, meta)


def encode_csr(W: np.ndarray, dtype: ValueType = "fp32") -> CSRMatrix:
    stored, scales = quantize(W, dtype)
    rows, cols = stored.shape
    if cols > MAX_CSR_COLS:
        raise InvalidInputError(f"CSR stores uint16 column indices, so cols must be <= {MAX_CSR_COLS}, got {cols}; "
                                f"use the bitmask format")
    r, c = np.nonzero(stored)  # row-major order
    return CSRMatrix(W.shape, dtype, _packed(stored[r, c]), _row_start(np.bincount(r, minlength=rows)), scales,
                     _packed(c.astype(np.uint16)))


ENCODERS = {"dense": encode_dense, "bitmask": encode_bitmask, "2:4": encode_nm, "csr": encode_csr}


def encode(W: np.ndarray, format: str, dtype: ValueType = "fp32") -> EncodedMatrix:
    """Encode W [rows, cols] in ``format`` (dense, bitmask, 2:4 or csr) with ``dtype`` values."""
    if format not in ENCODERS:
        raise InvalidInputError(f"format {format!r} is not supported; use one of {', '.join(ENCODERS)}")
    return ENCODERS[format](W, dtype)


def decode(M: EncodedMatrix) -> np.ndarray:
    """The float32 [rows, cols] matrix the kernels multiply by (W rounded to the value type)."""
    rows, cols = M.shape
    width = padded_cols(cols)
    stored = np.zeros((rows, width), STORAGE[M.dtype])
    nnz = int(M.row_start[-1])
    if isinstance(M, DenseMatrix):
        stored[:] = M.values[:nnz].reshape(rows, width)
    elif isinstance(M, BitmaskMatrix):
        bits = np.unpackbits(M.masks.view(np.uint8), axis=1, bitorder="little").astype(bool)
        stored[bits] = M.values[:nnz]
    elif isinstance(M, NMMatrix):
        nibbles = (M.meta[:, :, None] >> (4 * np.arange(8, dtype=np.uint32))) & np.uint32(15)
        nibbles = nibbles.reshape(rows, -1)  # [rows, groups]
        kept = np.stack([nibbles & 3, nibbles >> 2], axis=2).astype(np.int64)
        groups = stored.reshape(rows, -1, 4)
        np.put_along_axis(groups, kept, M.values[:nnz].reshape(rows, -1, 2), axis=2)
    elif isinstance(M, CSRMatrix):
        row = np.repeat(np.arange(rows), np.diff(M.row_start))
        stored[row, M.indices[:nnz].astype(np.int64)] = M.values[:nnz]
    else:
        raise InvalidInputError(f"cannot decode {type(M).__name__}")
    return widen(stored[:, :cols], M.scales)
