"""sparse-deploy: prune Hugging Face models with SparseGPT, export them to sparse ONNX, measure them on CPUs.

The public API is imported lazily, so that ``sparse_deploy.runtime`` (onnxruntime and numpy only) can be used
without importing torch:

    from sparse_deploy import prune, evaluate, PruneConfig, SparsitySpec
    from sparse_deploy import export, ExportConfig
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "prune": "sparse_deploy.api",
    "evaluate": "sparse_deploy.evaluation",
    "PruneReport": "sparse_deploy.api",
    "EvalReport": "sparse_deploy.evaluation",
    "PruneConfig": "sparse_deploy.config",
    "CalibrationConfig": "sparse_deploy.config",
    "EvalConfig": "sparse_deploy.config",
    "SolverConfig": "sparse_deploy.config",
    "SparsitySpec": "sparse_deploy.config",
    "QuantSpec": "sparse_deploy.config",
    "inspect_checkpoint": "sparse_deploy.inspection",
    "benchmark": "sparse_deploy.bench",
    "BenchConfig": "sparse_deploy.bench",
    "export": "sparse_deploy.exporting.pipeline",
    "ExportConfig": "sparse_deploy.config",
    "ExportReport": "sparse_deploy.exporting",
    "ParityReport": "sparse_deploy.exporting",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sparse_deploy' has no attribute {name!r}")
