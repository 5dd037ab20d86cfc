"""Text for calibration and evaluation: Hugging Face dataset names, or local .txt / .jsonl / .raw files and folders.

Local files are read as they are, except:
- ``.jsonl``: one JSON object per line with a ``text`` field; documents are joined with blank lines;
- ``.raw`` (WikiText's raw files): each line is one row of the Hugging Face split, and rows are joined with
  "\\n\\n" as the standard perplexity protocol does with the dataset.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from sparse_deploy.config import DATASET_NAMES
from sparse_deploy.errors import CalibrationError

Split = Literal["train", "test"]
_SUFFIXES = (".txt", ".jsonl", ".raw")


def load_text(source: str, split: Split, max_chars: int | None = None) -> str:
    """The whole text of ``source`` (a dataset name or a local path), cut to ``max_chars`` if given."""
    path = Path(source).expanduser()
    if path.exists():
        text = _read_path(path)
    elif source in DATASET_NAMES:
        text = "\n\n".join(load_documents(source, split))
    else:
        names = ", ".join(DATASET_NAMES)
        raise CalibrationError(f"{source!r} is neither a file or folder nor a dataset name ({names})")
    if not text.strip():
        raise CalibrationError(f"{source} contains no text")
    return text[:max_chars] if max_chars else text


# Local copies used when the hub cannot be reached: only files whose text is exactly the dataset's split as the
# protocol reads it (wiki.test.raw is the canonical WikiText-2 raw test file; see ../shared/data/README.md).
_LOCAL_COPIES = {("wikitext2", "test"): "wikitext-2-raw/wiki.test.raw"}


def data_dirs() -> list[Path]:
    """Where local copies of the datasets are looked for: $SPARSE_DEPLOY_DATA, then ../shared/data beside the
    project folder."""
    dirs = [Path(os.environ["SPARSE_DEPLOY_DATA"]).expanduser()] if os.environ.get("SPARSE_DEPLOY_DATA") else []
    return dirs + [Path(__file__).resolve().parents[3] / "shared" / "data"]


def local_copy(name: str, split: Split) -> Path | None:
    relative = _LOCAL_COPIES.get((name, split))
    return next((d / relative for d in data_dirs() if relative and (d / relative).is_file()), None)


def load_documents(name: str, split: Split) -> list[str]:
    """Documents of a Hugging Face dataset (needs network access or a populated datasets cache)."""
    from sparse_deploy.hf import hub_reachable

    if not hub_reachable():
        local = local_copy(name, split)
        if local is not None:
            return [_read_path(local)]
        calibration = [d / "wikitext-2" / "valid.txt" for d in data_dirs() if (d / "wikitext-2" / "valid.txt").is_file()]
        hint = f"--calibration {calibration[0]}" if calibration and split == "train" else "a local .txt or .jsonl file"
        raise CalibrationError(
            f"dataset {name!r} ({split}) needs the Hugging Face hub, which cannot be reached, and no local copy was "
            f"found in $SPARSE_DEPLOY_DATA or ../shared/data; pass {hint} instead"
        )
    import datasets

    try:
        if name == "wikitext2":
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
            return ["\n\n".join(rows)]
        if name == "ptb":
            rows = datasets.load_dataset("ptb_text_only", "penn_treebank", split=split)["sentence"]
            return [" ".join(rows)]
        if split != "train":
            raise CalibrationError("c4 is a calibration source only; evaluate on wikitext2, ptb or a file")
        shard = {"train": "en/c4-train.00000-of-01024.json.gz"}
        return list(datasets.load_dataset("allenai/c4", data_files=shard, split="train")["text"])
    except (OSError, ValueError, ConnectionError) as exc:
        raise CalibrationError(f"could not load dataset {name!r} ({exc}); pass a local file instead") from None


def _read_path(path: Path) -> str:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _SUFFIXES)
        if not files:
            raise CalibrationError(f"folder {path} holds no .txt, .jsonl or .raw files")
        return "\n\n".join(_read_file(p) for p in files)
    return _read_file(path)


def _read_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"could not read {path} as UTF-8 text: {exc}") from None
    if path.suffix == ".raw":
        lines = text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")
        return "\n\n".join(line + "\n" if line else "" for line in lines)
    if path.suffix != ".jsonl":
        return text
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            documents.append(json.loads(line)["text"])
        except (ValueError, KeyError, TypeError):
            raise CalibrationError(f"{path}:{number} is not a JSON object with a 'text' field") from None
    return "\n\n".join(documents)
