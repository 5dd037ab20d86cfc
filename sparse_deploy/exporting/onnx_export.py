"""Reading a checkpoint folder and exporting it to ONNX with the project's own ``torch.onnx`` exporter.

Decoders (``hf.model_kind``: ``kind="decoder"`` in their adapter, or ``*ForCausalLM`` / ``*LMHeadModel`` for
unregistered types) are exported for ``text-generation-with-past`` (a single graph with ``past_key_values.*`` inputs and ``present.*``
outputs); encoders (BERT-like) for ``feature-extraction``, giving ``last_hidden_state``. See ``torch_export``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from sparse_deploy.formats.checkpoint import Manifest, read_manifest
from sparse_deploy.errors import ExportError, ModelLoadError, first_line
from sparse_deploy.exporting.sparse_encoding import EXTERNAL_DATA_THRESHOLD, initializer_bytes, weight_names
from sparse_deploy.exporting.torch_export import DECODER_TASK, ENCODER_TASK, export_graph
from sparse_deploy.hf import load_config, load_weights, max_context, model_kind

MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class SourceModel:
    """A loaded checkpoint: the float32 torch model in eval mode and what the export needs to know about it."""

    folder: Path
    model: Any  # transformers.PreTrainedModel
    task: str
    model_type: str
    architecture: str
    manifest: Manifest | None
    max_context: int | None = None  # hf.max_context of its config

    @property
    def decoder(self) -> bool:
        return self.task == DECODER_TASK


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence the exporters' warnings and info logs (onnxruntime.quantization logs to the root logger) for the
    duration; the levels are restored afterwards."""
    loggers = [logging.getLogger(name) for name in ("transformers", "torch.onnx", "torch.export", "torch._dynamo",
                                                    "onnxscript", None)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextmanager
def _stderr_discarded() -> Iterator[None]:
    """Send what is written to file descriptor 2 (C++ and Python alike) to /dev/null for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def load_source(folder: str | Path, trust_remote_code: bool = False) -> SourceModel:
    """Load a checkpoint folder (a pruned checkpoint or any Hugging Face model folder) for export, in float32; the
    folder's own Python code (``auto_map``) runs only with ``trust_remote_code``."""
    import torch

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"{folder} is not a folder; give a checkpoint folder written by prune or save_pretrained")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} is not a model folder: it has no config.json")
    manifest = read_manifest(folder)
    config = load_config(str(folder), trust_remote_code, local_files_only=True)
    kind = model_kind(config)
    with quiet_libraries():
        model = load_weights(str(folder), config, kind, dtype=torch.float32, trust_remote_code=trust_remote_code,
                             local_files_only=True)
    architecture = (config.architectures or [type(model).__name__])[0]
    return SourceModel(folder, model, DECODER_TASK if kind == "decoder" else ENCODER_TASK, config.model_type,
                       architecture, manifest, max_context(config))


def export_onnx(source: SourceModel, folder: Path, opset: int | None) -> onnx.ModelProto:
    """Export ``source`` to an in-memory ONNX model (no validation: validate.py does it), and write its config and
    generation config into ``folder``. ``opset`` was checked against the installed onnx by ``ExportConfig``."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    try:
        with quiet_libraries(), _stderr_discarded(), torch.no_grad():  # torch.export reports at length on failures
            model = export_graph(source.model, source.decoder, opset)
    except Exception as exc:  # torch.export and the ONNX translation raise many types; report them as one
        raise ExportError(f"the ONNX export of {source.architecture} failed: {_root_cause(exc)}") from exc
    got = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and got != opset:  # torch.onnx keeps its own opset when it cannot convert down
        raise ExportError(f"the exporter could not convert {source.architecture} down to opset {opset} (it writes "
                          f"{got}); pass a newer --opset or leave it out")
    source.model.config.save_pretrained(folder)
    generation = getattr(source.model, "generation_config", None)
    if source.decoder and generation is not None:
        generation.save_pretrained(folder)
    return model


def _root_cause(exc: BaseException) -> str:
    """The first line of the innermost chained exception: torch.onnx wraps the real error in a page of advice."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {first_line(exc)}"


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def parameter_names(model: onnx.ModelProto, torch_model: Any) -> dict[str, str]:
    """ONNX weight initializer → the torch parameter it holds ("name" or "name (transposed)"), matched by content:
    exporters store Linear weights transposed and under generated names such as onnx::MatMul_123."""
    from onnx import numpy_helper

    inits = {init.name: init for init in model.graph.initializer}
    wanted = {_digest(numpy_helper.to_array(inits[name]).tobytes()): name for name in weight_names(model)}
    found: dict[str, str] = {}
    for pname, param in torch_model.named_parameters():
        if param.dim() != 2:
            continue
        W = param.detach().float()
        for tensor, label in ((W, pname), (W.T, f"{pname} (transposed)")):
            onnx_name = wanted.get(_digest(tensor.contiguous().numpy().tobytes()))
            if onnx_name is not None and onnx_name not in found:
                found[onnx_name] = label
    return found


def save_model(model: onnx.ModelProto, path: Path) -> tuple[Path, ...]:
    """Write ``model`` to ``path``; tensors go to ``<name>_data`` beside it when the file would pass 2 GB."""
    if initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        data = path.with_name(path.name + "_data")
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        return path, data
    onnx.save_model(model, str(path))
    return (path,)
