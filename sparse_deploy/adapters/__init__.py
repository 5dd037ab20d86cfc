"""Registry of architecture adapters, keyed by ``config.model_type``."""

from __future__ import annotations

from sparse_deploy.adapters.base import Adapter
from sparse_deploy.adapters.bert import BERT
from sparse_deploy.adapters.gpt2 import GPT2
from sparse_deploy.adapters.gpt_neox import GPT_NEOX
from sparse_deploy.adapters.llama import LLAMA
from sparse_deploy.adapters.opt import OPT
from sparse_deploy.errors import UnsupportedModelError

REGISTRY: dict[str, Adapter] = {
    model_type: adapter for adapter in (OPT, GPT2, LLAMA, GPT_NEOX, BERT) for model_type in adapter.model_types
}


def adapter_for(model_type: str) -> Adapter:
    try:
        return REGISTRY[model_type]
    except KeyError:
        supported = ", ".join(sorted(REGISTRY))
        raise UnsupportedModelError(
            f"architecture {model_type!r} is not supported; supported model types: {supported}"
        ) from None


__all__ = ["REGISTRY", "Adapter", "adapter_for"]
