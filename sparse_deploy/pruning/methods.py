"""The pruning methods behind one signature, keyed by the name ``PruneConfig.method`` takes:

    method(W [out, in], H [in, in], spec, solver, *, name, quant, overwrite_h) -> PruneResult

``sparsegpt`` solves with OBS updates (and joint quantization with ``quant``); ``wanda`` and ``magnitude`` only
choose a mask (see ``baselines``). ``overwrite_h``: the caller is done with H, so the solver may damp it in
place instead of copying it. The drivers look the method up here, never by comparing strings.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sparse_deploy.config import QuantSpec, SolverConfig, SparsitySpec
from sparse_deploy.errors import ConfigError
from sparse_deploy.pruning.baselines import magnitude, wanda
from sparse_deploy.pruning.solver import PruneResult, sparsify

PruneMethod = Callable[..., PruneResult]


def _sparsegpt(W: torch.Tensor, H: torch.Tensor, spec: SparsitySpec, solver: SolverConfig, *, name: str,
               quant: QuantSpec | None, overwrite_h: bool = False) -> PruneResult:
    return sparsify(W, H, spec, solver, name=name, quant=quant, overwrite_h=overwrite_h)


def _wanda(W: torch.Tensor, H: torch.Tensor, spec: SparsitySpec, solver: SolverConfig, *, name: str,
           quant: QuantSpec | None, overwrite_h: bool = False) -> PruneResult:
    return wanda(W, H, spec, name=name)


def _magnitude(W: torch.Tensor, H: torch.Tensor, spec: SparsitySpec, solver: SolverConfig, *, name: str,
               quant: QuantSpec | None, overwrite_h: bool = False) -> PruneResult:
    return magnitude(W, H, spec, name=name)


METHODS: dict[str, PruneMethod] = {"sparsegpt": _sparsegpt, "wanda": _wanda, "magnitude": _magnitude}


def method(name: str) -> PruneMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {name!r}") from None
