"""Shared test helpers: offline assets, small correlated problems, and the gpu marker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SPARSE_DEPLOY_SHARED", ROOT.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """A file under ../shared (or $SPARSE_DEPLOY_SHARED); skips the test when the asset is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"offline asset {path} is not present")
    return path


def correlated_inputs(n: int, cols: int, seed: int = 0, outliers: int = 4) -> torch.Tensor:
    """Calibration-like inputs [n, cols]: correlated features and a few large-magnitude outlier features."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5 + torch.eye(cols)
    X = torch.randn(n, cols, generator=gen) @ mix
    X[:, :outliers] *= 8.0
    return X


def hessian_of(X: torch.Tensor) -> torch.Tensor:
    return 2.0 / X.shape[0] * X.T @ X


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
