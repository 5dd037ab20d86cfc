"""Baselines with the solver's interface: magnitude pruning and Wanda (Sun et al. 2023).

Neither updates the surviving weights; both only choose a mask. ``loss`` is the same quantity the solver
reports, ½·ΔwᵢHΔwᵢᵀ per row, so methods compare on one scale (NaN when no Hessian is given).
"""

from __future__ import annotations

import math

import torch

from sparse_deploy.config import SparsitySpec
from sparse_deploy.pruning.solver import PruneResult, _select_lowest, check_problem


def lowest_mask(scores: torch.Tensor, spec: SparsitySpec, *, per_row: bool) -> torch.Tensor:
    """True for the entries to prune: the lowest scores per matrix, per row, or n per group of m."""
    rows, cols = scores.shape
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if spec.is_nm:
        groups = scores.reshape(rows, cols // spec.m, spec.m)  # type: ignore[operator]
        lowest = torch.argsort(groups, dim=-1, stable=True)[..., : spec.n]
        mask.view(rows, cols // spec.m, spec.m).scatter_(-1, lowest, True)  # type: ignore[operator]
    elif per_row:
        k = int(math.floor(spec.sparsity * cols + 0.5))  # type: ignore[operator]
        if k:
            mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False, sorted=False).indices, True)
    else:
        mask = _select_lowest(scores, int(math.floor(spec.sparsity * scores.numel() + 0.5)))  # type: ignore[operator]
    return mask


def row_losses(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor | None) -> torch.Tensor:
    """½·diag(ΔW H ΔWᵀ), [rows]; NaN without H."""
    if H is None:
        return torch.full((W.shape[0],), float("nan"))
    delta = (W - W_hat).float()
    return ((delta @ H.float().to(delta.device)) * delta).sum(dim=1) / 2


def _apply(W: torch.Tensor, H: torch.Tensor | None, mask: torch.Tensor) -> PruneResult:
    pruned = W.masked_fill(mask, 0)
    return PruneResult(weight=pruned, mask=mask, loss=row_losses(W, pruned, H))


def magnitude(
    W: torch.Tensor, H: torch.Tensor | None, spec: SparsitySpec, *, per_row: bool = False, name: str = "weight"
) -> PruneResult:
    """Prune the smallest |W_ij|, over the whole matrix (default) or within each output row."""
    check_problem(W, H, spec, None, name)
    return _apply(W, H, lowest_mask(W.detach().float().abs(), spec, per_row=per_row))


def wanda(W: torch.Tensor, H: torch.Tensor, spec: SparsitySpec, *, name: str = "weight") -> PruneResult:
    """Prune the smallest |W_ij|·‖X_j‖₂ within each output row; ‖X_j‖₂ ∝ sqrt(H_jj) since H = 2/n·XᵀX."""
    check_problem(W, H, spec, None, name)
    norms = H.detach().diagonal().float().clamp_min(0).sqrt().to(W.device)  # [cols]
    return _apply(W, H, lowest_mask(W.detach().float().abs() * norms[None, :], spec, per_row=True))
