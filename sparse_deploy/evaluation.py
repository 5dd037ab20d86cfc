"""``evaluate()``: one evaluation protocol over a torch model or an exported folder.

A causal LM is scored by perplexity on the test text (``data.perplexity``: the text tokenized once, cut into
windows of ``seqlen`` tokens); an encoder by the mean cosine between its mean-pooled sentence embeddings and a
reference model's on the text's lines (``data.similarity``). The protocol asks a backend for two things only:
``logits(windows)`` and ``embed(sentences)``. ``TorchBackend`` runs a checkpoint folder with transformers;
``OnnxBackend`` runs an exported folder through ``runtime/`` (ONNX Runtime on the CPU), the path users run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from sparse_deploy.config import EvalConfig
from sparse_deploy.data.calibration import tokenize
from sparse_deploy.data.perplexity import perplexity_of
from sparse_deploy.data.similarity import embed as torch_embed
from sparse_deploy.data.similarity import mean_cosine, sentences_of
from sparse_deploy.data.text import load_text
from sparse_deploy.errors import ConfigError, NonFiniteError
from sparse_deploy.hf import load_model, load_tokenizer, max_context, resolve_source, seqlen_within
from sparse_deploy.machine import resolve_device

ENCODER_MAX_LENGTH = 128  # tokens per sentence when --seqlen is not given


@dataclass(frozen=True)
class EvalReport:
    """``perplexity`` for causal LMs; ``mean_cosine`` (against ``reference``) for encoders."""

    model: str
    dataset: str
    kind: str  # "perplexity" | "cosine"
    seqlen: int
    perplexity: float | None = None
    nll: float | None = None
    tokens: int | None = None
    windows: int | None = None
    mean_cosine: float | None = None
    sentences: int | None = None
    reference: str | None = None
    backend: str = "torch"


class Backend(Protocol):
    """What the protocol needs of a model: its kind and context, and two ways to run it."""

    name: str  # "torch" | "onnxruntime", recorded in the report
    kind: str  # "decoder" | "encoder"
    context: int | None  # the longest sequence it takes, when known
    tokenizer: Any  # the model folder's transformers tokenizer: the protocol's text is tokenized with it

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, L, V] of whole windows ids [B, L] (no cache)."""

    def embed(self, sentences: list[str], max_length: int) -> torch.Tensor:
        """Mean-pooled sentence embeddings [N, D], float32."""


class TorchBackend:
    name = "torch"

    def __init__(self, net, kind: str, tokenizer, device: torch.device):
        self.net, self.kind, self.tokenizer, self.device = net, kind, tokenizer, device
        self.context = max_context(net.config)

    @classmethod
    def load(cls, model: str, trust_remote_code: bool, device: torch.device, tokenizer=None) -> TorchBackend:
        """A model folder (or hub id) in fp32 on the CPU, else in its own dtype on ``device``; with its own
        tokenizer unless one is given (a reference is run with the evaluated model's tokenizer)."""
        source = resolve_source(model)
        net, adapter = load_model(source, trust_remote_code)
        net = (net.float() if device.type == "cpu" else net).to(device)
        return cls(net, adapter.kind, tokenizer or load_tokenizer(source, trust_remote_code), device)

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=ids.to(self.device), use_cache=False).logits

    def embed(self, sentences: list[str], max_length: int) -> torch.Tensor:
        return torch_embed(self.net, self.tokenizer, sentences, max_length=max_length, device=self.device)


class OnnxBackend:
    name = "onnxruntime"

    def __init__(self, folder: Path, config: EvalConfig):
        from sparse_deploy.runtime import ExportedModel, SessionConfig

        if config.device == "cuda":
            raise ConfigError("an exported folder is evaluated with ONNX Runtime on the CPU; --device cuda applies to "
                              "checkpoint folders only")
        self.model = ExportedModel(folder, SessionConfig(verify=config.verify, kernels=config.kernels))
        self.kind, self.context = self.model.info.kind, self.model.info.max_context
        self.tokenizer = load_tokenizer(str(folder))
        self._runner = None

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        from sparse_deploy.runtime import DecoderRunner

        self._runner = self._runner or DecoderRunner(self.model)
        self.model.check_token_ids(ids.numpy())
        return torch.from_numpy(self._runner.logits(ids.numpy()))

    def embed(self, sentences: list[str], max_length: int) -> torch.Tensor:
        from sparse_deploy.runtime import embed

        return torch.from_numpy(embed(self.model, sentences, max_length=max_length))


def open_backend(model: str | Path, config: EvalConfig) -> Backend:
    """An exported folder (it holds model.onnx) under ONNX Runtime, else a checkpoint folder under torch."""
    if (Path(model) / "model.onnx").exists():
        return OnnxBackend(Path(model), config)
    return TorchBackend.load(str(model), config.trust_remote_code, resolve_device(config.device))


def evaluate(model: str | Path, config: EvalConfig = EvalConfig(), *, progress: bool = True) -> EvalReport:
    """Perplexity of a causal LM on ``config.dataset``'s test text; for an encoder, the mean cosine between its
    sentence embeddings and ``config.reference``'s on the text's lines. ``model`` is a checkpoint folder (run
    with torch) or an exported folder holding model.onnx (run with ONNX Runtime, same tokenizer and protocol)."""
    backend = open_backend(model, config)
    if backend.kind == "decoder" and config.reference is not None:
        raise ConfigError("--reference applies to encoders; a decoder is evaluated by perplexity")
    text = load_text(config.dataset, "test", config.max_chars)
    common = dict(model=str(model), dataset=config.dataset, backend=backend.name)
    if backend.kind == "decoder":
        seqlen = seqlen_within(backend.context, config.seqlen)
        result = perplexity_of(backend.logits, tokenize(backend.tokenizer, text), seqlen,
                               batch_size=config.batch_size, progress=progress)
        return EvalReport(kind="perplexity", seqlen=seqlen, perplexity=result.perplexity, nll=result.nll,
                          tokens=result.tokens, windows=result.windows, **common)
    if config.reference is None:
        raise ConfigError("an encoder is evaluated against a reference model: pass --reference DIR (the dense model)")
    sentences = sentences_of(text)
    max_length = config.seqlen or ENCODER_MAX_LENGTH
    ours = backend.embed(sentences, max_length)
    device = backend.device if isinstance(backend, TorchBackend) else torch.device("cpu")
    reference = TorchBackend.load(config.reference, config.trust_remote_code, device, tokenizer=backend.tokenizer)
    theirs = reference.embed(sentences, max_length)
    return EvalReport(kind="cosine", seqlen=max_length, mean_cosine=_finite_cosine(ours, theirs),
                      sentences=len(sentences), reference=config.reference, **common)


def _finite_cosine(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    value = float(mean_cosine(ours, theirs))
    if not math.isfinite(value):
        raise NonFiniteError(f"the mean cosine is {value}: the embeddings hold NaN or infinite values (a broken "
                             f"checkpoint or export)")
    return value
