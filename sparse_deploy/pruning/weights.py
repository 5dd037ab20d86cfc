"""Reading a model's tensors from its safetensors shards one at a time, and building the modules they go into
without materialising the model: a *skeleton* (the model with one block, its weights left as uninitialised
memory that is never touched) whose block is refilled with each block's tensors in turn.

The skeleton is built for real on the CPU, so buffers computed in ``__init__`` (rotary ``inv_freq``, BERT's
``position_ids``) are right, while ``no_init_weights`` skips the random initialisation: an untouched
allocation costs no resident memory.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from sparse_deploy.adapters import Adapter
from sparse_deploy.errors import ModelLoadError, UnsupportedModelError, first_line
from sparse_deploy.hf import check_finite_weights

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def has_safetensors(folder: Path) -> bool:
    return (folder / INDEX_NAME).is_file() or (folder / SINGLE_NAME).is_file()


def has_pickle_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in PICKLE_NAMES)


class SourceWeights:
    """The tensors of a model folder's safetensors file(s), read (memory-mapped) on request by name."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        self._open = safe_open
        if (self.folder / INDEX_NAME).is_file():
            try:
                self.weight_map: dict[str, str] = json.loads((self.folder / INDEX_NAME).read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ModelLoadError(f"{self.folder / INDEX_NAME} is not a valid shard index ({exc})") from None
        elif (self.folder / SINGLE_NAME).is_file():
            with self._header(SINGLE_NAME) as fh:
                self.weight_map = {key: SINGLE_NAME for key in fh.keys()}
        else:
            raise ModelLoadError(f"{self.folder} has no safetensors weights ({SINGLE_NAME} or {INDEX_NAME})")
        missing = sorted({f for f in self.weight_map.values() if not (self.folder / f).is_file()})
        if missing:
            raise ModelLoadError(f"{self.folder}: shard {missing[0]} named in {INDEX_NAME} is missing; copy the "
                                 f"whole model folder")

    def check_readable(self) -> None:
        """Open every shard's header now, so that a truncated or corrupt file fails before any slow work."""
        for filename in self.files():
            with self._header(filename):
                pass

    def _header(self, filename: str):
        """``filename`` opened (its header read and checked against the file's size), as a context manager."""
        try:
            return self._open(str(self.folder / filename), framework="pt")
        except Exception as exc:  # safetensors raises its own error type for a bad header
            raise ModelLoadError(f"could not load the weights of {self.folder}: {filename} is not a readable "
                                 f"safetensors file ({first_line(exc)})") from None

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def get_many(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors named ``keys``, each file opened (memory-mapped) only while its tensors are copied out, so
        the pages read do not stay mapped (and counted in the resident set) for the rest of the run."""
        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.weight_map[key], []).append(key)
        out = {}
        for filename, names in by_file.items():
            with self._open(str(self.folder / filename), framework="pt", device="cpu") as fh:
                for key in names:
                    out[key] = fh.get_tensor(key)
        return out

    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def fingerprint(self) -> str:
        """sha256 over config.json, the tensor names and their files, and each file's size and mtime: what
        changes when the input model changes, without reading gigabytes."""
        digest = hashlib.sha256()
        digest.update((self.folder / "config.json").read_bytes())
        digest.update(json.dumps(sorted(self.weight_map.items())).encode())
        for name in self.files():
            stat = (self.folder / name).stat()
            digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return digest.hexdigest()

    def first_float_dtype(self) -> torch.dtype:
        for filename in self.files():
            with self._open(str(self.folder / filename), framework="pt") as fh:
                for key in fh.keys():
                    dtype = _SAFETENSORS_DTYPES.get(fh.get_slice(key).get_dtype())
                    if dtype is not None and dtype.is_floating_point:
                        return dtype
        raise UnsupportedModelError(f"{self.folder} holds no floating-point weights")


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def model_dtype(config, weights: SourceWeights) -> torch.dtype:
    """The dtype ``from_pretrained(dtype="auto")`` gives: the config's, else the first floating tensor's."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    dtype = dtype if isinstance(dtype, torch.dtype) else weights.first_float_dtype()
    if dtype not in FLOAT_DTYPES:
        raise UnsupportedModelError(f"{weights.folder} has {dtype} weights; sparse-deploy prunes float models")
    return dtype


def build_skeleton(config, adapter: Adapter, dtype: torch.dtype, layer_type: str | None = None) -> nn.Module:
    """The model with one block (of ``layer_type`` where the config lists per-layer types), in eval mode, its
    weights uninitialised and untouched."""
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    small = copy.deepcopy(config)
    small.num_hidden_layers = 1
    if isinstance(getattr(small, "layer_types", None), list):
        small.layer_types = [layer_type if layer_type is not None else small.layer_types[0]]
    auto = AutoModelForCausalLM if adapter.kind == "decoder" else AutoModel
    with no_init_weights():
        model = auto.from_config(small, dtype=dtype)
    model.eval()
    model.config.use_cache = False
    return model


def layer_type(config, index: int) -> str | None:
    types = getattr(config, "layer_types", None)
    return types[index] if isinstance(types, list) and index < len(types) else None


class SavedNames:
    """The name ``save_pretrained`` gives each of a model's tensors: transformers renames some on load and back on
    save (GPT-NeoX's ``lm_head`` is ``embed_out`` in files), so the same renaming applies to what is written."""

    def __init__(self, model: nn.Module):
        self.model = model
        try:
            from transformers.core_model_loading import revert_weight_conversion
        except ImportError:  # transformers without conversion mappings saves the module names
            revert_weight_conversion = None
        self._revert = revert_weight_conversion
        self._cache: dict[str, str] = {}

    def __call__(self, key: str) -> str:
        if self._revert is None:
            return key
        if key not in self._cache:
            renamed = list(self._revert(self.model, {key: torch.empty(0)}))
            if len(renamed) != 1:
                raise UnsupportedModelError(f"{type(self.model).__name__} stores {key} as {len(renamed)} tensors; "
                                            f"streaming supports one-to-one names only (use the in-memory prune)")
            self._cache[key] = renamed[0]
        return self._cache[key]


def source_key(key: str, weights: SourceWeights, prefix: str, saved: SavedNames | None = None) -> str | None:
    """The checkpoint's name for the model's tensor ``key``: what save_pretrained calls it, the same, or without /
    with the base model's prefix (checkpoints of a base model name ``h.0...`` what a head model calls
    ``transformer.h.0...``)."""
    candidates = ([saved(key)] if saved is not None else []) + [key]
    if prefix:
        candidates += [key.removeprefix(prefix + "."), f"{prefix}.{key}"]
    return next((k for k in candidates if k in weights), None)


def load_tensors(module: nn.Module, keys: dict[str, str], weights: SourceWeights, dtype: torch.dtype,
                 prefix: str = "", saved: SavedNames | None = None) -> None:
    """Assign ``module``'s tensors from the checkpoint: ``keys`` maps the module's state-dict names to the
    model's full names (what save_pretrained writes). Floating tensors take ``dtype``, as from_pretrained does."""
    found = {}
    for local, full in keys.items():
        found[local] = source_key(full, weights, prefix, saved)
        if found[local] is None:
            raise ModelLoadError(f"{weights.folder}: the checkpoint has no tensor {full}; it does not match its "
                                 f"config.json")
    read = weights.get_many(list(found.values()))
    tensors = {local: read[key].to(dtype) if read[key].is_floating_point() else read[key]
               for local, key in found.items()}
    check_finite_weights(((keys[k], v) for k, v in tensors.items()), weights.folder)
    result = module.load_state_dict(tensors, strict=False, assign=True)
    if result.unexpected_keys:  # cannot happen: keys come from the module's own state dict
        raise ModelLoadError(f"unexpected tensors {result.unexpected_keys[:3]} for {type(module).__name__}")
