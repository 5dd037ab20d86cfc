"""The native sparse MatMul library (``native/``, built into ``sparse_deploy/_sparse_ops.so``) from Python.

Ops of domain ``ai.sparse_deploy`` (W is [N, K], out x in; the mask row stride is 8 * ceil(K / 64) bytes):

    SparseMatMul(X float [..., K], mask uint8 [N, S], values float [nnz], row_ptr int64 [N+1], bias float [N]?)
    SparseMatMulInt8(X, mask, values int8 [nnz], row_ptr, scale float [N], bias float [N]?)
        -> Y float [..., N] = X @ W^T (+ bias)

Bit k of mask row n (byte k // 8, least significant bit first) is set where W[n, k] is kept; values holds the kept
weights row by row, row n's at values[row_ptr[n]:row_ptr[n + 1]]. The int8 op quantizes each row of X as
s = max|x| / 127, q = clamp(rint(x / s), -127, 127), sums q * w exactly in int32 and scales by s * scale[n].
Needs numpy only (never torch, never onnxruntime at import).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sparse_deploy.errors import InvalidInputError, KernelsUnavailableError

DOMAIN = "ai.sparse_deploy"
OP_FP32 = "SparseMatMul"
OP_INT8 = "SparseMatMulInt8"
ISA_ENV = "SPARSE_DEPLOY_ISA"  # amx | avx512 | avx2 | portable: force one path (tests, benchmarks)
ISAS = ("amx", "avx512", "avx2", "portable")
LIBRARY_NAME = "_sparse_ops.so"
UNAVAILABLE_NAME = "_sparse_ops.unavailable"  # written by the build in place of the library, with the reason


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str  # why not, when not ok; the library's path when ok
    path: Path


@dataclass(frozen=True)
class KernelWeights:
    """The weight inputs of one sparse op, in input order after X (scale only for int8)."""

    mask: np.ndarray  # uint8 [N, 8 * ceil(K / 64)]
    values: np.ndarray  # float32 or int8 [nnz]
    row_ptr: np.ndarray  # int64 [N + 1]
    scale: np.ndarray | None = None  # float32 [N], int8 only
    shape: tuple[int, int] = (0, 0)  # (N, K)

    @property
    def op_type(self) -> str:
        return OP_INT8 if self.scale is not None else OP_FP32

    def inputs(self) -> list[np.ndarray]:
        arrays = [self.mask, self.values, self.row_ptr]
        return arrays + ([self.scale] if self.scale is not None else [])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.inputs())


def _package_dir() -> Path:
    return Path(__file__).resolve().parent.parent


def library_path() -> Path:
    """Where the built library lives (whether or not it was built)."""
    return _package_dir() / LIBRARY_NAME


def availability() -> Availability:
    """Whether the library can be used here, and if not, why (the build's own reason when it recorded one)."""
    path = library_path()
    if not path.is_file():
        marker = _package_dir() / UNAVAILABLE_NAME
        why = marker.read_text().strip() if marker.is_file() else "the package was installed without building it"
        return Availability(False, f"native sparse kernels not built ({why}); reinstall with `pip install -e .`", path)
    try:
        name = _isa_from(path)
    except OSError as exc:
        return Availability(False, f"native sparse kernels at {path} cannot be loaded: {exc}", path)
    if name.startswith("error"):
        return Availability(False, f"{ISA_ENV}={os.environ.get(ISA_ENV)!r}: not a path this CPU supports", path)
    return Availability(True, str(path), path)


def _isa_from(path: Path) -> str:
    lib = ctypes.CDLL(str(path))
    fn = lib.SparseDeployIsa
    fn.restype = ctypes.c_char_p
    return fn().decode()


def isa() -> str:
    """The instruction-set path the ops will run (amx, avx512, avx2 or portable); honours SPARSE_DEPLOY_ISA."""
    state = availability()
    if not state.ok:
        raise KernelsUnavailableError(state.reason)
    return _isa_from(state.path)


def register(session_options: Any) -> Path:
    """Registers the ops with an ``onnxruntime.SessionOptions``; raises KernelsUnavailableError saying why not."""
    state = availability()
    if not state.ok:
        raise KernelsUnavailableError(state.reason)
    session_options.register_custom_ops_library(str(state.path))
    return state.path


def _as_matrix(w: Any) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2:
        raise InvalidInputError(f"a sparse weight must be 2-D [out, in], got shape {w.shape}")
    return w


def _mask_and_rows(keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, k = keep.shape
    padded = np.zeros((n, 64 * -(-k // 64)), dtype=bool)
    padded[:, :k] = keep
    mask = np.packbits(padded, axis=1, bitorder="little")
    row_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(keep.sum(axis=1), out=row_ptr[1:])
    return np.ascontiguousarray(mask), row_ptr


def pack_rows(w: Any) -> KernelWeights:
    """Packs a float weight W [N, K] (out x in; zeros are pruned) for SparseMatMul."""
    w = _as_matrix(w).astype(np.float32, copy=False)
    keep = w != 0
    mask, row_ptr = _mask_and_rows(keep)
    return KernelWeights(mask, np.ascontiguousarray(w[keep]), row_ptr, None, w.shape)


def pack_bits(bits: np.ndarray, values: np.ndarray, shape: tuple[int, int], *, transpose: bool = False,
              scale: Any = None) -> KernelWeights:
    """Packs a weight given as the packed file stores it: the bit stream of its nonzeros over the flattened
    ``shape`` [R, C] (least significant bit first) and its nonzero values in row-major order, never decoding it.
    W is the stored weight ([N, K] = [R, C]) or, with ``transpose``, its transpose ([N, K] = [C, R]; one pass in the
    native library). int8 values need their per-row ``scale`` [N] (SparseMatMulInt8); float values give SparseMatMul.
    Untransposed float32 values are used as they are (no copy)."""
    rows, cols = shape
    bits = np.ascontiguousarray(bits, dtype=np.uint8).reshape(-1)
    values = np.asarray(values).reshape(-1)
    if bits.size * 8 < rows * cols:
        raise InvalidInputError(f"pack_bits: {bits.size} bytes of bits for a {rows}x{cols} weight")
    if scale is not None:
        scale = np.ascontiguousarray(scale, dtype=np.float32).reshape(-1)
        values = np.ascontiguousarray(values, dtype=np.int8)
    else:
        values = np.ascontiguousarray(values, dtype=np.float32)
    n, k = (cols, rows) if transpose else (rows, cols)
    if scale is not None and scale.shape != (n,):
        raise InvalidInputError(f"pack_bits: scale must be [{n}], got {scale.shape}")
    if transpose:
        mask, values, row_ptr = _repack_transposed(bits, values, rows, cols)
    elif k % 64 == 0:
        mask = np.ascontiguousarray(bits[: n * k // 8].reshape(n, k // 8))
        row_ptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bitwise_count(mask).sum(axis=1, dtype=np.int64), out=row_ptr[1:])
    else:
        keep = np.unpackbits(bits, count=n * k, bitorder="little").view(bool).reshape(n, k)
        mask, row_ptr = _mask_and_rows(keep)
    if row_ptr[-1] != values.size:
        raise InvalidInputError(f"pack_bits: the bits of a {rows}x{cols} weight mark {row_ptr[-1]} nonzeros, "
                                f"{values.size} values stored")
    return KernelWeights(mask, values, row_ptr, scale, (n, k))


def _repack_transposed(bits: np.ndarray, values: np.ndarray, rows: int, cols: int):
    """(mask, values, row_ptr) of the transpose [cols, rows] of the stored weight, by the native library."""
    state = availability()
    if not state.ok:
        raise KernelsUnavailableError(state.reason)
    fn = _function(state, "SparseDeployRepackTransposed")
    mask = np.empty((cols, 8 * -(-rows // 64)), np.uint8)
    out = np.empty_like(values)
    row_ptr = np.empty(cols + 1, np.int64)
    ptr = ctypes.c_void_p
    got = fn(ptr(bits.ctypes.data), ptr(values.ctypes.data), ctypes.c_int64(values.size), ctypes.c_int64(rows),
             ctypes.c_int64(cols), ctypes.c_int64(values.itemsize), ptr(mask.ctypes.data),
             ctypes.c_int64(mask.shape[1]), ptr(out.ctypes.data), ptr(row_ptr.ctypes.data))
    if got < 0:
        raise MemoryError("SparseDeployRepackTransposed: out of memory")
    if got != values.size:
        raise InvalidInputError(f"pack_bits: the bits of a {rows}x{cols} weight mark {got} nonzeros, "
                                f"{values.size} values stored")
    return mask, out, row_ptr


def _function(state: Availability, name: str):
    fn = getattr(ctypes.CDLL(str(state.path)), name)
    fn.restype = ctypes.c_int64
    return fn


def unpack(parts: list[tuple[np.ndarray, np.ndarray]], shape: tuple[int, int]) -> np.ndarray:
    """``formats.packed.unpack`` (the dense weight [R, C] from the packed file's chunks) by the native library;
    numpy's where the library is not available."""
    from sparse_deploy.formats.packed import chunk_spans
    from sparse_deploy.formats.packed import unpack as unpack_numpy

    state = availability()
    if not state.ok:
        return unpack_numpy(parts, shape)
    fn = _function(state, "SparseDeployUnpack")
    rows, cols = shape
    out = np.empty(rows * cols, dtype=parts[0][1].dtype)
    ptr = ctypes.c_void_p
    for bits, nonzeros, start, n in chunk_spans(parts, shape):
        bits = np.ascontiguousarray(bits, dtype=np.uint8)
        nonzeros = np.ascontiguousarray(nonzeros)
        if bits.size * 8 < n:
            raise InvalidInputError(f"unpack: {bits.size} bytes of bits for {n} weights")
        got = fn(ptr(bits.ctypes.data), ptr(nonzeros.ctypes.data), ctypes.c_int64(nonzeros.size), ctypes.c_int64(n),
                 ctypes.c_int64(nonzeros.itemsize), ptr(out[start:].ctypes.data))
        if got != nonzeros.size:
            raise InvalidInputError(f"unpack: the bits of a {rows}x{cols} weight mark {got} nonzeros, "
                                    f"{nonzeros.size} values stored")
    return out.reshape(rows, cols)


def quantize_rows(w: Any) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output row: scale = max|w_row| / 127, q = clamp(rint(w / scale), -127, 127)."""
    w = _as_matrix(w).astype(np.float32, copy=False)
    scale = (np.abs(w).max(axis=1) / np.float32(127)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1))[:, None]
    q = np.clip(np.rint(w / safe), -127, 127).astype(np.int8)
    return q, scale


def pack_rows_int8(w: Any, scale: Any = None) -> KernelWeights:
    """Packs W [N, K] for SparseMatMulInt8: a float W is quantized with quantize_rows (its zeros stay pruned);
    an int8 W needs its per-row ``scale`` [N]."""
    w = _as_matrix(w)
    if w.dtype == np.int8:
        if scale is None:
            raise InvalidInputError("pack_rows_int8: an int8 weight needs its per-row scale")
        q, scale = w, np.asarray(scale, dtype=np.float32).reshape(-1)
        keep = q != 0
    else:
        keep = w.astype(np.float32, copy=False) != 0
        q, scale = quantize_rows(w)
    if scale.shape != (w.shape[0],):
        raise InvalidInputError(f"pack_rows_int8: scale must be [{w.shape[0]}], got {scale.shape}")
    mask, row_ptr = _mask_and_rows(keep)
    return KernelWeights(mask, np.ascontiguousarray(q[keep]), row_ptr, np.ascontiguousarray(scale), w.shape)


def quantize_activations(x: Any) -> tuple[np.ndarray, np.ndarray]:
    """What SparseMatMulInt8 does to X, per row of X [M, K]: (q int8 [M, K], s float32 [M]); for references."""
    x = np.asarray(x, dtype=np.float32)
    s = (np.abs(x).max(axis=-1) / np.float32(127)).astype(np.float32)
    safe = np.where(s > 0, s, np.float32(1))[..., None]
    q = np.where(s[..., None] > 0, np.clip(np.rint(x / safe), -127, 127), 0).astype(np.int8)
    return q, s
