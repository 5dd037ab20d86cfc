"""What an adapter declares about one architecture, and the model-agnostic helpers that read it.

Adapters are the only code that knows Hugging Face module names. Each is a small frozen record:
where the transformer blocks are, and which linear layers each block holds, in the order a block uses them,
grouped by shared input (the groups are also the steps of ``--true-sequential``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Kind = Literal["decoder", "encoder"]


@dataclass(frozen=True)
class Adapter:
    """``layers``: dotted path from the base model (``model.base_model``) to the ModuleList of blocks.
    ``groups``: linear layers inside a block, in forward order; the members of a group read the same input.
    ``conv1d``: weights are stored [in, out] (GPT-2's Conv1D) instead of torch's [out, in].
    """

    model_types: tuple[str, ...]
    kind: Kind
    layers: str
    groups: tuple[tuple[str, ...], ...]
    conv1d: bool = False

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.base_model.get_submodule(self.layers)

    def set_blocks(self, model: nn.Module, blocks: nn.ModuleList) -> None:
        parent, _, name = self.layers.rpartition(".")
        setattr(model.base_model.get_submodule(parent) if parent else model.base_model, name, blocks)

    def linears(self, block: nn.Module) -> dict[str, nn.Module]:
        """The block's prunable linear layers by their name inside the block, in forward order."""
        return {name: block.get_submodule(name) for group in self.groups for name in group}

    def get_weight(self, linear: nn.Module) -> torch.Tensor:
        """The weight as [out, in] (a view for nn.Linear, a transposed view for Conv1D)."""
        return linear.weight.data.T if self.conv1d else linear.weight.data

    def set_weight(self, linear: nn.Module, weight: torch.Tensor) -> None:
        """Write an [out, in] weight back in the layer's own layout, dtype and device."""
        target = linear.weight.data
        target.copy_(weight.T if self.conv1d else weight)
