"""The SparseGPT column sweep inside one block as a numba kernel for the CPU.

Rows are independent inside a block sweep, so the kernel hands chunks of ``row_chunk`` rows to threads and
sweeps each row on its own: the row (B floats) stays in L1 and the block's U (B x B) in L2, and nothing larger
than a row of indices is allocated. Only pruned weights start an update, so the kernel first lists a row's
pruned columns without branching and then walks that list. It computes the same function as
``solver._sweep_torch``: the same operations in the same order, so the same mask and the same weights.
"""

from __future__ import annotations

from sparse_deploy.machine import use_user_numba_cache

use_user_numba_cache()  # before numba is imported: its cache=True kernels go to the user cache, not the source tree
import numba  # noqa: E402
import numpy as np  # noqa: E402


@numba.njit(inline="always")
def _prune_and_update(W1, U1, r, i, err, loss):  # pragma: no cover - compiled
    """Prune W1[r, i] and spread its error over the row's later block columns (OBS, section 3)."""
    e = W1[r, i] / U1[i, i]  # (w - q)/[U]_ii with q = 0
    err[r, i] = e
    loss[r] += (e * e) / np.float32(2.0)
    # U is upper triangular, so starting at a multiple of 32 below i+1 changes nothing (w - e·0 = w) and gives
    # the vectorised loop whole iterations; unsigned indices let LLVM vectorise it at all.
    for j in range(numba.uint64((i + 1) & ~31), numba.uint64(W1.shape[1])):
        W1[r, j] -= e * U1[i, j]
    W1[r, i] = 0.0


@numba.njit(parallel=True, cache=True, nogil=True)
def sweep_block(W1, U1, mask1, n, m, row_chunk, err, loss):  # pragma: no cover - compiled
    """In place: W1 [rows, B] float32 -> pruned block; err [rows, B] float32 (zeros in) <- (w - q)/U_ii;
    loss [rows] float32 += ½·err². With n > 0, mask1 [rows, B] (False in) receives the n:m mask, chosen when
    the sweep reaches each group of m columns; with n = 0, mask1 is the given mask."""
    rows, count = W1.shape
    nchunks = (rows + row_chunk - 1) // row_chunk
    for c in numba.prange(nchunks):
        r0 = c * row_chunk
        r1 = min(rows, r0 + row_chunk)
        pruned = np.empty(count, dtype=np.int64)
        scores = np.empty(max(m, 1), dtype=np.float32)
        for r in range(r0, r1):
            if n == 0:
                total = 0
                for i in range(count):  # the row's pruned columns, in order, without a branch
                    pruned[total] = i
                    total += mask1[r, i]
                for t in range(total):
                    _prune_and_update(W1, U1, r, pruned[t], err, loss)
                continue
            for g in range(0, count, m):
                for j in range(m):  # w²/[H⁻¹]_jj² of the group, from the weights as updated so far
                    v = W1[r, g + j]
                    d = U1[g + j, g + j]
                    scores[j] = (v * v) / (d * d)
                for _ in range(n):  # the n lowest, ties to the lower index (as a stable argsort)
                    best = -1
                    for j in range(m):
                        if not mask1[r, g + j] and (best < 0 or scores[j] < scores[best]):
                            best = j
                    mask1[r, g + best] = True
                for j in range(m):
                    if mask1[r, g + j]:
                        _prune_and_update(W1, U1, r, g + j, err, loss)


@numba.njit(inline="always")
def _group_params(W1, r, g0, g1, bits, symmetric):  # pragma: no cover - compiled
    """Scale and zero point of W1[r, g0:g1], as ``quant.group_params`` computes them."""
    if bits == 8:
        amax = np.float32(0.0)
        for j in range(g0, g1):
            a = abs(W1[r, j])
            if a > amax:
                amax = a
        return amax / np.float32(64.0), np.float32(0.0)
    if symmetric:  # the value of largest magnitude, first of equals, with its sign
        best = g0
        amax = abs(W1[r, g0])
        for j in range(g0 + 1, g1):
            a = abs(W1[r, j])
            if a > amax:
                amax = a
                best = j
        return W1[r, best] / np.float32(-8.0), np.float32(0.0)
    lo = np.float32(0.0)
    hi = np.float32(0.0)
    for j in range(g0, g1):
        lo = min(lo, W1[r, j])
        hi = max(hi, W1[r, j])
    s = (hi - lo) / np.float32(15.0)
    safe = s if s > 0 else np.float32(1.0)
    z = np.float32(min(max(np.rint(-lo / safe), np.float32(0.0)), np.float32(15.0)))
    return s, z


@numba.njit(inline="always")
def _round_to_grid(v, s, z, qlo, qhi, symmetric):  # pragma: no cover - compiled
    """(q - z)·s with q = clip(round(v / s) + z): the grid value ``quant.round_to_grid`` gives."""
    safe = s if s != 0 else np.float32(1.0)
    q = np.float32(np.rint(v / safe))
    if not symmetric:
        q = q + z
    q = min(max(q, qlo), qhi)
    if symmetric and s == 0:
        q = np.float32(0.0)
    return (q - z) * s


