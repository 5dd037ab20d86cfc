"""Pruning: the SparseGPT solver, its baselines and the layer-by-layer driver. Called as a function, the package
is ``sparse_deploy.api.prune`` (see ``sparse_deploy._callable``)."""

from sparse_deploy._callable import make_callable
from sparse_deploy.prune.baselines import magnitude, wanda
from sparse_deploy.prune.hessian import HessianAccumulator
from sparse_deploy.prune.solver import PruneResult, sparsify

__all__ = ["HessianAccumulator", "PruneResult", "magnitude", "sparsify", "wanda"]

make_callable(__name__, "sparse_deploy.api:prune")
