"""Layer-by-layer pruning (SparseGPT section 4): capture the first block's inputs for the calibration set,
then per block: accumulate each linear layer's input Hessian with hooks, prune, and recompute the block's
outputs with the pruned weights, which become the next block's inputs.

Memory stays bounded: the weights stay where they were loaded (CPU) and only the block being pruned moves to the
solver's device; the calibration activations exist once ([nsamples, seqlen, hidden]) and are overwritten in place.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from sparse_deploy.adapters import Adapter
from sparse_deploy.config import PruneConfig, SolverConfig
from sparse_deploy.errors import ConfigError
from sparse_deploy.formats.checkpoint import LayerRecord
from sparse_deploy.machine import resolve_device
from sparse_deploy.pruning.activations import Activations, RamActivations
from sparse_deploy.pruning.hessian import HessianAccumulator
from sparse_deploy.pruning.methods import method
from sparse_deploy.pruning.solver import PruneResult


@dataclass(frozen=True)
class LinearReport:
    """One pruned linear layer: ``rel_error`` is ‖(W − Ŵ)Xᵀ‖² / ‖WXᵀ‖² on its calibration inputs."""

    name: str
    shape: tuple[int, int]
    sparsity: float
    rel_error: float
    time_s: float
    scales: torch.Tensor | None = None  # joint quantization: [out, groups] float32 (see PruneResult)
    zero_points: torch.Tensor | None = None

    def record(self, pattern: str | None) -> LayerRecord:
        """The manifest's record of this layer (``pattern``: the n:m pattern pruned to, if any)."""
        return LayerRecord(self.name, self.shape, self.sparsity, pattern, self.rel_error, self.time_s)


@dataclass(frozen=True)
class SequentialReport:
    linears: tuple[LinearReport, ...]
    layer_times_s: tuple[float, ...]
    skipped: tuple[str, ...]


@dataclass(frozen=True)
class _Captured:
    """The first block's inputs: hidden states [nsamples, seqlen, hidden], and the other arguments the model
    passes to every block (masks, positions, rotary embeddings), the same for every window."""

    hidden: torch.Tensor | None  # None when recorded into a given sink
    args: tuple
    kwargs: dict


def prune_sequential(
    model: nn.Module, adapter: Adapter, windows: torch.Tensor, config: PruneConfig, *, progress: bool = True
) -> SequentialReport:
    """Prune every linear layer of every block of ``model`` in place. ``windows``: token ids [nsamples, seqlen]."""
    device, solver, compute_dtype = solver_setup(config, model.dtype)
    blocks = adapter.blocks(model)
    names = {module: name for name, module in model.named_modules()}
    prefixes = [names[block] for block in blocks]
    skip = check_skip(config, adapter, prefixes)

    with torch.no_grad():
        captured = capture_first_inputs(model, adapter, windows, device, compute_dtype)
        activations = RamActivations(captured.hidden)
        reports: list[LinearReport] = []
        skipped: list[str] = []
        layer_times: list[float] = []
        bar = tqdm(blocks, desc="prune", unit="layer", disable=not progress, leave=False)
        for prefix, block in zip(prefixes, bar):
            done = prune_block(block, prefix, adapter, captured, activations, activations, config, solver, device,
                               compute_dtype, skip)
            reports += done.linears
            skipped += done.skipped
            layer_times.append(done.time_s)
            bar.set_postfix(layer_s=f"{layer_times[-1]:.1f}")
    return SequentialReport(tuple(reports), tuple(layer_times), tuple(skipped))


def solver_setup(config: PruneConfig, model_dtype: torch.dtype) -> tuple[torch.device, SolverConfig, torch.dtype]:
    """The solver's device, the solver settings bound to it, and the dtype blocks compute in there."""
    device = resolve_device(config.solver.device)
    solver = replace(config.solver, device=device.type)  # type: ignore[arg-type]
    compute_dtype = torch.float32 if device.type == "cpu" else model_dtype  # CPU kernels want fp32
    return device, solver, compute_dtype


def check_skip(config: PruneConfig, adapter: Adapter, prefixes: list[str]) -> re.Pattern | None:
    """The compiled ``--skip`` pattern; an error when it would leave nothing to prune. ``prefixes``: each block's
    module path (``model.layers.3``)."""
    skip = re.compile(config.skip) if config.skip else None
    if skip:
        prunable = [f"{prefix}.{n}" for prefix in prefixes for group in adapter.groups for n in group]
        if all(skip.search(name) for name in prunable):
            raise ConfigError(f"--skip {config.skip!r} matches all {len(prunable)} linear layers; nothing would be "
                              f"pruned (names look like {prunable[0]!r})")
    return skip


@dataclass(frozen=True)
class BlockReport:
    linears: tuple[LinearReport, ...]
    skipped: tuple[str, ...]
    time_s: float


