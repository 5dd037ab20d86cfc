"""Weight formats for the CPU matrix-vector kernels, their encoders from a dense pruned matrix, and decoders back.

Every format holds a weight W [rows, cols] in one of three value types:

- ``fp32``: float32 values;
- ``bf16``: the top 16 bits of float32 (round to nearest even), stored as uint16 and widened in registers;
- ``int8``: symmetric per-row quantization, W[r] ≈ scales[r] · q[r] with q in [-127, 127].

Columns are padded with zeros to a multiple of 64 (one kernel step, one mask word) and cut into column blocks
of ``block_cols`` (1024 by default, 4096 for int8): block k holds columns [k·block_cols, (k+1)·block_cols) of
every row and is stored whole before block k + 1, row after row. A kernel works through one block at a time, so
the slice of x it multiplies by stays in the L1 cache, while each thread still streams one contiguous range of
values per block. ``row_start[k, r]`` (the popcount prefix, for the bitmask) is where row r's values of
block k begin, so any thread can start at any row of any block. Arrays start on a 64-byte boundary.
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
# columns per block, so that the x a block multiplies stays in a 48 KiB L1: float32 x [4, 1024] is 16 KiB; int8
# weights multiply uint8 x, and [4, 4096] is 16 KiB (fewer, longer blocks save per-row work)
BLOCK_COLS = {"fp32": 1024, "bf16": 1024, "int8": 4096}
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
    block_cols: int  # a multiple of 64
    values: np.ndarray  # STORAGE[dtype], 1-D: block after block, row after row, PAD zeros at the end
    row_start: np.ndarray  # int64 [blocks, rows + 1]: row r's values of block k begin at values[row_start[k, r]]
    scales: np.ndarray  # float32 [rows] for int8, else empty
    row_sums: np.ndarray  # int32 [rows] Σ_j q[r, j] for int8 (the zero-point term of uint8 x · int8 W), else empty

    format: ClassVar[str] = ""

    @property
    def blocks(self) -> int:
        return self.row_start.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of all arrays, i.e. what one matrix-vector product reads."""
        return sum(getattr(self, f.name).nbytes for f in fields(self) if isinstance(getattr(self, f.name), np.ndarray))


@dataclass(frozen=True, eq=False)
class DenseMatrix(EncodedMatrix):
    """All padded_cols(cols) values of each row: the baseline the sparse formats are measured against."""

    format: ClassVar[str] = "dense"


@dataclass(frozen=True, eq=False)
class BitmaskMatrix(EncodedMatrix):
    """A bit per weight, and the nonzero values packed in column order.

    Mask word c of row r in block k (c counts 64-column chunks inside the block, of which the block has n) is
    masks[rows·(block_cols/64)·k + n·r + c]; its bit j is set <=> W[r, k·block_cols + 64c + j] != 0. The values
    of that word start at row_start[k, r] + the popcount of the row's earlier words in the block."""

    masks: np.ndarray  # uint64, 1-D: block after block, row after row

    format: ClassVar[str] = "bitmask"


@dataclass(frozen=True, eq=False)
class NMMatrix(EncodedMatrix):
    """2:4 sparsity: two values kept in every aligned group of four columns, with their 2-bit in-group indices.

    Group g of row r in block k (g counts groups inside the block) keeps values[row_start[k, r] + 2g + {0, 1}]
    at block columns 4g + i0 and 4g + i1 (i0 < i1), where i0 | i1 << 2 is nibble g of the row's metadata in the
    block: bits 4(g % 8).. of meta[2·(rows·(block_cols/64)·k + n·r) + g // 8], n the block's 64-column chunks."""

    meta: np.ndarray  # uint32, 1-D: block after block, row after row

    format: ClassVar[str] = "2:4"


@dataclass(frozen=True, eq=False)
class CSRMatrix(EncodedMatrix):
    """Compressed sparse rows with uint16 column indices (cols <= 65536), in a single block."""

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


def row_sums(stored: np.ndarray) -> np.ndarray:
    """int32 [rows]: the sum of each row's int8 values; empty for other value types."""
    return stored.sum(axis=1, dtype=np.int32) if stored.dtype == np.int8 else np.zeros(0, np.int32)


