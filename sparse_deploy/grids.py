"""Quantization grids shared by export (and the solver): small numpy functions, no state.

A weight matrix is ``w [N, K]`` as torch's ``nn.Linear`` stores it: N output channels (rows), K input columns.

int8, ``s7-per-channel``: one scale per output channel, ``scale = max|w[n]| / 64``, values ``q`` in [-64, 64],
zero point 0. Seven bits, not eight, so that ONNX Runtime's u8s8 kernel on x86 CPUs without VNNI (``vpmaddubsw``,
which adds two uint8 · int8 products into a saturating int16) can never saturate: 2 · 255 · 64 = 32640 <= 32767.
Full-range weights (|q| <= 127) can reach 2 · 255 · 127 = 64770 and do saturate there.

int4 (MatMulNBits' grid): groups of ``group_size`` consecutive input columns per row, the last one shorter when K is
not a multiple. Symmetric (the default, what ONNX Runtime's quantizer and onnxruntime-genai write):
``scale = m / -8`` where m is the group's value of largest magnitude with its sign, values q in [-8, 7], so m itself
is exact (q = -8) and stored with zero point 8 as the unsigned nibble q + 8. Asymmetric: ``scale = (max - min) / 15``
over a range that includes 0, integer zero points in [0, 15], values q in [0, 15].

In both, a zero weight quantizes to q = 0 (symmetric) or q = zero point (asymmetric) and dequantizes to exactly 0.0,
so pruned weights stay pruned. A row or group that is all zero gets scale 0 and q = 0 (dequantizes to 0).

API (every array numpy; scales float32; ``group_size=None`` means per output channel):

- ``int8_scales(w) -> scales [N]``
- ``int4_scales(w, group_size, symmetric=True) -> (scales [N, ceil(K / G)], zero_points uint8 same shape or None)``
- ``quantize(w, scales, zero_points=None, *, bits, group_size=None) -> q [N, K]`` int8 (signed, zero points None)
  or uint8 (asymmetric int4: 0..15)
- ``dequantize(q, scales, zero_points=None, *, group_size=None) -> w [N, K]`` float32, ``(q - zp) · scale``
- ``on_grid(w, scales, zero_points=None, *, bits, group_size=None, rtol=1e-4) -> bool``: every value of w is some
  in-range q times its scale (up to rtol of that scale; float32 rounding of q · scale)
"""

from __future__ import annotations

import numpy as np

INT8_QMAX = 64  # s7-per-channel: q in [-64, 64]
INT8_SCHEME = "s7-per-channel"
INT4_SCHEME = "int4-symmetric-per-group"
INT4_GROUP_SIZES = (32, 64, 128)


def _check_matrix(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight [N, K], got shape {w.shape}")
    return w


def _groups(w: np.ndarray, group_size: int) -> np.ndarray:
    """w [N, K] -> [N, ceil(K / G), G], zero padded at the end of the last group (zeros change no max)."""
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    n, k = w.shape
    blocks = -(-k // group_size)
    padded = np.zeros((n, blocks * group_size), dtype=w.dtype)
    padded[:, :k] = w
    return padded.reshape(n, blocks, group_size)


def _expand(values: np.ndarray, k: int, group_size: int | None) -> np.ndarray:
    """Per-row [N] or per-group [N, B] values -> broadcastable to [N, K]."""
    if group_size is None:
        return values.reshape(-1, 1)
    return np.repeat(values, group_size, axis=1)[:, :k]


def _range(bits: int, asymmetric: bool) -> tuple[int, int]:
    if bits == 8:
        if asymmetric:
            raise ValueError("the int8 grid is symmetric (no zero points)")
        return -INT8_QMAX, INT8_QMAX
    if bits == 4:
        return (0, 15) if asymmetric else (-8, 7)
    raise ValueError(f"bits must be 8 or 4, got {bits!r}")


def int8_scales(w: np.ndarray) -> np.ndarray:
    """scales [N] float32: max|w[n]| / 64 per output channel (0 for an all-zero row)."""
    w = _check_matrix(w)
    return (np.abs(w).max(axis=1, initial=0.0).astype(np.float32) / np.float32(INT8_QMAX)).astype(np.float32)


def int4_scales(w: np.ndarray, group_size: int, symmetric: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """(scales [N, ceil(K / G)] float32, zero_points uint8 of the same shape or None when symmetric)."""
    g = _groups(_check_matrix(w).astype(np.float32), group_size)
    if symmetric:
        at = np.abs(g).argmax(axis=2)[..., None]
        signed_max = np.take_along_axis(g, at, axis=2)[..., 0]  # the value of largest magnitude, with its sign
        return (signed_max / np.float32(-8.0)).astype(np.float32), None
    lo = np.minimum(g.min(axis=2), 0.0)
    hi = np.maximum(g.max(axis=2), 0.0)
    scales = ((hi - lo) / np.float32(15.0)).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0)
    zero_points = np.clip(np.rint(-lo / safe), 0, 15).astype(np.uint8)
    return scales, zero_points


def quantize(w: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None = None, *, bits: int,
             group_size: int | None = None) -> np.ndarray:
    """q [N, K]: round(w / scale) (+ zero point), clipped to the grid's range; int8, or uint8 with zero points."""
    w = _check_matrix(w)
    lo, hi = _range(bits, zero_points is not None)
    k = w.shape[1]
    scale = _expand(np.asarray(scales, np.float32), k, group_size)
    safe = np.where(scale != 0, scale, np.float32(1.0))
    q = np.rint(w.astype(np.float32) / safe)
    if zero_points is not None:
        q = q + _expand(np.asarray(zero_points, np.float32), k, group_size)
    q = np.clip(q, lo, hi)
    if zero_points is None:
        q = np.where(scale != 0, q, 0.0)
    return q.astype(np.uint8 if zero_points is not None else np.int8)


def dequantize(q: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None = None, *,
               group_size: int | None = None) -> np.ndarray:
    """w [N, K] float32 = (q - zero point) · scale."""
    q = _check_matrix(q)
    k = q.shape[1]
    values = q.astype(np.float32)
    if zero_points is not None:
        values = values - _expand(np.asarray(zero_points, np.float32), k, group_size)
    return (values * _expand(np.asarray(scales, np.float32), k, group_size)).astype(np.float32)


def on_grid(w: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None = None, *, bits: int,
            group_size: int | None = None, rtol: float = 1e-4) -> bool:
    """True when every w lies on the grid: |w - dequantize(quantize(w))| <= rtol · |scale| (and 0 where scale is 0)."""
    w = _check_matrix(w).astype(np.float32)
    q = quantize(w, scales, zero_points, bits=bits, group_size=group_size)
    back = dequantize(q, scales, zero_points, group_size=group_size)
    scale = np.abs(_expand(np.asarray(scales, np.float32), w.shape[1], group_size))
    return bool(np.all(np.abs(w - back) <= rtol * scale))
