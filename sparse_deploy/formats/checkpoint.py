"""The pruned checkpoint's manifest, ``sparse_deploy.json``: the file format between ``prune`` and ``export``.

A pruned checkpoint is a plain ``save_pretrained`` folder (safetensors, zeros stored) plus this manifest:

    {
      "format_version": 1, "tool_version": "0.1.0",
      "model": {"source": "facebook/opt-125m", "model_type": "opt", "architecture": "OPTForCausalLM"},
      "method": "sparsegpt" | "wanda" | "magnitude",
      "sparsity": 0.5 | null, "pattern": "2:4" | null,       # exactly one is set
      "calibration": {"source": "wikitext2", "nsamples": 128, "seqlen": 2048, "seed": 0},
      "solver": {"blocksize": 128, "percdamp": 0.01, "device": "cpu", "true_sequential": false, "skip": null},
      "layers": [{"name": "model.decoder.layers.0.self_attn.q_proj",   # module path; weight is name + ".weight"
                  "shape": [768, 768], "sparsity": 0.5, "pattern": null, "rel_error": 0.012, "time_s": 0.3}],
      "totals": {"prunable_params": 84934656, "pruned_params": 42467328, "sparsity": 0.5},
      "time_s": 123.4, "time_per_layer_s": [...], "peak_rss_bytes": 1234567890,
      "versions": {"torch": "2.13.0+cpu", "transformers": "4.57.6", "python": "3.11.7"}
    }

``rel_error`` is ‖(W − Ŵ)Xᵀ‖² / ‖WXᵀ‖² on the calibration inputs of that linear layer.

With joint quantization (``prune --bits``) the stored weights are the dequantized grid values (so transformers
loads the folder as usual) and the manifest gains

      "quantization": {"bits": 4, "group_size": 128, "symmetric": true, "scheme": "int4-symmetric-per-group",
                       "qmin": -8, "qmax": 7, "scales_file": "quant_scales.safetensors"}

where ``quant_scales.safetensors`` holds, per quantized weight, ``<weight name>.scales`` (float32 [out] per output
channel for int8, [out, ceil(in / group_size)] for int4) and, when asymmetric, ``<weight name>.zero_points``
(uint8, same shape): every stored weight is (q - zero point)·scale for an integer q in [qmin, qmax], pruned ones
0. ``export --quantize`` reads these scales, so it writes the solver's integers instead of rounding again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sparse_deploy.errors import InvalidInputError

MANIFEST_NAME = "sparse_deploy.json"
SCALES_NAME = "quant_scales.safetensors"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class LayerRecord:
    name: str
    shape: tuple[int, int]
    sparsity: float
    pattern: str | None = None
    rel_error: float | None = None
    time_s: float | None = None

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight"


@dataclass(frozen=True)
class Manifest:
    model: dict[str, Any]
    method: str
    sparsity: float | None
    pattern: str | None
    calibration: dict[str, Any]
    solver: dict[str, Any]
    layers: tuple[LayerRecord, ...]
    totals: dict[str, Any]
    time_s: float
    time_per_layer_s: tuple[float, ...]
    peak_rss_bytes: int
    versions: dict[str, Any]
    tool_version: str
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] | None = None

    @classmethod
    def of_run(cls, layers: tuple[LayerRecord, ...], **fields: Any) -> Manifest:
        """A prune run's manifest: ``fields`` as stored, the totals counted from ``layers``."""
        pruned = sum(round(r.sparsity * r.shape[0] * r.shape[1]) for r in layers)
        prunable = sum(r.shape[0] * r.shape[1] for r in layers)
        totals = {"prunable_params": prunable, "pruned_params": pruned,
                  "sparsity": pruned / prunable if prunable else 0.0}
        return cls(layers=tuple(layers), totals=totals, **fields)

    def layer(self, name: str) -> LayerRecord | None:
        return next((rec for rec in self.layers if rec.name == name or rec.weight_name == name), None)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["layers"] = [asdict(rec) for rec in self.layers]
        return data


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    path = Path(folder) / MANIFEST_NAME
    path.write_text(json.dumps(manifest.to_json(), indent=1) + "\n", encoding="utf-8")
    return path


def read_manifest(folder: str | Path) -> Manifest | None:
    """The manifest of a pruned checkpoint, or None for a folder without one (any Hugging Face model)."""
    path = Path(folder) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        layers = tuple(
            LayerRecord(**{**rec, "shape": tuple(rec["shape"])}) for rec in data.pop("layers")
        )
        data["time_per_layer_s"] = tuple(data.get("time_per_layer_s", ()))
        return Manifest(layers=layers, **data)
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidInputError(f"{path} is not a valid sparse-deploy manifest ({exc}); re-run prune") from exc


@dataclass(frozen=True)
class WeightGrid:
    """The grid of one quantized weight [out, in]: ``scales`` float32 ([out] for int8, [out, groups] for int4),
    ``zero_points`` uint8 of the same shape or None (symmetric). ``group_size`` None means per output channel."""

    bits: int
    group_size: int | None
    scales: Any
    zero_points: Any = None


def write_scales(folder: str | Path, tensors: dict[str, Any]) -> Path:
    """The sidecar of solver scales (numpy arrays keyed ``<weight>.scales`` / ``<weight>.zero_points``)."""
    from safetensors.numpy import save_file

    path = Path(folder) / SCALES_NAME
    save_file(tensors, str(path))
    return path


def read_grids(folder: str | Path, manifest: Manifest | None = None) -> dict[str, WeightGrid]:
    """Weight name -> its grid, from a checkpoint pruned with ``--bits``; {} for any other folder."""
    manifest = manifest if manifest is not None else read_manifest(folder)
    if manifest is None or not manifest.quantization:
        return {}
    info = manifest.quantization
    path = Path(folder) / info.get("scales_file", SCALES_NAME)
    if not path.exists():
        raise InvalidInputError(f"{path} is missing: {Path(folder) / MANIFEST_NAME} records quantization with its "
                                f"scales there; copy the whole checkpoint folder or re-run prune")
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidInputError(f"{path} cannot be read ({exc}); re-run prune") from exc
    bits, group_size = int(info["bits"]), info.get("group_size")
    return {
        key.removesuffix(".scales"): WeightGrid(bits, group_size, value, tensors.get(key.removesuffix(".scales")
                                                                                     + ".zero_points"))
        for key, value in tensors.items() if key.endswith(".scales")
    }
