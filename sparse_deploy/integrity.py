"""Checks that an exported folder is what export wrote, and that two models are the same model.

``export`` records the sha256 of each model file in export.json (``"sha256": {"model.onnx": "..."}``); the runtime
verifies them when it opens the folder, so a truncated or altered model.onnx is a one-line error rather than a
crash or quietly wrong numbers. Imports nothing beyond the standard library.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from sparse_deploy.errors import ConfigError, RuntimeSessionError

DIGEST_KEY = "sha256"
_CHUNK = 1 << 20
# config.json keys that make two exports the same network: architecture, shapes and vocabulary
_IDENTITY_KEYS = (
    "model_type", "architectures", "vocab_size", "hidden_size", "n_embd", "d_model", "num_hidden_layers", "n_layer",
    "num_attention_heads", "n_head", "num_key_value_heads", "intermediate_size", "ffn_dim", "n_inner",
    "max_position_embeddings", "n_positions",
)


def sha256_file(path: str | Path) -> str:
    """The file's sha256, read in 1 MiB pieces (model files do not fit in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(folder: str | Path, names: Iterable[str]) -> dict[str, str]:
    folder = Path(folder)
    return {name: sha256_file(folder / name) for name in names}


def verify_export(folder: str | Path, export_info: dict | None = None) -> None:
    """Compare the model files of an exported folder with the digests its export.json records; a folder whose
    export.json records none (older exports, folders written by other tools) passes unchecked."""
    folder = Path(folder)
    if export_info is None:
        try:
            export_info = json.loads((folder / "export.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise RuntimeSessionError(f"{folder / 'export.json'} cannot be read: {exc}") from None
    recorded = export_info.get(DIGEST_KEY) if isinstance(export_info, dict) else None
    if recorded is None:
        return
    if not isinstance(recorded, dict):
        raise RuntimeSessionError(f"{folder / 'export.json'} has a malformed {DIGEST_KEY} entry; export again")
    for name, expected in recorded.items():
        path = folder / name
        if not isinstance(name, str) or Path(name).name != name or not path.is_file():
            raise RuntimeSessionError(f"{folder} lacks {name}, which its export.json records; export again")
        if sha256_file(path) != expected:
            raise RuntimeSessionError(f"{path} does not match the sha256 in export.json (the file was changed or is "
                                      f"damaged); export again, or pass --no-verify to open it anyway")


def _config(folder: Path) -> dict:
    try:
        data = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def model_differences(a: str | Path, b: str | Path) -> list[str]:
    """How the config.json of two model folders differ in architecture, shapes or vocabulary (empty: same)."""
    ca, cb = _config(Path(a)), _config(Path(b))
    return [f"{key} {ca.get(key)!r} vs {cb.get(key)!r}" for key in _IDENTITY_KEYS
            if (key in ca or key in cb) and ca.get(key) != cb.get(key)]


def require_same_model(model: str | Path, baseline: str | Path, option: str) -> None:
    """Refuse a baseline of another architecture, shape or vocabulary: its ratios would compare unlike things."""
    differences = model_differences(model, baseline)
    if differences:
        raise ConfigError(f"{option} {baseline} is not the same model as {model} ({'; '.join(differences[:3])}); "
                          f"give a baseline of the same model, or pass --allow-mismatch to compare them anyway")
