"""Loading and saving Hugging Face models, configs and tokenizers, with errors that say what to do; and the facts
about a model that the stages share (decoder or encoder: ``model_kind``; context length: ``max_context``).
The runtime, which never imports torch, reads the same facts from export.json (``formats.export_info``)."""

from __future__ import annotations

import inspect
import json
import os
import pickle
import re
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from sparse_deploy.adapters import Adapter, adapter_for
from sparse_deploy.adapters.base import Kind
from sparse_deploy.errors import ConfigError, InvalidInputError, ModelLoadError, UnsupportedModelError, first_line
from sparse_deploy.formats.export_info import CONTEXT_KEYS, context_of

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# What travels from a model folder into a pruned checkpoint or an export besides what save_pretrained writes:
# tokenizer files, sentence-transformers settings (and the module folders modules.json names), the manifest, and
# remote code. Everything else (weights, the dense model's card, data files that happen to sit there) stays behind.
_SIDE_FILES = {
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.json",
    "chat_template.jinja", "preprocessor_config.json", "modules.json", "sentence_bert_config.json",
    "config_sentence_transformers.json", "sparse_deploy.json",
}


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is set or the hub's host cannot be reached, without the libraries' retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in (
        "0",
        "",
    ):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def resolve_source(model: str) -> str:
    """A local folder as a path string, or a hub id when the hub can be reached; otherwise a clear error."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise ModelLoadError(f"{model} is not a Hugging Face model folder (no config.json in it)")
        return str(path)
    if not _HUB_ID.match(model):
        raise ModelLoadError(f"model folder {model} does not exist")
    if not hub_reachable():
        raise ModelLoadError(
            f"{model} is not a local folder and the Hugging Face hub cannot be reached; "
            "download the model elsewhere and pass its folder"
        )
    return model


def remote_code_refused(source: str | Path, exc: BaseException) -> ModelLoadError | None:
    """The one-line error for transformers refusing a model's own code (trust_remote_code=False), else None."""
    if "trust_remote_code" not in str(exc):
        return None
    return ModelLoadError(f"{source} needs its own Python code to load (auto_map in its config); sparse-deploy runs "
                          f"it only with --trust-remote-code, so read that code first and pass the flag if you trust it")


@contextmanager
def no_loading_bars() -> Iterator[None]:
    """Keep transformers' progress bars (5.x draws one for every weight load) off stdout for the duration."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load_config(source: str, trust_remote_code: bool = False, *, local_files_only: bool = False):
    """The model's transformers config; an architecture transformers does not know is an UnsupportedModelError."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code,
                                          local_files_only=local_files_only)
    except ValueError as exc:
        raise remote_code_refused(source, exc) or UnsupportedModelError(
            f"{source}/config.json names an architecture transformers does not know: {first_line(exc)}") from None
    except (OSError, KeyError, TypeError) as exc:
        raise remote_code_refused(source, exc) or ModelLoadError(
            f"could not read the model config of {source} (config.json): {first_line(exc)}") from None


def model_kind(config) -> Kind:
    """``decoder`` or ``encoder``: a registered architecture's adapter decides; for other types, a causal-LM
    architecture name makes a decoder and a model that is neither causal nor encoder-decoder an encoder."""
    from sparse_deploy.adapters import REGISTRY

    model_type = getattr(config, "model_type", "unknown")
    adapter = REGISTRY.get(model_type)
    if adapter is not None:
        return adapter.kind
    architectures = tuple(getattr(config, "architectures", None) or ())
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{model_type} ({', '.join(architectures) or 'no architecture'}) is an encoder-decoder model; "
            f"sparse-deploy exports decoder-only and encoder-only models"
        )
    return "decoder" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures) else "encoder"


def load_weights(source: str, config, kind: Kind, *, dtype="auto", trust_remote_code: bool = False,
                 local_files_only: bool = False) -> nn.Module:
    """The model for ``config`` (a causal LM for decoders, the base model for encoders), on the CPU, in eval mode,
    its weights checked to be finite."""
    from safetensors import SafetensorError
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if kind == "decoder" else AutoModel
    try:
        with no_loading_bars():
            model = auto.from_pretrained(source, config=config, dtype=dtype, low_cpu_mem_usage=True,
                                         local_files_only=local_files_only, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError, pickle.UnpicklingError) as exc:
        raise remote_code_refused(source, exc) or ModelLoadError(
            f"could not load the weights of {source}: {first_line(exc)} (the weight files could not be loaded; "
            f"use a good copy)") from None
    check_finite_weights(model.named_parameters(), source)
    model.eval()
    return model


def load_model(source: str, trust_remote_code: bool = False) -> tuple[nn.Module, Adapter]:
    """A registered architecture (weights in the checkpoint's dtype, on the CPU, in eval mode) and its adapter."""
    config = load_config(source, trust_remote_code)
    adapter = adapter_for(getattr(config, "model_type", "unknown"))
    model = load_weights(source, config, adapter.kind, trust_remote_code=trust_remote_code)
    if model.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise UnsupportedModelError(f"{source} has {model.dtype} weights; sparse-deploy prunes float models")
    model.config.use_cache = False
    return model, adapter