def widen(stored: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Stored values -> float32 (the exact value each kernel multiplies by)."""
    if stored.dtype == np.uint16:
        return (stored.astype(np.uint32) << np.uint32(16)).view(np.float32)
    if stored.dtype == np.int8:
        return stored.astype(np.float32) * scales.reshape(-1, *([1] * (stored.ndim - 1)))
    return stored.astype(np.float32, copy=True)


def _pad_rows(stored: np.ndarray) -> np.ndarray:
    """[rows, cols] -> [rows, padded_cols], zero padded."""
    rows, cols = stored.shape
    out = np.zeros((rows, padded_cols(cols)), stored.dtype)
    out[:, :cols] = stored
    return out


def _packed(values: np.ndarray) -> np.ndarray:
    """A 1-D aligned copy with PAD zeros after the end."""
    out = aligned_zeros(values.size + PAD, values.dtype)
    out[: values.size] = values.reshape(-1)
    return out


def _check_block_cols(block_cols: int | None, dtype: str) -> int:
    if block_cols is None:
        return BLOCK_COLS.get(dtype, 1024)
    if isinstance(block_cols, bool) or not isinstance(block_cols, (int, np.integer)) or block_cols <= 0 or \
            block_cols % CHUNK:
        raise InvalidInputError(f"block_cols must be a positive multiple of {CHUNK}, got {block_cols!r}")
    return int(block_cols)


def _slabs(padded: np.ndarray, block_cols: int):
    """(block index, first column, [rows, block width] view) for each column block."""
    for k, c0 in enumerate(range(0, padded.shape[1], block_cols)):
        yield k, c0, padded[:, c0 : c0 + block_cols]


def _encode_blocks(stored: np.ndarray, block_cols: int, encode_slab) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pad, cut into column blocks, encode each: encode_slab(slab) -> (packed values, values per row, aux words).
    Returns (values, row_start [blocks, rows + 1], aux), each concatenated block after block."""
    padded = _pad_rows(stored)
    rows = padded.shape[0]
    values, starts, aux = [], [], []
    base = 0
    for _, _, slab in _slabs(padded, block_cols):
        packed, counts, words = encode_slab(slab)
        start = np.empty(rows + 1, np.int64)
        start[0] = base
        np.cumsum(counts, out=start[1:])  # row r's values of this block begin after rows 0..r-1
        start[1:] += base
        base = int(start[-1])
        values.append(packed.reshape(-1))
        starts.append(start)
        aux.append(words.reshape(-1))
    return _packed(np.concatenate(values)), np.stack(starts), _packed(np.concatenate(aux))[: sum(a.size for a in aux)]


def _dense_slab(slab):
    return slab, np.full(slab.shape[0], slab.shape[1]), np.zeros(0, np.uint8)


def _bitmask_slab(slab):
    bits = slab != 0  # stored zeros (pruned, or rounded to 0) are not kept
    words = np.packbits(bits, axis=1, bitorder="little").view("<u8")  # bit j of word c <-> column 64c + j
    return slab[bits], bits.sum(axis=1), words.astype(np.uint64)


def _nm_slab(slab):
    rows = slab.shape[0]
    groups = slab.reshape(rows, -1, 4)  # [rows, groups, 4]
    nonzero = groups != 0
    # kept positions: the nonzeros first, then the lowest zero positions, each pair in increasing order
    kept = np.sort(np.argsort(~nonzero, axis=2, kind="stable")[:, :, :2], axis=2)  # [rows, groups, 2] = (i0, i1)
    nibbles = (kept[:, :, 0] | (kept[:, :, 1] << 2)).astype(np.uint32).reshape(rows, -1, 8)
    meta = np.zeros(nibbles.shape[:2], np.uint32)
    for k in range(8):  # nibble k of a word holds group 8·word + k
        meta |= nibbles[:, :, k] << np.uint32(4 * k)
    return np.take_along_axis(groups, kept, axis=2), np.full(rows, slab.shape[1] // 2), meta


def encode_dense(W: np.ndarray, dtype: ValueType = "fp32", block_cols: int | None = None) -> DenseMatrix:
    block_cols = _check_block_cols(block_cols, dtype)
    stored, scales = quantize(W, dtype)
    values, row_start, _ = _encode_blocks(stored, block_cols, _dense_slab)
    return DenseMatrix(stored.shape, dtype, block_cols, values, row_start, scales, row_sums(stored))


def encode_bitmask(W: np.ndarray, dtype: ValueType = "fp32", block_cols: int | None = None) -> BitmaskMatrix:
    block_cols = _check_block_cols(block_cols, dtype)
    stored, scales = quantize(W, dtype)
    values, row_start, masks = _encode_blocks(stored, block_cols, _bitmask_slab)
    return BitmaskMatrix(stored.shape, dtype, block_cols, values, row_start, scales, row_sums(stored), masks)


def encode_nm(W: np.ndarray, dtype: ValueType = "fp32", block_cols: int | None = None) -> NMMatrix:
    """2:4: every aligned group of four columns must hold at most two nonzeros (after rounding to dtype)."""
    block_cols = _check_block_cols(block_cols, dtype)
    stored, scales = quantize(W, dtype)
    rows, cols = stored.shape
    if cols % 4:
        raise InvalidInputError(f"2:4 needs a multiple of 4 columns, got {cols}; pad the weight or use bitmask")
    crowded = (stored.reshape(rows, -1, 4) != 0).sum(axis=2) > 2
    if crowded.any():
        r, g = np.argwhere(crowded)[0]
        raise InvalidInputError(f"weight is not 2:4 sparse: row {r}, columns {4 * g}..{4 * g + 3} hold more than "
                                f"two nonzeros; prune with pattern 2:4 or use the bitmask format")
    values, row_start, meta = _encode_blocks(stored, block_cols, _nm_slab)
    return NMMatrix(stored.shape, dtype, block_cols, values, row_start, scales, row_sums(stored), meta)


def encode_csr(W: np.ndarray, dtype: ValueType = "fp32") -> CSRMatrix:
    stored, scales = quantize(W, dtype)
    rows, cols = stored.shape
    if cols > MAX_CSR_COLS:
        raise InvalidInputError(f"CSR stores uint16 column indices, so cols must be <= {MAX_CSR_COLS}, got {cols}; "
                                f"use the bitmask format")
    r, c = np.nonzero(stored)  # row-major order
    row_start = np.zeros((1, rows + 1), np.int64)
    np.cumsum(np.bincount(r, minlength=rows), out=row_start[0, 1:])
    return CSRMatrix(stored.shape, dtype, padded_cols(cols), _packed(stored[r, c]), row_start, scales,
                     row_sums(stored), _packed(c.astype(np.uint16)))


ENCODERS = {"dense": encode_dense, "bitmask": encode_bitmask, "2:4": encode_nm, "csr": encode_csr}


def encode(W: np.ndarray, format: str, dtype: ValueType = "fp32", block_cols: int | None = None) -> EncodedMatrix:
    """Encode W [rows, cols] in ``format`` (dense, bitmask, 2:4 or csr) with ``dtype`` values. CSR is one block."""
    if format not in ENCODERS:
        raise InvalidInputError(f"format {format!r} is not supported; use one of {', '.join(ENCODERS)}")
    if format == "csr":
        return encode_csr(W, dtype)
    return ENCODERS[format](W, dtype, block_cols)


def decode(M: EncodedMatrix) -> np.ndarray:
    """The float32 [rows, cols] matrix the kernels multiply by (W rounded to the value type)."""
    rows, cols = M.shape
    stored = np.zeros((rows, padded_cols(cols)), STORAGE[M.dtype])
    if isinstance(M, CSRMatrix):
        start = M.row_start[0]
        row = np.repeat(np.arange(rows), np.diff(start))
        stored[row, M.indices[: start[-1]].astype(np.int64)] = M.values[: start[-1]]
        return widen(stored[:, :cols], M.scales)
    for k, _, slab in _slabs(stored, M.block_cols):
        chunks = slab.shape[1] // CHUNK
        first_word = rows * (M.block_cols // CHUNK) * k  # every earlier block is full
        values = M.values[M.row_start[k, 0] : M.row_start[k, -1]]
        if isinstance(M, DenseMatrix):
            slab[:] = values.reshape(rows, -1)
        elif isinstance(M, BitmaskMatrix):
            words = M.masks[first_word : first_word + rows * chunks].reshape(rows, chunks)
            slab[np.unpackbits(words.view(np.uint8), axis=1, bitorder="little").astype(bool)] = values
        elif isinstance(M, NMMatrix):
            meta = M.meta[2 * first_word : 2 * (first_word + rows * chunks)].reshape(rows, -1)
            nibbles = ((meta[:, :, None] >> (4 * np.arange(8, dtype=np.uint32))) & np.uint32(15)).reshape(rows, -1)
            kept = np.stack([nibbles & 3, nibbles >> 2], axis=2).astype(np.int64)
            np.put_along_axis(slab.reshape(rows, -1, 4), kept, values.reshape(rows, -1, 2), axis=2)
        else:
            raise InvalidInputError(f"cannot decode {type(M).__name__}")
    return widen(stored[:, :cols], M.scales)
