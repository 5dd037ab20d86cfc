"""The numba kernels: y [batch, rows] = x [batch, cols] · Wᵀ over encoded weight rows.

Each thread owns a contiguous range of rows and walks the column blocks in order, so per block it streams one
contiguous range of packed values while that block's slice of x sits in L1. Inside a block, a row is decoded
once per tile of up to four batch rows; the first batch row of a tile keeps four accumulators (one FMA chain
per decoded vector, so the 4-cycle FMA latency never limits batch 1), the others two each. Software prefetch
runs ``ahead`` values in front of the decode: on the 2-vCPU VMs this project measures on, the hardware
prefetcher alone left one core at ~8 GB/s, and a 16 KiB lead raised it to ~17 GB/s. int8 weights have their
own kernel (chunked_gemv_u8): x is quantized to uint8 once per call and each chunk is one expand of 64 bytes
and one uint8 · int8 dot product per batch row.
"""

from __future__ import annotations

import numba
import numpy as np

from sparse_deploy.kernels._simd import (CHUNK, LANES, decode_chunk, decode_chunk_bytes, prefetch, vadd, vdot_u8i8,
                                         vfma, vgather, visum, vizero, vload, vload_widen, vsum, vzero)

TILE = 4  # batch rows per pass over a weight row


@numba.njit(cache=True, nogil=True)
def lane_copy(x, lanes, width):  # pragma: no cover - compiled
    """x [batch, cols] -> float32 [batch, width], 64-byte aligned and zero padded, with column lanes[i] of each
    64-column chunk at position i (lanes is None: column order)."""
    batch, cols = x.shape
    buf = np.zeros(batch * width + LANES, np.float32)
    skip = (-buf.ctypes.data % 64) // 4  # numba's allocations are aligned already; this keeps it so
    out = buf[skip : skip + batch * width].reshape((batch, width))
    if lanes is None:
        out[:, :cols] = x
        return out
    full = cols // CHUNK * CHUNK
    for b in range(batch):
        for c in range(0, full, CHUNK):
            for i in range(CHUNK):
                out[b, c + i] = x[b, c + lanes[i]]
        for i in range(CHUNK if full < width else 0):  # the ragged last chunk
            if full + lanes[i] < cols:
                out[b, full + i] = x[b, full + lanes[i]]
    return out


@numba.njit(cache=True, nogil=True)
def quantize_u8(x, width):  # pragma: no cover - compiled
    """x [batch, cols] -> (xq uint8 [batch, width] zero padded, scale float32 [batch], zero int32 [batch]),
    x ≈ scale · (xq - zero) per batch row over [min(x, 0), max(x, 0)], as ONNX DynamicQuantizeLinear."""
    batch, cols = x.shape
    xq = np.zeros((batch, width), np.uint8)
    scale = np.zeros(batch, np.float32)
    zero = np.zeros(batch, np.int32)
    for b in range(batch):
        lo = min(np.float32(0.0), x[b].min())
        hi = max(np.float32(0.0), x[b].max())
        s = (hi - lo) / np.float32(255.0) if hi > lo else np.float32(1.0)
        z = min(max(np.rint(-lo / s), np.float32(0.0)), np.float32(255.0))
        for j in range(cols):  # round half to even, then saturate to [0, 255]
            xq[b, j] = np.uint8(min(max(np.rint(x[b, j] / s) + z, np.float32(0.0)), np.float32(255.0)))
        scale[b] = s
        zero[b] = np.int32(z)
    return xq, scale, zero


@numba.njit(inline="always")
def _fma_pair(v0, v1, v2, v3, x, k, even, odd):  # pragma: no cover - compiled
    """even/odd += the chunk's four products with x.ravel()[k : k + 64] (two FMA chains)."""
    even = vfma(v2, vload(x, k + 32), vfma(v0, vload(x, k), even))
    odd = vfma(v3, vload(x, k + 48), vfma(v1, vload(x, k + 16), odd))
    return even, odd


@numba.njit(inline="always")
def _dot_tile(a0, a1, a2, a3, xq, j, width, w, n):  # pragma: no cover - compiled
    """a_i += the uint8 · int8 dot products of chunk weights w with xq.ravel()[j + i·width : ... + 64], i < n."""
    a0 = vdot_u8i8(a0, xq, j, w)
    if n > 1:
        a1 = vdot_u8i8(a1, xq, j + width, w)
    if n > 2:
        a2 = vdot_u8i8(a2, xq, j + 2 * width, w)
    if n > 3:
        a3 = vdot_u8i8(a3, xq, j + 3 * width, w)
    return a0, a1, a2, a3


