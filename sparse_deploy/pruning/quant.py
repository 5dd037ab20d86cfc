"""Joint quantization in the SparseGPT sweep (Frantar & Alistarh 2023, section 3.5; the GPTQ step), torch side.

Each kept weight is rounded to its grid when the sweep reaches it, and its rounding error is pushed onto the
columns not yet processed by the same H⁻¹ row update that spreads a pruning error. A group's scale (and zero
point) is fixed when the sweep reaches the group's first column, from the group's weights as updated so far.
The grids are those of ``sparse_deploy.grids`` (what export writes); the numba kernel in ``cpu_sweep.py``
computes the same function, operation for operation.
"""

from __future__ import annotations

import torch

from sparse_deploy.config import QuantSpec
from sparse_deploy.pruning.masks import choose_nm


def group_params(G: torch.Tensor, quant: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point [rows] of a group G [rows, g] of consecutive input columns.

    int8: max|w| / 64. int4 symmetric: the value of largest magnitude, with its sign, / -8 (so it is exact at
    q = -8). int4 asymmetric: (max - min) / 15 over a range holding 0, zero point round(-min / scale).
    """
    zero = torch.zeros(G.shape[0], dtype=G.dtype, device=G.device)
    if quant.bits == 8:
        return G.abs().amax(dim=1) / 64.0, zero
    if quant.symmetric:
        at = G.abs().argmax(dim=1, keepdim=True)  # first of equal magnitudes, as numpy's argmax
        return G.gather(1, at)[:, 0] / -8.0, zero
    lo = G.amin(dim=1).clamp(max=0.0)
    hi = G.amax(dim=1).clamp(min=0.0)
    scale = (hi - lo) / 15.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.round(-lo / safe).clamp(0.0, 15.0)


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, quant: QuantSpec) -> torch.Tensor:
    """The dequantized grid value (q - zero)·scale nearest to w [rows] (q clipped to the grid's range)."""
    lo, hi = quant.qrange
    safe = torch.where(scale != 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe)
    if not quant.symmetric:
        q = q + zero
    q = q.clamp(float(lo), float(hi))
    if quant.symmetric:
        q = torch.where(scale != 0, q, torch.zeros_like(q))
    return (q - zero) * scale


def sweep_quant_torch(
    W1: torch.Tensor, U1: torch.Tensor, mask1: torch.Tensor, n: int, m: int, err: torch.Tensor, loss: torch.Tensor,
    scales1: torch.Tensor, zeros1: torch.Tensor, qgroup: int, quant: QuantSpec,
) -> None:
    """The block sweep of ``solver._sweep_torch`` with every kept weight rounded to the grid, in place.

    scales1, zeros1 [rows, groups]: with ``qgroup`` 0, column 0 holds the scale for the whole block (a group that
    started at or before the block); otherwise the sweep fixes group g's scale when it reaches column g·qgroup.
    """

    diag = U1.diagonal()
    scale, zero = scales1[:, 0], zeros1[:, 0]
    for i in range(W1.shape[1]):
        if qgroup and i % qgroup == 0:  # a new group: its scale from its weights as updated so far
            g = i // qgroup
            scales1[:, g], zeros1[:, g] = group_params(W1[:, i : i + qgroup], quant)
            scale, zero = scales1[:, g], zeros1[:, g]
        if n and i % m == 0:
            choose_nm(W1, diag, mask1, i, n, m)
        w = W1[:, i].clone()
        q = torch.where(mask1[:, i], torch.zeros_like(w), round_to_grid(w, scale, zero, quant))  # [rows]
        e = (w - q) / U1[i, i]
        loss += (e * e) / 2
        W1[:, i:] -= torch.outer(e, U1[i, i:])  # the same OBS update for pruning and rounding errors
        W1[:, i] = q
        err[:, i] = e
