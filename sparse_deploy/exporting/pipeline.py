"""``export()``: checkpoint folder -> ONNX folder with sparse-encoded weights, checked against torch.

The output folder holds ``model.onnx`` (plus ``model.onnx_data`` past 2 GB), the config and tokenizer files, and
``export.json``. It is written to a staging folder and renamed into place only when every check passed.
"""

from __future__ import annotations

import datetime as dt
import shutil
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx

from sparse_deploy import __version__
from sparse_deploy.config import ExportConfig
from sparse_deploy.errors import ExportError, first_line
from sparse_deploy.exporting.onnx_export import MODEL_FILE, export_onnx, load_source, parameter_names, save_model
from sparse_deploy.exporting.quantize import INT4_SUFFIX, QUANT_SUFFIX, prepare_int8, quantize_int4, quantize_int8
from sparse_deploy.exporting.sparse_encoding import TensorEncoding, encode, opset_version, plan
from sparse_deploy.exporting.validate import ParityReport, check_parity, validation_ids
from sparse_deploy.grids import INT4_SCHEME, INT8_SCHEME
from sparse_deploy.formats.export_info import EXPORT_INFO_NAME, FORMAT_VERSION, TASK_KINDS, write_export_info
from sparse_deploy.integrity import DIGEST_KEY, file_digests
from sparse_deploy.io import check_output, staged_output
from sparse_deploy.machine import package_version

REPORT_NAME = EXPORT_INFO_NAME
_STEPS = ("load checkpoint", "export ONNX", "quantize", "encode weights", "save and check", "validate")


class SparseEncodingWarning(UserWarning):
    """A weight was stored in an encoding larger than dense because that encoding was asked for."""


_SCHEMES = {
    "int8": lambda config: {
        "scheme": INT8_SCHEME,
        "description": "int8 storage of 7-bit weights (-64..64) per output channel, symmetric (zero point 0), "
                       "scale max|w|/64; uint8 activations, dynamic (DynamicQuantizeLinear -> MatMulInteger)",
    },
    "int4": lambda config: {
        "scheme": INT4_SCHEME, "op": "com.microsoft.MatMulNBits", "bits": 4, "block_size": config.group_size,
        "accuracy_level": 4,
        "description": f"4-bit weights in groups of {config.group_size} input columns per output channel, symmetric "
                       "(scale = signed max / -8, zero point 8)",
    },
}


@dataclass(frozen=True)
class ExportReport:
    """What ``export()`` wrote and measured; ``to_json()`` is the content of export.json
    (``sparse_deploy.formats.export_info`` documents it and reads it back)."""

    output: Path
    files: Mapping[str, int]  # model file name -> bytes
    task: str
    model_type: str
    architecture: str
    opset: int
    config: ExportConfig
    weights: tuple[TensorEncoding, ...]
    sources: Mapping[str, str]  # ONNX weight -> torch parameter
    quantized: tuple[str, ...]
    untied: tuple[str, ...]  # tied weights given their own transposed copy for int8 (a tied LM head)
    parity: ParityReport
    time_s: float
    warnings: tuple[str, ...] = field(default=())
    checker: str = "full"  # "full" (check_model with full_check=True) or "structural"
    max_context: int | None = None  # the model's context length (hf.max_context), for the runtime

    @property
    def encoded(self) -> tuple[TensorEncoding, ...]:
        return tuple(rec for rec in self.weights if rec.encoding != "dense")

    @property
    def dense_bytes(self) -> int:
        """Bytes the encoded weights would take stored dense."""
        return sum(rec.dense_bytes for rec in self.encoded)

    @property
    def stored_bytes(self) -> int:
        return sum(rec.stored_bytes for rec in self.encoded)

    @property
    def model_bytes(self) -> int:
        return sum(self.files.values())

    def to_json(self) -> dict[str, Any]:
        weights = [
            {"name": rec.name, "source": self.sources.get(rec.name), "shape": list(rec.shape), "dtype": rec.dtype,
             "sparsity": round(rec.sparsity, 6), "encoding": rec.encoding, "dense_bytes": rec.dense_bytes,
             "stored_bytes": rec.stored_bytes}
            for rec in self.weights
        ]
        return {
            "format_version": FORMAT_VERSION,
            "tool_version": __version__,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "model": _model_json(self.task, self.model_type, self.architecture, self.max_context),
            "settings": _settings_json(self.config, self.opset),
            "files": dict(self.files),
            "totals": {
                "weights": len(self.weights), "encoded_weights": len(self.encoded),
                "encoded_dense_bytes": self.dense_bytes, "encoded_stored_bytes": self.stored_bytes,
                "encoded_ratio": round(self.stored_bytes / self.dense_bytes, 6) if self.dense_bytes else None,
                "all_weights_dense_bytes": sum(rec.dense_bytes for rec in self.weights),
                "all_weights_stored_bytes": sum(rec.stored_bytes for rec in self.weights),
                "model_bytes": self.model_bytes,
            },
            "quantization": None if not self.quantized else {
                **_SCHEMES[self.config.quantize](self.config),
                "weights": len(self.quantized),
                "untied": list(self.untied),
            },
            "checker": self.checker,
            "parity": self.parity.to_json(),
            "weights": weights,
            "warnings": list(self.warnings),
            "time_s": round(self.time_s, 3),
            "versions": {name: package_version(name) for name in
                         ("torch", "transformers", "onnx", "onnxscript", "onnxruntime")},
        }