def prune_block(block: nn.Module, prefix: str, adapter: Adapter, captured: _Captured, inputs: Activations,
                outputs: Activations, config: PruneConfig, solver: SolverConfig, device: torch.device,
                compute_dtype: torch.dtype, skip: re.Pattern | None) -> BlockReport:
    """Prune one block in place (SparseGPT section 4) and write its outputs on the calibration set, which are the
    next block's inputs, to ``outputs`` (which may be ``inputs``: window j is read before it is overwritten).

    The one routine both drivers run, so the in-memory and the streaming prune compute the same numbers. The block
    computes on ``device`` in ``compute_dtype`` and returns to the CPU in its own dtype."""
    start = time.perf_counter()
    dtype = next(block.parameters()).dtype
    block.to(device=device, dtype=compute_dtype)
    reports: list[LinearReport] = []
    skipped: list[str] = []
    steps = [(group,) for group in adapter.groups] if config.true_sequential else [adapter.groups]
    for groups in steps:
        linears = {n: block.get_submodule(n) for group in groups for n in group}
        skipped += [f"{prefix}.{n}" for n in linears if skip and skip.search(f"{prefix}.{n}")]
        stats = _collect(block, adapter, groups, captured, inputs, skip, prefix, device)
        for local in list(stats):  # popped, so each group's Hessian goes once its last linear is pruned
            acc = stats.pop(local)
            last = all(other is not acc for other in stats.values())  # no linear left that reads this H
            reports.append(_prune_linear(linears[local], f"{prefix}.{local}", adapter, acc.H, config, solver, last))
            del acc
    for j in range(len(inputs)):  # outputs of the pruned block feed the next one
        outputs.write(j, _block_output(block(inputs.read(j, device), *captured.args, **captured.kwargs)))
    block.to(device="cpu", dtype=dtype)
    return BlockReport(tuple(reports), tuple(skipped), time.perf_counter() - start)


def capture_first_inputs(
    model: nn.Module, adapter: Adapter, windows: torch.Tensor, device: torch.device, dtype: torch.dtype,
    sink: Activations | None = None,
) -> _Captured:
    """Run the base model with only its first block, recording that block's inputs through a pre-hook.

    The block list is cut to its first block for the duration, so embeddings, the first block and the final
    norm run, nothing raises through the model, and the language-model head never runs. The inputs
    ([nsamples, seqlen, hidden] in ``dtype``) go to ``sink``, or to a new tensor on ``device`` (``hidden``).
    """
    blocks = adapter.blocks(model)
    base = model.base_model
    model_dtype = next(base.parameters()).dtype
    store: dict = {"sink": sink, "hidden": None, "count": 0}

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if store["sink"] is None:
            store["hidden"] = torch.empty((windows.shape[0], *hidden.shape[1:]), dtype=dtype, device=device)
            store["sink"] = RamActivations(store["hidden"])
        if "args" not in store:
            store["args"] = args[1:]
            store["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        store["sink"].write(store["count"], hidden)
        store["count"] += 1

    handle = blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    adapter.set_blocks(model, nn.ModuleList([blocks[0]]))
    try:
        base.to(device=device, dtype=dtype)
        for j in range(windows.shape[0]):
            ids = windows[j : j + 1].to(device)
            base(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        handle.remove()
        adapter.set_blocks(model, blocks)
        base.to(device="cpu", dtype=model_dtype)
    return _Captured(store["hidden"], store["args"], store["kwargs"])


def _collect(block, adapter, groups, captured, inputs, skip, prefix, device) -> dict[str, HessianAccumulator]:
    """Run the block over the calibration set with a hook on the first linear of each group: one Hessian per
    group of linears that share an input (skipped linears take no part)."""
    stats: dict[str, HessianAccumulator] = {}
    handles = []
    for group in groups:
        members = [local for local in group if not (skip and skip.search(f"{prefix}.{local}"))]
        if not members:
            continue
        first = block.get_submodule(members[0])
        acc = HessianAccumulator(adapter.get_weight(first).shape[1], device=device)
        handles.append(first.register_forward_hook(lambda module, inputs, output, acc=acc: acc.add(inputs[0])))
        stats.update({local: acc for local in members})
    try:
        for j in range(len(inputs)):
            block(inputs.read(j, device), *captured.args, **captured.kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _prune_linear(linear, name, adapter, H, config: PruneConfig, solver: SolverConfig,
                  last_use: bool = False) -> LinearReport:
    """``last_use``: no other linear reads H, so the solver may damp it in place instead of copying it."""
    start = time.perf_counter()
    W = adapter.get_weight(linear).clone()  # [out, in]
    # With H = 2/n·XᵀX: ‖(W − Ŵ)Xᵀ‖²/n = loss − ½λ‖ΔW‖² over live inputs, and ‖WXᵀ‖²/n = ½·tr(WHWᵀ).
    live = H.diagonal() != 0
    Wf = W.float()
    reference = 0.5 * float(((Wf @ H.float()) * Wf).sum())
    del Wf
    result: PruneResult = method(config.method)(W, H, config.spec, solver, name=name, quant=config.quant,
                                                overwrite_h=last_use)
    adapter.set_weight(linear, result.weight)
    delta = (W - result.weight)[:, live].float()
    error = float(result.loss.sum()) - 0.5 * result.damp * float(delta.square().sum())
    return LinearReport(
        name=name,
        shape=tuple(W.shape),
        sparsity=float(result.mask.float().mean()),
        rel_error=max(error, 0.0) / reference if reference > 0 else 0.0,
        time_s=time.perf_counter() - start,
        scales=None if result.scales is None else result.scales.cpu(),
        zero_points=None if result.zero_points is None else result.zero_points.cpu(),
    )


def _block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out
