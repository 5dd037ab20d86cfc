"""Pruning: the SparseGPT solver, its baselines and the layer-by-layer driver. ``sparse_deploy.prune`` (the
function) is in ``sparse_deploy.api``."""

from sparse_deploy.pruning.baselines import magnitude, wanda
from sparse_deploy.pruning.hessian import HessianAccumulator
from sparse_deploy.pruning.solver import PruneResult, sparsify

__all__ = ["HessianAccumulator", "PruneResult", "magnitude", "sparsify", "wanda"]
