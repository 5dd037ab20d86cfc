"""``export.json``: the file between ``export`` and the runtime. Standard library only.

Written by ``export`` (``write_export_info``) beside model.onnx; read by the runtime, bench and inspect
(``read_export_info``). Its keys:

    {
      "format_version": 1, "tool_version": "0.1.0", "created": "2026-...",
      "model": {"model_type": "opt", "architecture": "OPTForCausalLM", "task": "text-generation-with-past",
                "kind": "decoder", "max_context": 2048},  # kind: decoder | encoder; max_context: null if unknown
      "settings": {"encoding": "packed", "quantize": "none", "ops": "standard", "opset": 18, ...},  # ExportConfig
      "files": {"model.onnx": 123456},                 # model file -> bytes
      "sha256": {"model.onnx": "..."},                 # verified when the runtime opens the folder
      "totals": {"weights": 72, "encoded_weights": 72, "encoded_dense_bytes": ..., "encoded_stored_bytes": ...},
      "quantization": null | {"scheme": "...", "weights": 72, "untied": []},
      "checker": "full", "parity": {...},
      "weights": [{"name": "...", "source": "...", "shape": [768, 768], "dtype": "float32", "sparsity": 0.5,
                   "encoding": "packed", "dense_bytes": ..., "stored_bytes": ...}],
      "warnings": [], "time_s": 12.3, "versions": {...}
    }

``settings.ops`` is ``standard`` (the portable file: packed weights are rebuilt by a subgraph of standard ops) or
``custom`` (packed weights feed SparseMatMul nodes of the ``ai.sparse_deploy`` domain: the native library must be
registered to load the file). Exports written before ``ops`` existed are ``standard``. Exports written before
``model.kind`` and ``model.max_context`` existed are read by their task and by config.json's context keys.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparse_deploy.errors import RuntimeSessionError

EXPORT_INFO_NAME = "export.json"
FORMAT_VERSION = 1
# export tasks (torch.onnx export of a model with its KV cache, or of its hidden states) and the kinds they make
TASK_KINDS = {"text-generation-with-past": "decoder", "feature-extraction": "encoder"}
# where a transformers config.json states the model's context length, in order of preference
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


@dataclass(frozen=True)
class ExportInfo:
    """The typed view of an export.json; ``raw`` keeps the whole document. A folder without one (an ONNX folder
    written by another tool) reads as ``ExportInfo()``: nothing known, standard ops."""

    kind: str | None = None  # model.kind: decoder | encoder (None: not recorded)
    max_context: int | None = None  # model.max_context
    encoding: str | None = None  # settings.encoding: packed | coo | dense | auto
    quantize: str | None = None  # settings.quantize: none | int8
    ops: str = "standard"  # settings.ops: standard | custom
    opset: int | None = None
    files: Mapping[str, int] = field(default_factory=dict)
    totals: Mapping[str, Any] = field(default_factory=dict)
    weights: tuple[Mapping[str, Any], ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict)

    @property
    def present(self) -> bool:
        return bool(self.raw)

    @property
    def packed(self) -> bool:
        """Whether the export may hold packed weights (the encoding was packed, or auto chose per weight)."""
        return self.encoding in ("packed", "auto")

    def summary(self) -> dict[str, Any]:
        """What a benchmark records about the export: encoding, quantize, ops and the byte totals."""
        out: dict[str, Any] = {k: v for k, v in (("encoding", self.encoding), ("quantize", self.quantize),
                                                 ("ops", self.ops if self.present else None)) if v is not None}
        return out | ({"totals": dict(self.totals)} if self.totals else {})

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExportInfo:
        settings = data.get("settings") if isinstance(data.get("settings"), Mapping) else {}
        weights = data.get("weights") if isinstance(data.get("weights"), list) else []
        model = data.get("model") if isinstance(data.get("model"), Mapping) else {}
        context = model.get("max_context")
        return cls(
            kind=model.get("kind") or TASK_KINDS.get(model.get("task")),
            max_context=context if isinstance(context, int) and context > 0 else None,
            encoding=settings.get("encoding"), quantize=settings.get("quantize"),
            ops=settings.get("ops") or "standard", opset=settings.get("opset"),
            files=dict(data.get("files") or {}), totals=dict(data.get("totals") or {}),
            weights=tuple(w for w in weights if isinstance(w, Mapping)), raw=dict(data),
        )


def read_export_info(folder: str | Path) -> ExportInfo:
    """The folder's export.json; ``ExportInfo()`` when it has none; a RuntimeSessionError when it is not JSON."""
    path = Path(folder) / EXPORT_INFO_NAME
    if not path.exists():
        return ExportInfo()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise RuntimeSessionError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RuntimeSessionError(f"{path} is not an export.json (a JSON object was expected)")
    return ExportInfo.from_json(data)


def write_export_info(folder: str | Path, data: Mapping[str, Any]) -> Path:
    """Write ``data`` (``ExportReport.to_json()`` plus the digests) as the folder's export.json."""
    path = Path(folder) / EXPORT_INFO_NAME
    path.write_text(json.dumps(dict(data), indent=1) + "\n", encoding="utf-8")
    return path


def context_of(hf_config: Mapping[str, Any]) -> int | None:
    """The context length a config.json states (``CONTEXT_KEYS``), for exports whose export.json lacks it."""
    return next((v for k in CONTEXT_KEYS if isinstance(v := hf_config.get(k), int) and v > 0), None)