@numba.njit(inline="always")
def _add(y, t, r, n, scale, v0, v1, v2, v3):  # pragma: no cover - compiled
    """y[t + i, r] += scale · (sum of the lanes of v_i) for the n batch rows of a tile (only n reductions)."""
    y[t, r] += scale * vsum(v0)
    if n > 1:
        y[t + 1, r] += scale * vsum(v1)
    if n > 2:
        y[t + 2, r] += scale * vsum(v2)
    if n > 3:
        y[t + 3, r] += scale * vsum(v3)


@numba.njit(inline="always")
def _add_int(y, t, r, n, scale, sx, a0, e0, a1, e1, a2, e2, a3, e3):  # pragma: no cover - compiled
    """y[t + i, r] += scale · sx[t + i] · (sum of the lanes of a_i and e_i) for the n batch rows of a tile."""
    y[t, r] += scale * sx[t] * (visum(a0) + visum(e0))
    if n > 1:
        y[t + 1, r] += scale * sx[t + 1] * (visum(a1) + visum(e1))
    if n > 2:
        y[t + 2, r] += scale * sx[t + 2] * (visum(a2) + visum(e2))
    if n > 3:
        y[t + 3, r] += scale * sx[t + 3] * (visum(a3) + visum(e3))


@numba.njit(inline="always")
def _own_rows(y, g, groups):  # pragma: no cover - compiled
    """Rows [r0, r1) of thread group g, with y[:, r0:r1] zeroed for the kernel to add into."""
    rows = y.shape[1]
    r0, r1 = g * rows // groups, (g + 1) * rows // groups
    y[:, r0:r1] = 0.0
    return r0, r1


@numba.njit(inline="always")
def _block(k, block_chunks, chunks, rows):  # pragma: no cover - compiled
    """Column block k: (its first chunk, its number of chunks, the mask word of its row 0, chunk 0)."""
    c0 = k * block_chunks
    return c0, min(block_chunks, chunks - c0), rows * c0


@numba.njit(parallel=True, cache=True, nogil=True)
def chunked_gemv(values, row_start, aux, aux_bits, scales, x_in, lanes, width, block_chunks, y, ahead,
                 groups):  # pragma: no cover - compiled
    """Dense, bitmask and 2:4 rows (the format follows aux's dtype, see decode_chunk).

    values: packed values; row_start int64 [blocks, rows + 1]; aux: the masks (uint64) or 2:4 metadata
    (uint32), 1-D, or an empty bool array (dense); aux_bits: the same array again; scales float32 [rows] or
    empty; x_in float32 [batch, cols]; lanes: lane_columns of the value type, or None for column order; width:
    cols padded to a multiple of 64; block_chunks: block_cols / 64; y float32 [batch, rows] (written); ahead:
    prefetch distance in values; groups: how many row ranges to split the rows into (one per thread)."""
    x = lane_copy(x_in, lanes, width)
    batch = x.shape[0]
    rows = y.shape[1]
    chunks = width // CHUNK
    for g in numba.prange(groups):
        r0, r1 = _own_rows(y, g, groups)
        for k in range(row_start.shape[0]):
            c0, n_chunks, first_word = _block(k, block_chunks, chunks, rows)
            for r in range(r0, r1):
                scale = scales[r] if scales.size else np.float32(1.0)
                for t in range(0, batch, TILE):
                    n = min(TILE, batch - t)
                    z = vzero()
                    a0, a1, a2, a3, b0, b1, c0_, c1, d0, d1 = z, z, z, z, z, z, z, z, z, z
                    p = row_start[k, r]
                    word = first_word + r * n_chunks
                    for c in range(n_chunks):
                        prefetch(values, p + ahead)
                        (v0, v1, v2, v3), p = decode_chunk(values, p, aux, aux_bits, word + c)
                        j = t * width + (c0 + c) * CHUNK  # y[t, r] += Σ x[t, j'] W[r, j'] over the chunk
                        a0 = vfma(v0, vload(x, j), a0)
                        a1 = vfma(v1, vload(x, j + 16), a1)
                        a2 = vfma(v2, vload(x, j + 32), a2)
                        a3 = vfma(v3, vload(x, j + 48), a3)
                        if n > 1:
                            b0, b1 = _fma_pair(v0, v1, v2, v3, x, j + width, b0, b1)
                        if n > 2:
                            c0_, c1 = _fma_pair(v0, v1, v2, v3, x, j + 2 * width, c0_, c1)
                        if n > 3:
                            d0, d1 = _fma_pair(v0, v1, v2, v3, x, j + 3 * width, d0, d1)
                    _add(y, t, r, n, scale, vadd(vadd(a0, a1), vadd(a2, a3)), vadd(b0, b1), vadd(c0_, c1),
                         vadd(d0, d1))