def load_tokenizer(source: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise remote_code_refused(source, exc) or ModelLoadError(
            f"could not load a tokenizer from {source}: {first_line(exc)}") from None
    if has_no_vocabulary(tokenizer):
        raise ModelLoadError(f"{source} has no tokenizer files (tokenizer.json, vocab.txt, vocab.json, ...); copy the "
                             f"original model's tokenizer into it")
    tokenizer.model_max_length = int(1e12)  # we cut windows ourselves; silence the length warning
    return tokenizer


def accepts_argument(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def cache_keyword(model: nn.Module) -> str:
    """The forward keyword for the KV cache: ``cache`` from transformers 5.24, ``past_key_values`` before."""
    return "cache" if accepts_argument(model, "cache") else "past_key_values"


def returned_cache(output):
    """The KV cache a forward returned, under either name."""
    cache = output.get("cache")
    return cache if cache is not None else output.get("past_key_values")


def has_no_vocabulary(tokenizer) -> bool:
    """True for the tokenizer transformers 5 builds from a folder without tokenizer files: special tokens only."""
    return len(tokenizer) <= len(set(tokenizer.all_special_ids))


def max_context(config) -> int | None:
    """The longest sequence a transformers ``config`` takes (export writes it into export.json for the runtime)."""
    return context_of({key: getattr(config, key, None) for key in CONTEXT_KEYS})


def seqlen_within(context: int | None, requested: int | None) -> int:
    """``requested``, or min(2048, ``context``); a request beyond the context is an error."""
    if requested is None:
        return min(2048, context) if context else 2048
    if context and requested > context:
        raise ConfigError(f"--seqlen {requested} is longer than the model's context of {context} tokens; pass "
                          f"--seqlen {context} or less")
    return requested


def default_seqlen(config, requested: int | None) -> int:
    """``seqlen_within`` the context of a transformers ``config``."""
    return seqlen_within(max_context(config), requested)


def check_finite_weights(named_tensors, source: str | Path) -> None:
    """Refuse a model with a NaN or infinite value in any floating-point tensor, naming the first such tensor:
    pruning, exporting or evaluating it would give numbers that mean nothing."""
    for name, tensor in named_tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise InvalidInputError(f"{source}: weight {name} holds {bad} NaN or infinite values; the checkpoint is "
                                    f"corrupt or was saved after a diverged run, so use a good copy")


_RELATIVE_IMPORT = re.compile(r"^\s*(?:from\s+\.(\w+)\s+import|import\s+\.(\w+))", re.MULTILINE)


def remote_code_files(folder: str | Path) -> set[str]:
    """The ``*.py`` files of ``folder`` that the ``auto_map`` of its config.json or tokenizer_config.json names,
    with the local modules they import."""
    folder = Path(folder)
    wanted: set[str] = set()
    for name in ("config.json", "tokenizer_config.json"):
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        for ref in (auto_map.values() if isinstance(auto_map, dict) else ()):
            for item in ref if isinstance(ref, list) else [ref]:
                if isinstance(item, str) and "." in item and "--" not in item:  # "repo--module.Class" is elsewhere
                    wanted.add(item.rsplit(".", 1)[0] + ".py")
    found: set[str] = set()
    while wanted:
        name = wanted.pop()
        path = folder / name
        if name in found or "/" in name or not path.is_file():
            continue
        found.add(name)
        for match in _RELATIVE_IMPORT.finditer(path.read_text(encoding="utf-8", errors="replace")):
            wanted.add((match.group(1) or match.group(2)) + ".py")
    return found


def copy_side_files(source: str, target: Path, trust_remote_code: bool = False) -> None:
    """Copy what a local model folder has beside its weights and config that the model needs to be used (see
    ``_SIDE_FILES``; sentence-transformers module folders such as 1_Pooling/; with ``trust_remote_code``, the
    ``*.py`` files its ``auto_map`` names), so the pruned folder works wherever the original did. Files already in
    ``target`` are kept."""
    folder = Path(source)
    if not folder.is_dir():
        return
    code = remote_code_files(folder) if trust_remote_code else set()
    for item in folder.iterdir():
        if item.is_file() and (item.name in _SIDE_FILES or item.name in code) and not (target / item.name).exists():
            shutil.copy2(item, target / item.name)
    for name in _module_folders(folder):
        shutil.copytree(folder / name, target / name, dirs_exist_ok=True)


def _module_folders(folder: Path) -> list[str]:
    """The sub-folders a sentence-transformers modules.json refers to (e.g. 1_Pooling, 2_Normalize)."""
    try:
        modules = json.loads((folder / "modules.json").read_text())
    except (OSError, ValueError):
        return []
    paths = [m.get("path") for m in modules if isinstance(m, dict)] if isinstance(modules, list) else []
    return [p for p in paths if isinstance(p, str) and p and "/" not in p and p not in (".", "..")
            and (folder / p).is_dir()]
