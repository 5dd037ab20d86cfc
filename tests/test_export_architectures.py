"""One tiny model per registered architecture through the torch.onnx exporter, against torch: a transformers release
that breaks tracing (or changes the cache) fails here first."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from tiny_models import TINY_CONFIGS
from sparse_deploy.adapters import REGISTRY
from sparse_deploy.exporting.torch_export import export_graph

TOLERANCE = 1e-4  # relative to max |torch|; fp32 exports measure ~1e-7


def test_every_registered_architecture_has_a_tiny_fixture():
    assert set(TINY_CONFIGS) == set(REGISTRY)


def _feeds(session, ids, mask, past):
    """Inputs for one step: ids [B, L], mask [B, past + L]; positions count the real tokens before each."""
    feeds = {"input_ids": ids, "attention_mask": mask}
    names = {i.name: i for i in session.get_inputs()}
    if "position_ids" in names:
        feeds["position_ids"] = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -ids.shape[1]:]
    for name, arg in names.items():
        if name.startswith("past_key_values."):
            feeds[name] = past[name] if past else np.zeros((ids.shape[0], arg.shape[1], 0, arg.shape[3]), np.float32)
    return feeds


def _rel(got, expected):
    return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_export_matches_torch_with_and_without_cache(model_type):
    torch.manual_seed(0)
    decoder = REGISTRY[model_type].kind == "decoder"
    model = (AutoModelForCausalLM if decoder else AutoModel).from_config(TINY_CONFIGS[model_type]()).eval()
    proto = export_graph(model, decoder, None)
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}, "standard ONNX ops only"
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 8000, (2, 8), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # the second row is left-padded
    if not decoder:
        names = [i.name for i in session.get_inputs()]
        assert names[:2] == ["input_ids", "attention_mask"]
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        if "token_type_ids" in names:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        got = session.run(["last_hidden_state"], feeds)[0]
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
        real = mask.numpy().astype(bool)
        assert _rel(got[real], expected[real]) < TOLERANCE
        return

    layers = model.config.num_hidden_layers
    outputs = [o.name for o in session.get_outputs()]
    assert outputs == ["logits"] + [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    assert [i.name for i in session.get_inputs() if i.name.startswith("past")] == [
        f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    with torch.no_grad():
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        expected = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.numpy()
    # a 5-token prefill on an empty cache, then 3 single-token steps on the returned cache
    np_ids, np_mask = ids.numpy(), mask.numpy()
    past, got = None, []
    for start, stop in ((0, 5), (5, 6), (6, 7), (7, 8)):
        result = dict(zip(outputs, session.run(None, _feeds(session, np_ids[:, start:stop], np_mask[:, :stop], past))))
        past = {name.replace("present.", "past_key_values."): value for name, value in result.items()
                if name.startswith("present.")}
        got.append(result["logits"])
    got = np.concatenate(got, axis=1)
    assert past["past_key_values.0.key"].shape[2] == 8
    real = np_mask.astype(bool)
    assert _rel(got[real], expected[real]) < TOLERANCE
