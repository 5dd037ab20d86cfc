"""Running an exported model: greedy generation with the KV cache, full-sequence logits, an encoder's hidden states
and sentence embeddings.

The KV cache stays in ONNX Runtime's own buffers between steps (``run_with_ort_values``): each step's
``present.*`` outputs are fed back as the next step's ``past_key_values.*`` without a copy through numpy.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnxruntime as ort

from sparse_deploy.errors import ConfigError, InvalidInputError, NonFiniteError, RuntimeSessionError
from sparse_deploy.runtime.session import ORT_ERRORS, ExportedModel


class DecoderRunner:
    """One decoder export driven step by step."""

    def __init__(self, model: ExportedModel):
        model.require("decoder")
        self.model = model
        self.info = model.info
        self.session = model.session
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(self.info.layers) for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in range(self.info.layers) for kv in ("key", "value")]
        self.output_names = ["logits", *self.present_names]

    def empty_past(self, batch: int) -> list[ort.OrtValue]:
        shape = (batch, self.info.kv_heads, 0, self.info.head_dim)
        return [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=self.info.kv_dtype)) for _ in self.past_names]

    def step(self, ids: np.ndarray, mask: np.ndarray, past: list[ort.OrtValue]) -> tuple[np.ndarray, list]:
        """ids [B, L] (the new tokens), mask [B, past + L] -> logits [B, L, V] and the new cache."""
        feeds = {"input_ids": ort.OrtValue.ortvalue_from_numpy(ids),
                 "attention_mask": ort.OrtValue.ortvalue_from_numpy(mask)}
        if self.info.has_position_ids:  # positions of the new tokens: count of real tokens before each, [B, L]
            positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -ids.shape[1]:]
            feeds["position_ids"] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(positions))
        feeds.update(zip(self.past_names, past))
        try:
            outputs = self.session.run_with_ort_values(self.output_names, feeds)
        except ORT_ERRORS as exc:
            raise RuntimeSessionError(f"ONNX Runtime failed on a decoder step: {exc}") from None
        return outputs[0].numpy(), list(outputs[1:])

    def check_length(self, total: int) -> None:
        limit = self.info.max_context
        if limit is not None and total > limit:
            raise InvalidInputError(f"prompt plus new tokens is {total} tokens, beyond the model's context of {limit}")

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Logits [B, L, V] for whole sequences ids [B, L] (no cache), as perplexity needs."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        self.check_length(ids.shape[1])
        logits, _ = self.step(ids, np.ones_like(ids), self.empty_past(ids.shape[0]))
        return logits

    def greedy(
        self, ids: np.ndarray, max_new_tokens: int, *, stop_at_eos: bool = True,
        on_step: Callable[[int, float], None] | None = None,
    ) -> np.ndarray:
        """Greedy continuation of ids [B, L] by up to ``max_new_tokens`` tokens: [B, L + n].
        ``on_step(index, seconds)`` is told each step's duration (index 0 is the prompt's prefill)."""
        import time

        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise InvalidInputError(f"prompt ids must be [batch, length >= 1], got shape {ids.shape}")
        self.check_length(ids.shape[1] + max_new_tokens)
        batch = ids.shape[0]
        mask = np.ones_like(ids)
        past = self.empty_past(batch)
        new = ids
        out = [ids]
        finished = np.zeros(batch, dtype=bool)
        for index in range(max_new_tokens):
            start = time.perf_counter()
            logits, past = self.step(new, mask, past)
            token = logits[:, -1, :].argmax(axis=-1).astype(np.int64)  # [B]
            if on_step is not None:
                on_step(index, time.perf_counter() - start)
            if not np.isfinite(logits[:, -1, :]).all():  # argmax of NaN is token 0: text that means nothing
                raise NonFiniteError(f"step {index} gave NaN or infinite logits; the export is broken, so no text "
                                     f"is printed")
            out.append(token[:, None])
            eos = self.info.eos_token_id
            if stop_at_eos and eos is not None:
                finished |= token == eos
                if finished.all():
                    break
            new = token[:, None]
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        return np.concatenate(out, axis=1)


def generate(model: ExportedModel, prompt: str, max_new_tokens: int = 32) -> str:
    """The greedy continuation of ``prompt`` as text (the prompt itself not repeated)."""
    if max_new_tokens < 1:
        raise ConfigError(f"--new-tokens must be >= 1, got {max_new_tokens}")
    ids = np.array([model.tokenizer.encode(prompt).ids], dtype=np.int64)
    if ids.shape[1] == 0:
        raise InvalidInputError("the prompt is empty after tokenization")
    model.check_token_ids(ids)
    full = DecoderRunner(model).greedy(ids, max_new_tokens)
    return model.tokenizer.decode(full[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


def hidden_states(model: ExportedModel, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """An encoder export's ``last_hidden_state`` [B, L, D] for ids and mask [B, L]."""
    model.require("encoder")
    feeds = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in model.input_names():
        feeds["token_type_ids"] = np.zeros_like(ids)
    try:
        return model.session.run(["last_hidden_state"], feeds)[0]
    except ORT_ERRORS as exc:
        raise RuntimeSessionError(f"ONNX Runtime failed on an encoder batch: {exc}") from None


def embed(model: ExportedModel, sentences: list[str], *, batch_size: int = 32, max_length: int = 128) -> np.ndarray:
    """Mean-pooled sentence embeddings [N, D] from an encoder export."""
    model.require("encoder")
    tokenizer = model.tokenizer
    rows = []
    for start in range(0, len(sentences), batch_size):
        encoded = [e.ids[:max_length] for e in tokenizer.encode_batch(sentences[start : start + batch_size])]
        width = max(len(e) for e in encoded)
        ids = np.zeros((len(encoded), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, e in enumerate(encoded):
            ids[i, : len(e)] = e
            mask[i, : len(e)] = 1
        model.check_token_ids(ids)
        hidden = hidden_states(model, ids, mask)  # [B, L, D]
        weights = mask[..., None].astype(hidden.dtype)
        rows.append((hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9))  # mean over real tokens
    return np.concatenate(rows).astype(np.float32)
