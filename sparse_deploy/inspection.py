"""Sparsity statistics of a checkpoint's weights, read from its weight files without building the model."""

from __future__ import annotations

import json
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from sparse_deploy.formats.checkpoint import Manifest, read_manifest
from sparse_deploy.hf import check_finite_weights
from sparse_deploy.errors import InvalidInputError, ModelLoadError, first_line

_CANDIDATE_PATTERNS = ((2, 4), (4, 8), (1, 4))


@dataclass(frozen=True)
class WeightStats:
    name: str
    shape: tuple[int, ...]
    numel: int
    zeros: int
    pattern: str | None  # "n:m" when every aligned group of m inputs of every row has at least n zeros

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class Inspection:
    folder: Path
    weights: tuple[WeightStats, ...]
    manifest: Manifest | None

    @property
    def total_params(self) -> int:
        return sum(w.numel for w in self.weights)

    @property
    def total_zeros(self) -> int:
        return sum(w.zeros for w in self.weights)

    def pruned(self, threshold: float = 0.1) -> tuple[WeightStats, ...]:
        """The matrices recorded as pruned in the manifest, else those with more than ``threshold`` zeros."""
        if self.manifest is not None:
            names = {rec.weight_name for rec in self.manifest.layers}
            return tuple(w for w in self.weights if w.name in names)
        return tuple(w for w in self.weights if w.sparsity > threshold)

    @property
    def pruned_params(self) -> int:
        return sum(w.numel for w in self.pruned())

    @property
    def pruned_zeros(self) -> int:
        return sum(w.zeros for w in self.pruned())

    @property
    def rel_errors(self) -> dict[str, float]:
        """Each pruned weight's reconstruction error, as the manifest records it (empty without one)."""
        return {rec.weight_name: rec.rel_error for rec in self.manifest.layers} if self.manifest else {}

    def to_json(self) -> dict:
        """Every row and total: what ``sparse-deploy inspect --json`` writes."""
        pruned, errors = {w.name for w in self.pruned()}, self.rel_errors
        return {
            "folder": str(self.folder),
            "weights": [{"name": w.name, "shape": list(w.shape), "zeros": w.zeros, "numel": w.numel,
                         "sparsity": w.sparsity, "pattern": w.pattern, "pruned": w.name in pruned,
                         "rel_error": errors.get(w.name)} for w in self.weights],
            "pruned_zeros": self.pruned_zeros, "pruned_params": self.pruned_params,
            "total_zeros": self.total_zeros, "total_params": self.total_params,
        }


def nm_pattern(weight: torch.Tensor) -> str | None:
    """The first of 2:4, 4:8, 1:4 that every aligned group of m inputs satisfies (at least n zeros), or None.
    Inputs run along dim 1 ([out, in], torch) or along dim 0 ([in, out], GPT-2's Conv1D): both are tried."""
    if weight.dim() != 2:
        return None
    is_zero = weight == 0
    for n, m in _CANDIDATE_PATTERNS:
        for layout in (is_zero, is_zero.T):
            if layout.shape[1] % m == 0 and bool((layout.reshape(layout.shape[0], -1, m).sum(-1) >= n).all()):
                return f"{n}:{m}"
    return None


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files: safetensors (single or sharded), else PyTorch .bin."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / shard for shard in shards]
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        found = sorted(folder.glob(pattern))
        if found:
            return found
    raise ModelLoadError(f"{folder} holds no weight files (*.safetensors or pytorch_model*.bin)")


def _tensors(path: Path):
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():
                    yield key, fh.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise InvalidInputError(f"{path} is not a readable safetensors file: {exc}") from None
    else:
        try:
            with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise InvalidInputError(f"{path} is a pickle holding more than plain tensors; sparse-deploy does not run "
                                    f"the code such a file can carry, so convert it to safetensors first") from None
        except (OSError, RuntimeError, EOFError) as exc:
            raise InvalidInputError(f"{path} is not a readable PyTorch weight file: {first_line(exc)}") from None
        if not isinstance(state, dict):
            raise InvalidInputError(f"{path} holds a {type(state).__name__}, not a dictionary of named tensors")
        yield from state.items()


def inspect_checkpoint(folder: str | Path) -> Inspection:
    """Per-matrix shapes, zeros and n:m pattern of every 2-D floating-point tensor in a checkpoint folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"{folder} is not a folder")
    weights = []
    for path in weight_files(folder):
        for name, tensor in _tensors(path):
            if not isinstance(tensor, torch.Tensor):
                continue
            check_finite_weights([(name, tensor)], folder)
            if tensor.dim() == 2 and tensor.is_floating_point():
                zeros = int((tensor == 0).sum())
                pattern = nm_pattern(tensor) if zeros else None
                weights.append(WeightStats(name, tuple(tensor.shape), tensor.numel(), zeros, pattern))
    return Inspection(folder, tuple(weights), read_manifest(folder))
