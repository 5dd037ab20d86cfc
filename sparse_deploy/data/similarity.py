"""Encoder evaluation: how close a model's sentence embeddings stay to a reference model's.

Embeddings are mean-pooled over the attention mask, as sentence-transformers does for all-MiniLM-L6-v2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sentences_of(text: str, limit: int = 512) -> list[str]:
    """Non-empty lines of a text, up to ``limit`` of them."""
    return [line.strip() for line in text.splitlines() if line.strip()][:limit]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden [B, L, D], mask [B, L] -> [B, D]: the mean over real tokens."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


@torch.no_grad()
def embed(model, tokenizer, sentences: list[str], *, max_length: int = 128, batch_size: int = 32,
          device: torch.device | str = "cpu") -> torch.Tensor:
    """Mean-pooled sentence embeddings [N, D] (float32)."""
    out = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(sentences[start : start + batch_size], padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt").to(device)
        hidden = model(**batch).last_hidden_state
        out.append(mean_pool(hidden.float(), batch["attention_mask"]).cpu())
    return torch.cat(out)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of matching rows of two embedding matrices [N, D]."""
    return float(F.cosine_similarity(a, b, dim=-1).mean())
