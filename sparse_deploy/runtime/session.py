"""ONNX Runtime sessions over an exported folder. Imports onnxruntime, numpy and tokenizers only (no torch).

An exported folder holds ``model.onnx`` (+ external data), ``config.json``, the tokenizer files and, when
sparse-deploy wrote it, ``export.json``. ``ExportedModel`` opens it and says what kind of model it is:
a ``decoder`` (inputs ``input_ids``, ``attention_mask``, ``position_ids``?, ``past_key_values.{i}.key/value``;
outputs ``logits``, ``present.{i}.key/value``) or an ``encoder`` (output ``last_hidden_state``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from sparse_deploy.errors import (ConfigError, InvalidInputError, KernelsUnavailableError, RuntimeSessionError,
                                  first_line)
from sparse_deploy.formats.export_info import ExportInfo, context_of, read_export_info
from sparse_deploy.integrity import verify_export
from sparse_deploy.runtime.kernel_choice import Choice, KernelMode, check_mode

Optimization = Literal["disable", "basic", "extended", "all"]
_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# what ONNX Runtime raises for a bad file or a failed run (all derive from Exception directly)
ORT_ERRORS = tuple(
    getattr(_ort_state, name)
    for name in ("Fail", "InvalidProtobuf", "NoSuchFile", "InvalidGraph", "RuntimeException", "InvalidArgument",
                 "NotImplemented", "EPFail")
    if hasattr(_ort_state, name)
)
_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32}


@dataclass(frozen=True)
class SessionConfig:
    """``threads``: intra-op threads (None: ONNX Runtime's default, one per core). ``providers``: execution
    providers in order of preference. ``packed``: how packed-sparse exports are opened: ``stage`` decodes the
    weights left dense (natively, else with numpy) into a temporary dense file first (about the dense model's
    memory), ``fold`` lets ONNX Runtime constant-fold the decode subgraphs itself (any ONNX Runtime does this, at ~3x
    the memory). ``verify``: check the model files against the sha256 digests export.json records before loading
    them. ``kernels``: which packed layers run on the native sparse kernels (``auto``: where they are faster on this
    CPU; ``sparse``: all the ops cover, an error when the library is unavailable; ``dense``: none; see
    ``runtime.kernel_choice``).
    ``profile``: a file prefix; ONNX Runtime's profiler writes there (``session.end_profiling()`` names the file)."""

    threads: int | None = None
    optimization: Optimization = "all"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    packed: Literal["stage", "fold"] = "stage"
    verify: bool = True
    kernels: KernelMode = "auto"
    profile: str | None = None

    def __post_init__(self) -> None:
        check_mode(self.kernels)
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.optimization not in _LEVELS:
            raise ConfigError(f"optimization must be one of {', '.join(_LEVELS)}, got {self.optimization!r}")
        if self.packed not in ("stage", "fold"):
            raise ConfigError(f"packed must be stage or fold, got {self.packed!r}")
        unknown = set(self.providers) - set(ort.get_available_providers())
        if unknown:
            raise ConfigError(f"execution providers {sorted(unknown)} are not available; "
                              f"available: {ort.get_available_providers()}")


def open_session(path: str | Path, config: SessionConfig = SessionConfig()) -> ort.InferenceSession:
    """An InferenceSession for ``path``; a missing or corrupt file is a RuntimeSessionError."""
    path = Path(path)
    if not path.is_file():
        raise RuntimeSessionError(f"{path} does not exist")
    options = _options(config)
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=list(config.providers))
    except ORT_ERRORS as exc:
        raise RuntimeSessionError(f"ONNX Runtime could not load {path}: {first_line(exc)}") from None


@dataclass(frozen=True)
class ModelInfo:
    kind: Literal["decoder", "encoder"]
    layers: int  # past key/value pairs (decoders)
    kv_heads: int
    head_dim: int
    kv_dtype: type
    max_context: int | None
    eos_token_id: int | None
    has_position_ids: bool


