"""The ONNX graph of a Hugging Face model, by ``torch.onnx.export(dynamo=True)``.

A decoder is wrapped as ``(input_ids, attention_mask, position_ids?, *past) -> (logits, *present)`` with the cache
flattened to ``past_key_values.{i}.key/value`` in and ``present.{i}.key/value`` out, one graph for the prompt (an
empty cache) and every later step. An encoder gives ``last_hidden_state`` from ``input_ids, attention_mask,
token_type_ids?``. Every size is dynamic; the example sizes are at least 2, since the exporter freezes dimensions
of size 0 and 1 into the graph.
"""

from __future__ import annotations

from typing import Any

import torch

from sparse_deploy.hf import accepts_argument, cache_keyword, returned_cache

DECODER_TASK = "text-generation-with-past"
ENCODER_TASK = "feature-extraction"
_BATCH, _NEW, _PAST = 2, 3, 4  # example sizes: distinct and >= 2, so no dimension is specialised


def cache_pairs(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(key, value) [batch, kv_heads, length, head_dim] per layer of a transformers Cache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_layout(model: torch.nn.Module) -> list[tuple[int, int]]:
    """(kv_heads, head_dim) per layer, read off the cache of a 2-token forward (configs name these many ways)."""
    ids = torch.zeros((1, 2), dtype=torch.int64)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    return [(key.shape[1], key.shape[3]) for key, _ in cache_pairs(returned_cache(out))]


class DecoderGraph(torch.nn.Module):
    """A causal LM with its cache as flat tensors: ``(input_ids, attention_mask, position_ids?, *past)``."""

    def __init__(self, model: torch.nn.Module, position_ids: bool):
        super().__init__()
        self.model = model
        self.position_ids = position_ids
        self.keyword = cache_keyword(model)

    def forward(self, input_ids, attention_mask, *rest):
        from transformers import DynamicCache

        position_ids, past = (rest[0], rest[1:]) if self.position_ids else (None, rest)
        cache = DynamicCache(list(zip(past[0::2], past[1::2])))
        extra = {"position_ids": position_ids} if self.position_ids else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                         **{self.keyword: cache}, **extra)
        return (out.logits, *(t for pair in cache_pairs(returned_cache(out)) for t in pair))


class EncoderGraph(torch.nn.Module):
    """An encoder's ``last_hidden_state`` from ``(input_ids, attention_mask, token_type_ids?)``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, *token_type_ids):
        extra = {"token_type_ids": token_type_ids[0]} if token_type_ids else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state


def _uses_token_types(model: torch.nn.Module) -> bool:
    return accepts_argument(model, "token_type_ids") and (getattr(model.config, "type_vocab_size", 0) or 0) > 1


def graph_and_inputs(model: torch.nn.Module, decoder: bool):
    """The wrapper module, example inputs, dynamic shapes, and input and output names for ``model``."""
    batch, new, past = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length"), torch.export.Dim(
        "past_sequence_length")
    total = torch.export.Dim("total_sequence_length")
    vocab = model.config.get_text_config(decoder=decoder).vocab_size
    ids = torch.randint(0, vocab, (_BATCH, _NEW), generator=torch.Generator().manual_seed(0))
    if not decoder:
        names = ["input_ids", "attention_mask"] + (["token_type_ids"] if _uses_token_types(model) else [])
        args = (ids, torch.ones_like(ids)) + ((torch.zeros_like(ids),) if len(names) == 3 else ())
        shapes = ({0: batch, 1: new}, {0: batch, 1: new}, tuple({0: batch, 1: new} for _ in names[2:]))
        return EncoderGraph(model), args, shapes, names, ["last_hidden_state"]
    layout = cache_layout(model)
    layers = len(layout)
    with_positions = accepts_argument(model, "position_ids")
    dtype = next(model.parameters()).dtype
    cache = [torch.randn(_BATCH, heads, _PAST, dim, dtype=dtype) for heads, dim in layout for _ in "kv"]
    args = (ids, torch.ones(_BATCH, _PAST + _NEW, dtype=torch.int64))
    names = ["input_ids", "attention_mask"]
    rest, rest_shapes = [], []  # forward's *rest: one nested tuple of shapes
    if with_positions:
        rest.append(torch.arange(_PAST, _PAST + _NEW).expand(_BATCH, _NEW).contiguous())
        rest_shapes.append({0: batch, 1: new})
        names.append("position_ids")
    cache_names = [f"{{}}.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    rest += cache
    rest_shapes += [{0: batch, 2: past} for _ in cache]
    args += tuple(rest)
    shapes = ({0: batch, 1: new}, {0: batch, 1: total}, tuple(rest_shapes))
    names += [n.format("past_key_values") for n in cache_names]
    return DecoderGraph(model, with_positions), args, shapes, names, ["logits"] + [n.format("present") for n in
                                                                                     cache_names]


def export_graph(model: torch.nn.Module, decoder: bool, opset: int | None):
    """The in-memory ``onnx.ModelProto`` of ``model`` (float32, eval mode), standard ONNX ops only."""
    graph, args, shapes, input_names, output_names = graph_and_inputs(model, decoder)
    with torch.no_grad():
        program = torch.onnx.export(
            graph.eval(), args, dynamo=True, dynamic_shapes=shapes, input_names=input_names,
            output_names=output_names, opset_version=opset, optimize=True, verbose=False,
        )
    model = program.model_proto
    # The exporter annotates intermediate values with shapes; later graph passes (Gemm -> MatMul, quantization)
    # change weights' layouts, and stale annotations would contradict them. ONNX Runtime infers shapes itself.
    del model.graph.value_info[:]
    return model
