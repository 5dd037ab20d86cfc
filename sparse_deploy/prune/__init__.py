"""Pruning: the SparseGPT solver, its baselines, and (later) the layer-by-layer driver."""

from sparse_deploy.prune.baselines import magnitude, wanda
from sparse_deploy.prune.hessian import HessianAccumulator
from sparse_deploy.prune.solver import PruneResult, sparsify

__all__ = ["HessianAccumulator", "PruneResult", "magnitude", "sparsify", "wanda"]
