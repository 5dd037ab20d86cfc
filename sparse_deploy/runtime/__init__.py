"""Running exported models under ONNX Runtime. Needs onnxruntime, numpy and tokenizers; never imports torch."""

from sparse_deploy.runtime.generate import DecoderRunner, embed, generate, hidden_states
from sparse_deploy.runtime.session import ExportedModel, SessionConfig, open_session

__all__ = ["DecoderRunner", "ExportedModel", "SessionConfig", "embed", "generate", "hidden_states", "open_session"]
