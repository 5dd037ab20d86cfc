"""The n:m mask step of the column sweep, shared by the plain and the quantizing torch sweeps."""

from __future__ import annotations

import torch


def choose_nm(W1: torch.Tensor, diag: torch.Tensor, mask1: torch.Tensor, i: int, n: int, m: int) -> None:
    """Mark in ``mask1`` the n weights of each row's group of m columns from ``i`` with the lowest w²/[H⁻¹]_jj²."""
    group = W1[:, i : i + m]
    scores = (group * group) / (diag[i : i + m] * diag[i : i + m])  # [rows, m]
    lowest = torch.argsort(scores, dim=1, stable=True)[:, :n]
    mask1.scatter_(1, i + lowest, True)