@numba.njit(parallel=True, cache=True, nogil=True)
def sweep_block_quant(W1, U1, mask1, n, m, row_chunk, err, loss, scales1, zeros1, qgroup, bits, symmetric,
                      qlo, qhi):  # pragma: no cover - compiled
    """``sweep_block`` with every kept weight rounded to its grid and its error spread like a pruning error
    (section 3.5), so every column starts an update. scales1, zeros1 [rows, groups] float32: with ``qgroup`` 0,
    column 0 holds the whole block's scale; otherwise group g's is fixed when the sweep reaches column g·qgroup,
    from the row's weights as updated so far. qlo, qhi (float32): the grid's integer range."""
    rows, count = W1.shape
    nchunks = (rows + row_chunk - 1) // row_chunk
    for c in numba.prange(nchunks):
        r0 = c * row_chunk
        r1 = min(rows, r0 + row_chunk)
        scores = np.empty(max(m, 1), dtype=np.float32)
        for r in range(r0, r1):
            s = scales1[r, 0]
            z = zeros1[r, 0]
            for i in range(count):
                if qgroup > 0 and i % qgroup == 0:
                    g = i // qgroup
                    s, z = _group_params(W1, r, i, min(i + qgroup, count), bits, symmetric)
                    scales1[r, g] = s
                    zeros1[r, g] = z
                if n > 0 and i % m == 0:
                    for j in range(m):
                        v = W1[r, i + j]
                        d = U1[i + j, i + j]
                        scores[j] = (v * v) / (d * d)
                    for _ in range(n):
                        best = -1
                        for j in range(m):
                            if not mask1[r, i + j] and (best < 0 or scores[j] < scores[best]):
                                best = j
                        mask1[r, i + best] = True
                v = W1[r, i]
                q = np.float32(0.0) if mask1[r, i] else _round_to_grid(v, s, z, qlo, qhi, symmetric)
                e = (v - q) / U1[i, i]
                err[r, i] = e
                loss[r] += (e * e) / np.float32(2.0)
                for j in range(numba.uint64((i + 1) & ~31), numba.uint64(count)):
                    W1[r, j] -= e * U1[i, j]
                W1[r, i] = q


@numba.njit(cache=True, nogil=True)
def _bin_of_rank(hist, rank):  # pragma: no cover - compiled
    """The bin holding the rank-th (1-based) entry, and its rank inside that bin."""
    b = 0
    while rank > hist[b]:
        rank -= hist[b]
        b += 1
    return b, rank


@numba.njit(cache=True, nogil=True)
def select_lowest(W1, diag, k, mask1, scratch):  # pragma: no cover - compiled
    """mask1 [rows, B] = True for the k lowest scores w²/d_j² of W1 [rows, B] over the whole block, ties to
    the lower row-major index (the same choice as ``solver._select_lowest``). ``scratch``: float32, >= rows·B.

    Radix select on the scores' float bits (for non-negative floats, bit order is value order): a histogram of
    the top 11 bits over all scores, then of the next 11 and the last 10 over the scores in the chosen bin,
    find the k-th lowest; one pass writes the mask. O(n), no sort.
    """
    rows, count = W1.shape
    n = rows * count
    if k <= 0:
        mask1[:] = False
        return
    dd = diag * diag
    scores = scratch[:n].reshape((rows, count))
    for r in range(rows):
        for j in range(numba.uint64(0), numba.uint64(count)):
            scores[r, j] = (W1[r, j] * W1[r, j]) / dd[j]  # w²/[H⁻¹]_jj², as the solver computes it
    keys = scratch[:n].view(np.uint32)
    mask = mask1.reshape(-1)
    hist = np.zeros(2048, dtype=np.int64)
    for i in range(n):  # pass 1: top 11 bits of every key
        hist[keys[i] >> np.uint32(21)] += 1
    top, remaining = _bin_of_rank(hist, k)  # remaining: rank of the k-th key inside its bin
    candidates = np.empty(hist[top], dtype=np.uint32)
    c = 0
    for i in range(n):  # pass 2: the keys in that bin
        if keys[i] >> np.uint32(21) == top:
            candidates[c] = keys[i]
            c += 1
    hist[:] = 0
    for key in candidates:
        hist[(key >> np.uint32(10)) & np.uint32(2047)] += 1
    mid, remaining = _bin_of_rank(hist, remaining)
    hist[:] = 0
    for key in candidates:
        if (key >> np.uint32(10)) & np.uint32(2047) == mid:
            hist[key & np.uint32(1023)] += 1
    low, remaining = _bin_of_rank(hist, remaining)
    kth = np.uint32((top << 21) | (mid << 10) | low)  # the k-th lowest key
    for i in range(numba.uint64(0), numba.uint64(n)):  # pass 3, branch-free: about half go each way
        mask[i] = keys[i] < kth
    ties = remaining  # keys equal to the k-th lowest that are pruned too, lowest index first
    i = 0
    while ties > 0:
        if keys[i] == kth:
            mask[i] = True
            ties -= 1
        i += 1
