"""The published SparseGPT reference solve (Frantar & Alistarh 2023, ``SparseGPT.fasterprune``), transcribed
as a test oracle and a timing baseline: Cholesky → inverse → Cholesky for H⁻¹'s factor, a full sort per block
for the threshold (``<=``, so a block may lose one weight more than its share), and one set of tensor operations
per column. ``benchmarks/bench_solver.py`` times it as ``torch_s``.
"""

from __future__ import annotations

import torch


def reference_prune(
    W: torch.Tensor, H: torch.Tensor, sparsity: float, prunen: int = 0, prunem: int = 0,
    blocksize: int = 128, percdamp: float = 0.01,
) -> torch.Tensor:
    W = W.clone().float()
    H = H.clone()
    rows, columns = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    losses = torch.zeros(rows)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i : (i + prunem)] ** 2 / (torch.diag(Hinv1)[i : (i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d**2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        losses += torch.sum(Losses1, 1) / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


def reference_prune_quant(
    W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True,
    mask: torch.Tensor | None = None, prunen: int = 0, prunem: int = 0, percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint pruning and quantization (SparseGPT section 3.5, GPTQ's step), written out plainly: float64, one
    column at a time over the whole matrix (no blocks, no lazy batch updates), scales from ``sparse_deploy.grids``
    on the group's weights as updated when the sweep reaches it. ``mask`` fixes an unstructured mask; prunen:prunem
    chooses n:m as the sweep goes. Returns (weights, scales [rows, groups])."""
    import numpy as np

    from sparse_deploy import grids

    W = W.clone().double()
    H = H.clone().double()
    rows, columns = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H[range(columns), range(columns)] += percdamp * torch.mean(torch.diag(H))
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    gs = columns if group_size is None else group_size
    groups = -(-columns // gs)
    scales = torch.zeros(rows, groups, dtype=torch.float64)
    zeros = None if symmetric else np.zeros((rows, 1), np.uint8)
    mask = torch.zeros(rows, columns, dtype=torch.bool) if mask is None else mask.clone()
    for i in range(columns):
        if i % gs == 0:
            G = W[:, i : i + gs].float().numpy()
            if bits == 8:
                s = grids.int8_scales(G)[:, None]
            else:
                s, zeros = grids.int4_scales(G, G.shape[1], symmetric)
            scales[:, i // gs] = torch.from_numpy(s[:, 0]).double()
        if prunen and i % prunem == 0:
            tmp = W[:, i : i + prunem] ** 2 / torch.diag(U)[i : i + prunem] ** 2
            mask.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
        w = W[:, i]
        col = w.float().numpy()[:, None]
        q = grids.quantize(col, s, zeros, bits=bits, group_size=None)
        dq = torch.from_numpy(grids.dequantize(q, s, zeros, group_size=None)[:, 0]).double()
        q = torch.where(mask[:, i], torch.zeros_like(w), dq)
        e = (w - q) / U[i, i]
        W[:, i:] -= torch.outer(e, U[i, i:])
        W[:, i] = q
    return W, scales