class ExportedModel:
    """An exported folder opened under ONNX Runtime: the session, what kind of model it is, its tokenizer."""

    def __init__(self, folder: str | Path, config: SessionConfig = SessionConfig()):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise RuntimeSessionError(f"{self.folder} is not a folder")
        onnx_file = self.folder / "model.onnx"
        if not onnx_file.exists():
            raise RuntimeSessionError(f"{self.folder} holds no model.onnx; run `sparse-deploy export` first")
        self.config = config
        self.hf_config = _read_json(self.folder / "config.json")
        self.export_info = read_export_info(self.folder)
        if config.verify:
            verify_export(self.folder, dict(self.export_info.raw))
        self.kernels = Choice(config.kernels)
        if self.export_info.ops == "custom":
            self.session = _open_custom(onnx_file, config, self.kernels)
        elif config.packed == "stage" and self.export_info.packed:
            self.session = _open_packed(onnx_file, config, self.kernels, self.export_info.kind == "encoder")
        else:
            self.kernels.reason = "the export holds no packed weights" if config.kernels != "dense" else ""
            self.session = open_session(onnx_file, config)
        self.info = _inspect(self.session, self.hf_config, self.export_info)
        self._tokenizer = None

    @property
    def file_bytes(self) -> int:
        """model.onnx plus its external data files."""
        return sum(p.stat().st_size for p in self.folder.iterdir()
                   if p.name == "model.onnx" or p.name.startswith("model.onnx") or p.suffix == ".data")

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.folder)
        return self._tokenizer

    def require(self, kind: str) -> None:
        if self.info.kind != kind:
            article = "an" if self.info.kind[0] in "aeiou" else "a"
            raise RuntimeSessionError(f"{self.folder} is {article} {self.info.kind} export; this needs a {kind} export")

    def input_names(self) -> set[str]:
        return {i.name for i in self.session.get_inputs()}

    def check_token_ids(self, ids: np.ndarray) -> None:
        """Token ids beyond the model's vocabulary (config.json's vocab_size) are a tokenizer that does not belong
        to this model: one clear error instead of ONNX Runtime's out-of-bounds Gather."""
        vocab = self.hf_config.get("vocab_size")
        if isinstance(vocab, int) and ids.size and int(ids.max()) >= vocab:
            raise InvalidInputError(f"the tokenizer gives token id {int(ids.max())}, beyond the model's vocabulary of "
                                    f"{vocab} (config.json): {self.folder / 'tokenizer.json'} does not belong to "
                                    f"this model")


def native_kernels():
    """The native kernel module when its library loads here, else None; and why not."""
    try:
        from sparse_deploy.runtime import kernels
    except ImportError as exc:
        return None, f"the native sparse kernels are not part of this installation ({exc})"
    state = kernels.availability()
    return (kernels, "") if state.ok else (None, state.reason)


def _options(config: SessionConfig) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = _LEVELS[config.optimization]
    options.log_severity_level = 3
    if config.profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = config.profile
    if config.threads is not None:
        options.intra_op_num_threads = config.threads
        options.inter_op_num_threads = 1
    return options


def _open_custom(onnx_file: Path, config: SessionConfig, choice: Choice) -> ort.InferenceSession:
    """A file exported with ``--ops custom``: its SparseMatMul nodes need the native library registered."""
    from sparse_deploy.runtime.sparse_ops import DOMAIN

    native, reason = native_kernels()
    if native is None:
        from sparse_deploy.runtime.kernels import library_path

        raise KernelsUnavailableError(f"{onnx_file} uses the {DOMAIN} sparse ops (exported with --ops custom), which "
                                      f"need the native library {library_path()}: {reason}")
    choice.isa, choice.reason = native.isa(), "custom-op export: the sparse nodes are in the file"
    options = _options(config)
    native.register(options)
    try:
        return ort.InferenceSession(str(onnx_file), sess_options=options, providers=list(config.providers))
    except ORT_ERRORS as exc:
        raise RuntimeSessionError(f"ONNX Runtime could not load {onnx_file}: {first_line(exc)}") from None


def _open_packed(onnx_file: Path, config: SessionConfig, choice: Choice, encoder: bool = False
                 ) -> ort.InferenceSession:
    """The packed weights on the native kernels where ``config.kernels`` says so (``runtime.sparse_ops``), else
    decoded (by the native library where it loads, else numpy); ONNX Runtime folds nothing. The decoded weights go
    through a temporary file in the folder, removed once the session exists (in memory where the folder is
    read-only). ``encoder``: ``auto`` times the layers as an encoder runs them (all tokens at once)."""
    from sparse_deploy.runtime import kernel_choice as kc
    from sparse_deploy.runtime.sparse_ops import Spill

    native, reason = native_kernels() if config.kernels != "dense" else (None, "")
    if native is None and config.kernels == "sparse":
        raise KernelsUnavailableError(f"kernels=sparse needs the native sparse kernels: {reason}")
    choice.reason = reason
    pack, keep, table = None, (lambda site: False), None
    if native is not None:
        choice.isa = native.isa()
        if config.kernels == "auto":
            table = kc.TimingTable(kc.setting_key(choice.isa, config.threads, native.library_path()))
        pack = kc.packer(native)
        keep = kc.chooser(config.kernels, choice, lambda site: kc.measure(site, native, config.threads, encoder),
                          table, encoder)
    spill = Spill.open(onnx_file.parent)  # weights left dense: a temporary file ONNX Runtime maps (None: read-only)
    try:
        return _open_rewritten(onnx_file, config, choice, native, pack, keep, table, spill, encoder)
    finally:
        if spill is not None:
            spill.remove()