@numba.njit(parallel=True, cache=True, nogil=True)
def csr_gemv(values, row_start, indices, scales, x, y, ahead, groups):  # pragma: no cover - compiled
    """CSR rows: 16 values at a time against x [batch, cols] gathered at their uint16 column indices.

    values, indices: packed, with at least 16 spare entries at the end; row_start int64 [1, rows + 1]; other
    arguments as chunked_gemv."""
    batch, width = x.shape
    rows = y.shape[1]
    for g in numba.prange(groups):
        r0, r1 = _own_rows(y, g, groups)
        for r in range(r0, r1):
            scale = scales[r] if scales.size else np.float32(1.0)
            start, end = row_start[0, r], row_start[0, r + 1]
            for t in range(0, batch, TILE):
                n = min(TILE, batch - t)
                z = vzero()
                a0, a1, a2, a3 = z, z, z, z
                for k in range(start, end, LANES):
                    prefetch(values, k + ahead)
                    prefetch(indices, k + ahead)
                    count = min(LANES, end - k)  # lanes past the row's end gather nothing and add 0·w
                    v = vload_widen(values, k)
                    a0 = vfma(v, vgather(x, t * width, indices, k, count), a0)
                    if n > 1:
                        a1 = vfma(v, vgather(x, (t + 1) * width, indices, k, count), a1)
                    if n > 2:
                        a2 = vfma(v, vgather(x, (t + 2) * width, indices, k, count), a2)
                    if n > 3:
                        a3 = vfma(v, vgather(x, (t + 3) * width, indices, k, count), a3)
                _add(y, t, r, n, scale, a0, a1, a2, a3)


@numba.njit(parallel=True, cache=True, nogil=True)
def chunked_gemv_u8(values, row_start, aux, aux_bits, scales, sums, x_in, width, block_chunks, y, ahead,
                    groups):  # pragma: no cover - compiled
    """int8 dense, bitmask and 2:4 rows against x quantized to uint8 (quantize_u8), in exact int32 sums:
    y[b, r] = sx_b · s_r · (Σ_j xq[b, j] q[r, j] - zero_b · Σ_j q[r, j]). sums: int32 [rows] Σ_j q[r, j]; the
    other arguments as chunked_gemv."""
    xq, sx, zero = quantize_u8(x_in, width)
    batch = xq.shape[0]
    rows = y.shape[1]
    chunks = width // CHUNK
    for g in numba.prange(groups):
        r0, r1 = _own_rows(y, g, groups)
        for k in range(row_start.shape[0]):
            c0, n_chunks, first_word = _block(k, block_chunks, chunks, rows)
            for r in range(r0, r1):
                for t in range(0, batch, TILE):
                    n = min(TILE, batch - t)
                    a0 = vizero()
                    a1, a2, a3, e0, e1, e2, e3 = a0, a0, a0, a0, a0, a0, a0
                    p = row_start[k, r]
                    word = first_word + r * n_chunks
                    j = t * width + c0 * CHUNK
                    # two chunks a step into two sets of accumulators: the 5-cycle vpdpbusd latency would
                    # otherwise bound batch 1
                    for c in range(0, n_chunks - 1, 2):
                        prefetch(values, p + ahead)
                        w, p = decode_chunk_bytes(values, p, aux, aux_bits, word + c)
                        a0, a1, a2, a3 = _dot_tile(a0, a1, a2, a3, xq, j + c * CHUNK, width, w, n)
                        w, p = decode_chunk_bytes(values, p, aux, aux_bits, word + c + 1)
                        e0, e1, e2, e3 = _dot_tile(e0, e1, e2, e3, xq, j + (c + 1) * CHUNK, width, w, n)
                    if n_chunks % 2:
                        w, p = decode_chunk_bytes(values, p, aux, aux_bits, word + n_chunks - 1)
                        a0, a1, a2, a3 = _dot_tile(a0, a1, a2, a3, xq, j + (n_chunks - 1) * CHUNK, width, w, n)
                    _add_int(y, t, r, n, scales[r], sx, a0, e0, a1, e1, a2, e2, a3, e3)
        for r in range(r0, r1):
            for b in range(batch):  # the zero-point term
                y[b, r] -= scales[r] * sx[b] * np.float32(zero[b] * sums[r])
