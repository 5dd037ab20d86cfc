"""The numba kernels: y [batch, rows] = x [batch, width] · Wᵀ over encoded weight rows.

Threads take whole rows (``prange``). A thread streams a row's packed values and mask once per tile of up to
four batch rows; the first batch row of a tile keeps four accumulators (one FMA chain per decoded vector, so
the 4-cycle FMA latency never limits batch 1), the others two each. Software prefetch runs ``ahead`` values
in front of the decode: on the 2-vCPU VMs this project measures on, the hardware prefetcher alone left a
single core at ~8 GB/s, and a 16 KiB lead raised it to ~17 GB/s.
"""

from __future__ import annotations

import numba
import numpy as np

from sparse_deploy.kernels._simd import (CHUNK, LANES, decode_chunk, prefetch, vadd, vfma, vgather, vload,
                                         vload_widen, vsum, vzero)

TILE = 4  # batch rows per pass over a weight row


@numba.njit(inline="always")
def _fma_pair(v0, v1, v2, v3, x, k, even, odd):  # pragma: no cover - compiled
    """even/odd += the chunk's four products with x.ravel()[k : k + 64] (two FMA chains)."""
    even = vfma(v2, vload(x, k + 32), vfma(v0, vload(x, k), even))
    odd = vfma(v3, vload(x, k + 48), vfma(v1, vload(x, k + 16), odd))
    return even, odd


@numba.njit(inline="always")
def _store(y, t, r, n, scale, s0, s1, s2, s3):  # pragma: no cover - compiled
    """y[t + i, r] = scale · s_i for the n batch rows of a tile."""
    y[t, r] = scale * s0
    if n > 1:
        y[t + 1, r] = scale * s1
    if n > 2:
        y[t + 2, r] = scale * s2
    if n > 3:
        y[t + 3, r] = scale * s3


@numba.njit(parallel=True, cache=True, nogil=True)
def chunked_gemv(values, row_start, aux, aux_bits, scales, x, y, ahead):  # pragma: no cover - compiled
    """Dense, bitmask and 2:4 rows (the format follows aux's dtype, see decode_chunk).

    values: packed values; row_start int64 [rows + 1]; aux: masks uint64 [rows, width/64], 2:4 meta uint32
    [rows, width/32] or an empty bool array (dense); aux_bits: the same array again; scales float32 [rows] or
    empty; x float32 [batch, width] in lane_columns order, zero padded; y float32 [batch, rows] (written)."""
    batch, width = x.shape
    chunks = width // CHUNK
    for r in numba.prange(y.shape[1]):
        scale = scales[r] if scales.size else np.float32(1.0)
        for t in range(0, batch, TILE):
            n = min(TILE, batch - t)
            z = vzero()
            a0, a1, a2, a3, b0, b1, c0, c1, d0, d1 = z, z, z, z, z, z, z, z, z, z
            p = row_start[r]
            for c in range(chunks):
                prefetch(values, p + ahead)
                (v0, v1, v2, v3), p = decode_chunk(values, p, aux, aux_bits, r * chunks + c)
                k = t * width + c * CHUNK  # y[t, r] += Σ_j x[t, j] W[r, j] over the chunk's 64 columns j
                a0 = vfma(v0, vload(x, k), a0)
                a1 = vfma(v1, vload(x, k + 16), a1)
                a2 = vfma(v2, vload(x, k + 32), a2)
                a3 = vfma(v3, vload(x, k + 48), a3)
                if n > 1:
                    b0, b1 = _fma_pair(v0, v1, v2, v3, x, k + width, b0, b1)
                if n > 2:
                    c0, c1 = _fma_pair(v0, v1, v2, v3, x, k + 2 * width, c0, c1)
                if n > 3:
                    d0, d1 = _fma_pair(v0, v1, v2, v3, x, k + 3 * width, d0, d1)
            _store(y, t, r, n, scale, vsum(vadd(vadd(a0, a1), vadd(a2, a3))), vsum(vadd(b0, b1)),
                   vsum(vadd(c0, c1)), vsum(vadd(d0, d1)))


@numba.njit(parallel=True, cache=True, nogil=True)
def csr_gemv(values, row_start, indices, scales, x, y, ahead):  # pragma: no cover - compiled
    """CSR rows: 16 values at a time against x gathered at their uint16 column indices.

    values, indices: packed, with at least 16 spare entries at the end; x float32 [batch, width] in column
    order; other arguments as chunked_gemv."""
    batch, width = x.shape
    for r in numba.prange(y.shape[1]):
        scale = scales[r] if scales.size else np.float32(1.0)
        start, end = row_start[r], row_start[r + 1]
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
            _store(y, t, r, n, scale, vsum(a0), vsum(a1), vsum(a2), vsum(a3))
