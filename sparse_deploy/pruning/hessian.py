"""Streaming accumulation of a linear layer's input Hessian H = 2/n · Σ xxᵀ (SparseGPT section 2).

Kept apart from the solve: the driver feeds calibration batches, the solver only sees the finished H.
"""

from __future__ import annotations

import torch

from sparse_deploy.errors import InvalidInputError


class HessianAccumulator:
    """Running mean of 2·xxᵀ over every token row of the inputs seen so far.

    ``dtype`` is float32 (default) or float64; inputs are cast to it before the product.
    """

    def __init__(self, cols: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if dtype not in (torch.float32, torch.float64):
            raise InvalidInputError(f"Hessian dtype must be float32 or float64, got {dtype}")
        self.cols = cols
        self.nsamples = 0
        self.H = torch.zeros((cols, cols), dtype=dtype, device=device)

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs [..., cols] (every leading index is one sample row)."""
        if x.shape[-1] != self.cols:
            raise InvalidInputError(f"input has {x.shape[-1]} features, the Hessian expects {self.cols}")
        x = x.detach().reshape(-1, self.cols).to(device=self.H.device, dtype=self.H.dtype)
        b = x.shape[0]
        if b == 0:
            return
        total = self.nsamples + b
        # H ← n/(n+b)·H + 2/(n+b)·XᵀX, [cols, cols]: the rescale rides along in the GEMM
        self.H.addmm_(x.T, x, beta=self.nsamples / total, alpha=2.0 / total)
        self.nsamples = total
