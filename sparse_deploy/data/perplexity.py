"""Perplexity by the standard WikiText-2 / PTB protocol (as in the SparseGPT and GPTQ evaluations): the test
text tokenized once, cut into non-overlapping windows of ``seqlen`` tokens (the tail dropped), and the
exponential of the mean negative log-likelihood over every predicted token."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sparse_deploy.errors import CalibrationError, NonFiniteError

_MAX_NLL = 700.0  # exp() of more overflows a float


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token
    tokens: int  # predicted tokens
    windows: int
    seqlen: int


def windows_of(ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Non-overlapping windows [n, seqlen] of a 1-D id tensor; the tail shorter than a window is dropped."""
    count = ids.numel() // seqlen
    if count == 0:
        raise CalibrationError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: count * seqlen].view(count, seqlen)


def nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Σ −log p(ids[t+1] | ids[≤t]) over a batch: logits [B, L, V], ids [B, L]."""
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                 ids[:, 1:].reshape(-1), reduction="sum"))


def summarise(total_nll: float, windows: torch.Tensor) -> Perplexity:
    predicted = windows.shape[0] * (windows.shape[1] - 1)
    mean = total_nll / predicted
    if not math.isfinite(mean) or mean > _MAX_NLL:
        raise NonFiniteError(f"the mean negative log-likelihood is {mean:g}, so the perplexity is not a finite number: "
                             f"the model's outputs are NaN or infinite (a broken checkpoint or export)")
    return Perplexity(math.exp(mean), mean, predicted, windows.shape[0], windows.shape[1])


def perplexity_of(
    logits: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, seqlen: int, *, batch_size: int | None = None,
    progress: bool = False,
) -> Perplexity:
    """Perplexity on token ids [N] of any causal LM given as ``logits(windows [B, seqlen]) -> [B, seqlen, V]``."""
    windows = windows_of(ids, seqlen)
    batch_size = batch_size or max(1, 4096 // seqlen)
    total = 0.0
    for start in tqdm(range(0, windows.shape[0], batch_size), desc="eval", unit="batch", disable=not progress,
                      leave=False):
        batch = windows[start : start + batch_size]
        out = logits(batch)
        total += nll_sum(out, batch.to(out.device))
    return summarise(total, windows)


@torch.no_grad()
def perplexity(
    model, ids: torch.Tensor, seqlen: int, *, batch_size: int | None = None, device: torch.device | str = "cpu",
    progress: bool = False,
) -> Perplexity:
    """Perplexity of a torch causal LM on token ids [N]."""
    return perplexity_of(lambda batch: model(input_ids=batch.to(device), use_cache=False).logits, ids, seqlen,
                         batch_size=batch_size, progress=progress)