def _open_rewritten(onnx_file, config, choice, native, pack, keep, table, spill, encoder=False
                    ) -> ort.InferenceSession:
    from google.protobuf.message import DecodeError

    from sparse_deploy.formats.onnx_file import read_graph, tensor_array
    from sparse_deploy.runtime.kernels import unpack
    from sparse_deploy.runtime import kernel_choice as kc
    from sparse_deploy.runtime.sparse_ops import feed, rewrite

    try:
        model = read_graph(onnx_file)  # the graph only: the weights stay in the file until used
        done = rewrite(model, pack, keep, int8=True, load=lambda t: tensor_array(t, onnx_file.parent),
                       shared_location=onnx_file.name, fuse_transposes=True, spill=spill, unpack=unpack)
    except (OSError, ValueError, KeyError, DecodeError, InvalidInputError) as exc:
        raise RuntimeSessionError(f"could not decode the packed weights of {onnx_file}: {exc}") from None
    if spill is not None:
        spill.close()
    if table is not None:
        table.save()
    if not done.sparse and native is not None and not choice.reason:
        timed = ("128 tokens at once, as an encoder runs" if encoder else
                 "a decode step and a 128-token prompt + 64 tokens")
        choice.reason = (f"auto: no layer shape was faster on the sparse kernels here ({timed}, timed per shape)"
                         if config.kernels == "auto" and choice.dense else
                         "no packed layer has a pattern the sparse ops cover")
    options = _options(config)
    if done.sparse:
        native.register(options)
    fed = feed(done, options, str(onnx_file.parent))  # fed.shared: the kernels' arrays, used in place
    data = done.model.SerializeToString()
    del model, done
    try:
        session = ort.InferenceSession(data, sess_options=options, providers=list(config.providers))
    except ORT_ERRORS as exc:
        raise RuntimeSessionError(f"ONNX Runtime could not load {onnx_file}: {first_line(exc)}") from None
    session._sparse_deploy_arrays = fed.shared  # ONNX Runtime copied fed.copied, which is freed here
    del fed
    kc.release_freed_memory()
    return session


def load_tokenizer(folder: Path):
    """The folder's tokenizer.json through the `tokenizers` library, without its own padding/truncation."""
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.exists():
        raise RuntimeSessionError(f"{folder} holds no tokenizer.json")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise RuntimeSessionError(f"{path} is not valid JSON: {exc}") from None


def _inspect(session: ort.InferenceSession, hf_config: dict, export: ExportInfo) -> ModelInfo:
    """Kind and context as export.json records them (a folder without them: the graph's outputs, config.json's
    context keys); the KV-cache layout from the graph's inputs."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    past = sorted(n for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
    max_context = export.max_context or context_of(hf_config)
    eos = hf_config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    kind = export.kind or ("decoder" if "logits" in outputs and "input_ids" in inputs else
                           "encoder" if "last_hidden_state" in outputs else None)
    if kind == "decoder" and "logits" in outputs:
        if not past:
            raise RuntimeSessionError("the decoder was exported without a KV cache; export it with past")
        shape = inputs[past[0]].shape  # [batch, kv_heads, past_len, head_dim]
        if not (isinstance(shape[1], int) and isinstance(shape[3], int)):
            raise RuntimeSessionError(f"cannot read the KV-cache shape from {past[0]}: {shape}")
        return ModelInfo("decoder", len(past), shape[1], shape[3], _NP_TYPES.get(inputs[past[0]].type, np.float32),
                         max_context, eos, "position_ids" in inputs)
    if kind == "encoder" and "last_hidden_state" in outputs:
        return ModelInfo("encoder", 0, 0, 0, np.float32, max_context, eos, "position_ids" in inputs)
    raise RuntimeSessionError(f"the model has outputs {sorted(outputs)}: neither a causal LM nor an encoder")
