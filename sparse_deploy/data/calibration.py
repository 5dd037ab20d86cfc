"""Calibration token windows: ``nsamples`` random windows of ``seqlen`` tokens drawn with ``seed``, as the
SparseGPT / GPTQ reference protocol draws them from the training text (for C4, from random documents)."""

from __future__ import annotations

import random

import torch

from sparse_deploy.config import CalibrationConfig
from sparse_deploy.data.text import load_documents, load_text
from sparse_deploy.errors import CalibrationError


def calibration_windows(tokenizer, config: CalibrationConfig, seqlen: int, encoder: bool = False) -> torch.Tensor:
    """Token ids [nsamples, seqlen]. For encoders each window is wrapped in the tokenizer's special tokens
    ([CLS] ... [SEP]) so the model sees inputs shaped like its real ones."""
    prefix, suffix = special_tokens_around(tokenizer) if encoder else ([], [])
    inner = seqlen - len(prefix) - len(suffix)
    if inner < 1:
        raise CalibrationError(f"seqlen {seqlen} is too short for an encoder window; use at least "
                               f"{len(prefix) + len(suffix) + 1}")
    rng = random.Random(config.seed)
    if config.source == "c4":
        windows = _windows_from_documents(load_documents("c4", "train"), tokenizer, config.nsamples, inner, rng)
    else:
        ids = tokenize(tokenizer, load_text(config.source, "train"), special=not encoder)
        if ids.numel() <= inner:
            raise CalibrationError(
                f"calibration text {config.source} has {ids.numel()} tokens, fewer than one window of {inner}; "
                "give more text or a smaller --seqlen"
            )
        starts = [rng.randint(0, ids.numel() - inner - 1) for _ in range(config.nsamples)]
        windows = torch.stack([ids[s : s + inner] for s in starts])
    if encoder:
        windows = torch.tensor([prefix + w.tolist() + suffix for w in windows], dtype=torch.long)
    return windows


def special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The special token ids the tokenizer puts before and after a single sequence ([CLS] and [SEP] for BERT),
    read off an encoded word (transformers 5 tokenizers have no build_inputs_with_special_tokens)."""
    plain = tokenizer("the", add_special_tokens=False)["input_ids"]
    full = tokenizer("the", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    raise CalibrationError("the tokenizer's special tokens could not be told apart from the text's tokens")


def tokenize(tokenizer, text: str, special: bool = True) -> torch.Tensor:
    """The text as one 1-D tensor of token ids (tokenized once, as the perplexity protocol requires)."""
    ids = tokenizer(text, add_special_tokens=special, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _windows_from_documents(documents: list[str], tokenizer, nsamples: int, seqlen: int, rng) -> torch.Tensor:
    """C4's protocol: a random document longer than the window, then a random window inside it."""
    windows = []
    for _ in range(nsamples):
        for _attempt in range(10_000):
            ids = tokenize(tokenizer, documents[rng.randint(0, len(documents) - 1)], special=False)
            if ids.numel() > seqlen:
                start = rng.randint(0, ids.numel() - seqlen - 1)
                windows.append(ids[start : start + seqlen])
                break
        else:
            raise CalibrationError(f"no document longer than {seqlen} tokens found; use a smaller --seqlen")
    return torch.stack(windows)
