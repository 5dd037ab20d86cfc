"""Shared test helpers: offline assets, small correlated problems, and the gpu marker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests are offline: nothing may reach the Hugging Face hub (set before transformers/datasets are imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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


def solver_problem(rows: int, cols: int, seed: int = 0, n: int = 2048):
    """A weight matrix [rows, cols], correlated inputs [n, cols] and their Hessian: one layer's pruning problem."""
    X = correlated_inputs(n, cols, seed=seed)
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed + 1))
    return W, X, hessian_of(X)


def relative_error(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    """‖(W − Ŵ)Xᵀ‖² / ‖WXᵀ‖²"""
    return float(((W - W_hat) @ X.T).square().sum() / (W @ X.T).square().sum())


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory) -> Path:
    """50k characters of real text (WikiText-2 validation) for fast calibration."""
    source = shared_path("data", "wikitext-2", "valid.txt").read_text(encoding="utf-8")[:50_000]
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(source, encoding="utf-8")
    return path


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