def _model_json(task: str, model_type: str, architecture: str, max_context: int | None) -> dict[str, Any]:
    return {"model_type": model_type, "architecture": architecture, "task": task, "kind": TASK_KINDS[task],
            "max_context": max_context}


def _settings_json(config: ExportConfig, opset: int) -> dict[str, Any]:
    return {**asdict(config), "opset": opset, "tolerance": config.parity_tolerance,
            **({"int8_scheme": INT8_SCHEME} if config.quantize == "int8" else {}),
            **({"int4_scheme": INT4_SCHEME} if config.quantize == "int4" else {})}


def _check(path: Path, full: bool) -> str:
    """The ONNX checker on the file (so external data works too), with full shape inference where it applies:
    ONNX types a sparse_initializer as sparse_tensor, which the shape inference of MatMul/Gemm rejects, so
    models with coo weights get the structural check only."""
    try:
        onnx.checker.check_model(str(path), full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the written model fails the ONNX checker: {first_line(exc)}") from exc
    return "full" if full else "structural"


@dataclass(frozen=True)
class _Converted:
    model: onnx.ModelProto
    sources: dict[str, str]  # ONNX weight -> torch parameter
    pruned: frozenset[str]  # ONNX weights the manifest records as pruned
    quantized: tuple[str, ...]
    untied: tuple[str, ...]


def _convert(source, model: onnx.ModelProto, quantize: str, group_size: int = 32) -> _Converted:
    """Name the weights after their torch parameters and quantize them if asked (Gemm weights become MatMul
    weights [in, out] first, so the names are taken after that step)."""
    untied: tuple[str, ...] = ()
    if quantize in ("int8", "int4"):
        model, untied = prepare_int8(model)
    sources = parameter_names(model, source.model)
    manifest = source.manifest
    pruned = {name for name, param in sources.items()
              if manifest is not None and manifest.layer(param.split(" ")[0]) is not None}
    if quantize not in ("int8", "int4"):
        return _Converted(model, sources, frozenset(pruned), (), untied)
    from sparse_deploy.formats.checkpoint import read_grids

    solver = read_grids(source.folder, manifest)  # prune --bits: the solver's scales, by torch weight name
    given = {name: solver[param.split(" ")[0]] for name, param in sources.items() if param.split(" ")[0] in solver}
    if quantize == "int8":
        result, suffix = quantize_int8(model, untied, given), QUANT_SUFFIX
    else:
        result, suffix = quantize_int4(model, untied, group_size, given), INT4_SUFFIX
    sources |= {n + suffix: sources[n] for n in result.quantized if n in sources}
    pruned |= {n + suffix for n in result.quantized if n in pruned}
    return _Converted(result.model, sources, frozenset(pruned), result.quantized, untied)


def _gather_side_files(raw: Path, checkpoint: Path, stage: Path, trust_remote_code: bool = False) -> None:
    """What the exporter wrote beside its model (config, generation config, tokenizer), then what the checkpoint
    has beside its weights (tokenizer, sparse_deploy.json, sentence-transformers files), then drop the raw export."""
    from sparse_deploy.hf import copy_side_files

    for item in raw.iterdir():
        if not item.name.startswith(MODEL_FILE) and not (stage / item.name).exists():
            shutil.move(str(item), str(stage / item.name))
    copy_side_files(str(checkpoint), stage, trust_remote_code)
    shutil.rmtree(raw)


def _coo_notes(records: tuple[TensorEncoding, ...]) -> tuple[str, ...]:
    """One warning per weight stored as coo although that is larger than dense."""
    notes = tuple(
        f"{rec.name}: coo takes {rec.coo_bytes} bytes against {rec.dense_bytes} dense (sparsity {rec.sparsity:.1%})"
        for rec in records if rec.encoding == "coo" and rec.coo_bytes > rec.dense_bytes
    )
    for note in notes:
        warnings.warn(note, SparseEncodingWarning, stacklevel=3)
    return notes


def _custom_ops(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each packed weight and its MatMul/Gemm as one SparseMatMul node (``--ops custom``), written into the file."""
    from sparse_deploy.runtime.kernel_choice import packer
    from sparse_deploy.errors import KernelsUnavailableError
    from sparse_deploy.runtime.session import native_kernels
    from sparse_deploy.runtime.sparse_ops import materialize, rewrite

    native, reason = native_kernels()
    if native is None:
        raise KernelsUnavailableError(f"--ops custom packs the weights with the native sparse kernels: {reason}")
    done = rewrite(model, packer(native), min_bytes=None)
    if not done.sparse:
        raise ExportError("--ops custom: no packed weight feeds a MatMul or Gemm the sparse ops cover; export with "
                          "--ops standard")
    return materialize(done)


def export(
    checkpoint: str | Path,
    output: str | Path,
    config: ExportConfig | None = None,
    *,
    force: bool = False,
    progress: bool = True,
) -> ExportReport:
    """Export a (pruned) checkpoint folder to an ONNX folder; see ``ExportConfig`` for the settings.

    Raises ModelLoadError / UnsupportedModelError for folders it cannot read, OutputExistsError for a non-empty
    ``output`` without ``force``, and ExportMismatchError when ONNX Runtime and torch disagree beyond the tolerance
    (``ExportConfig.parity_tolerance``: per quantization unless given). Nothing is left at ``output`` unless the
    export succeeded."""
    from tqdm.auto import tqdm

    config = config or ExportConfig()
    output = Path(output)
    check_output(output, force, inputs=[checkpoint])
    start = time.perf_counter()
    bar = tqdm(total=len(_STEPS), unit="step", disable=not progress, leave=False)

    def step(k: int) -> None:  # entering step k: the k steps before it are done
        bar.set_description(_STEPS[k])
        bar.update(k - bar.n)

    try:
        step(0)
        source = load_source(checkpoint, config.trust_remote_code)
        with staged_output(output, force, inputs=[checkpoint]) as stage:
            raw = stage / ".raw"
            step(1)
            exported = export_onnx(source, raw, config.opset)
            step(2)
            converted = _convert(source, exported, config.quantize, config.group_size)
            del exported
            step(3)
            records = plan(converted.model, config.encoding, min_sparsity=config.min_sparsity,
                           pruned=converted.pruned)
            notes = _coo_notes(records)
            model = encode(converted.model, records)
            if config.ops == "custom":
                model = _custom_ops(model)
            sources, quantized, untied = converted.sources, converted.quantized, converted.untied
            del converted  # the unencoded model
            opset = opset_version(model)
            step(4)
            files = save_model(model, stage / MODEL_FILE)
            del model
            checker = _check(files[0], full=not any(rec.encoding == "coo" for rec in records))
            _gather_side_files(raw, source.folder, stage, config.trust_remote_code)
            step(5)
            # what the runtime needs to open the staged folder as users will; the full export.json replaces it
            write_export_info(stage, {"model": _model_json(source.task, source.model_type, source.architecture,
                                                           source.max_context),
                                      "settings": _settings_json(config, opset)})
            ids, input_source = validation_ids(stage, config.validation_text, config.validation_tokens,
                                               source.model.config.vocab_size, source.max_context)
            parity = check_parity(stage, source.model, ids, decoder=source.decoder, input_source=input_source,
                                  tolerance=config.parity_tolerance, work_dir=stage)
            report = ExportReport(
                output=output, files={p.name: p.stat().st_size for p in files}, task=source.task,
                model_type=source.model_type, architecture=source.architecture, opset=opset, config=config,
                weights=records, sources=sources, quantized=quantized, untied=untied,
                parity=parity, time_s=time.perf_counter() - start, warnings=notes, checker=checker,
                max_context=source.max_context,
            )
            info = {**report.to_json(), DIGEST_KEY: file_digests(stage, report.files)}  # verified on open
            write_export_info(stage, info)
            bar.update(len(_STEPS) - bar.n)
    finally:
        bar.close()
    return report
