"""export() end to end on tiny pruned OPT, GPT-2, Llama and BERT models built from configs in the test."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import transformers
from onnx import numpy_helper

from conftest import shared_path
from tiny_models import make_tiny
from sparse_deploy import ExportConfig, export
from sparse_deploy.adapters import adapter_for
from sparse_deploy.formats.checkpoint import LayerRecord, Manifest, write_manifest
from sparse_deploy.config import DEFAULT_TOLERANCES, SparsitySpec
from sparse_deploy.errors import (
    ExportMismatchError, ModelLoadError, OutputExistsError, UnsupportedModelError,
)
from sparse_deploy.exporting import REPORT_NAME, SparseEncodingWarning
from sparse_deploy.exporting.sparse_encoding import densify, read_packed
from sparse_deploy.pruning import magnitude

DECODE_OPS = {"CumSum", "GatherElements"}
INTEGER_OPS = {"DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger"}


SPECS = {"opt": SparsitySpec.unstructured(0.5), "gpt2": SparsitySpec.pattern("2:4"),
         "llama": SparsitySpec.unstructured(0.5), "bert": SparsitySpec.pattern("2:4")}
PRUNED_PER_LAYER = {"opt": 6, "gpt2": 4, "llama": 7, "bert": 6}
LIGHT = "model.decoder.layers.1.fc2"  # pruned to 10% only, and recorded so in the OPT fixture's manifest


def make_checkpoint(kind: str, folder: Path) -> Path:
    """The shared tiny fixture of ``kind``, every linear weight of its blocks magnitude-pruned (see SPECS)."""
    from transformers import AutoModel, AutoModelForCausalLM

    make_tiny(kind, folder)
    model = (AutoModel if kind == "bert" else AutoModelForCausalLM).from_pretrained(folder)
    adapter = adapter_for(kind)
    paths = {id(module): name for name, module in model.named_modules()}
    layers = []
    with torch.no_grad():
        for block in adapter.blocks(model):
            for linear in adapter.linears(block).values():
                name = paths[id(linear)]
                spec = SparsitySpec.unstructured(0.1) if kind == "opt" and name == LIGHT else SPECS[kind]
                adapter.set_weight(linear, magnitude(adapter.get_weight(linear), None, spec).weight)
                layers.append(LayerRecord(name, tuple(adapter.get_weight(linear).shape), spec.target))
    model.save_pretrained(folder)
    if kind == "opt":
        write_manifest(folder, Manifest(
            model={"source": "test", "model_type": "opt"}, method="magnitude", sparsity=0.5, pattern=None,
            calibration={}, solver={}, layers=tuple(layers), totals={}, time_s=0.0, time_per_layer_s=(),
            peak_rss_bytes=0, versions={}, tool_version="0.1.0",
        ))
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = make_checkpoint(kind, tmp_path_factory.mktemp(kind))
        return made[kind]

    return get


@pytest.fixture(scope="module")
def wiki_text():
    return shared_path("data", "wikitext-2", "valid.txt").read_text(encoding="utf-8")[:2000]


@pytest.mark.parametrize("kind", ["opt", "gpt2", "llama", "bert"])
def test_packed_export_matches_torch_and_passes_the_full_check(kind, checkpoints, tmp_path, wiki_text):
    out = tmp_path / "onnx"
    report = export(checkpoints(kind), out, ExportConfig(validation_text=wiki_text))
    model_path = out / "model.onnx"
    onnx.checker.check_model(str(model_path), full_check=True)
    assert report.checker == "full" and report.parity.passed and report.parity.rel_diff <= 1e-3
    assert report.parity.input_source == "tokenizer" and report.parity.positions >= 16
    assert not DECODE_OPS & set(report.parity.executed_ops), "ONNX Runtime ran the decode instead of folding it"

    encoded = report.encoded
    assert len(encoded) == 2 * PRUNED_PER_LAYER[kind] and {r.encoding for r in encoded} == {"packed"}
    assert all(r.name in report.sources for r in encoded), "every encoded weight is traced to its torch parameter"
    assert all(r.stored_bytes <= 0.6 * r.dense_bytes for r in encoded if r.sparsity >= 0.5)  # tiny rows: offsets show
    for name in ("config.json", "tokenizer_config.json", REPORT_NAME):
        assert (out / name).is_file()
    saved = json.loads((out / REPORT_NAME).read_text())
    assert saved["totals"]["encoded_stored_bytes"] == report.stored_bytes
    assert saved["parity"]["passed"] and saved["files"]["model.onnx"] == model_path.stat().st_size
    assert saved["versions"]["transformers"] == transformers.__version__ and saved["versions"]["torch"] == \
        torch.__version__ and saved["versions"]["onnx"] == onnx.__version__ and saved["versions"]["onnxscript"]

    model = onnx.load(str(model_path))
    names = {i.name for i in model.graph.input}, {o.name for o in model.graph.output}
    if kind == "bert":
        assert report.task == "feature-extraction" and "last_hidden_state" in names[1]
    else:
        assert report.task == "text-generation-with-past" and report.parity.cache_checked
        assert {"input_ids", "attention_mask", "past_key_values.0.key"} <= names[0]
        assert {"logits", "present.0.key", "present.1.value"} <= names[1]
    if kind in ("opt", "gpt2"):  # tied LM head: the embedding is stored once
        vocab_sized = [i for i in model.graph.initializer if len(i.dims) == 2 and 8192 in i.dims]
        assert len(vocab_sized) == 1


def test_manifest_layers_are_encoded_below_the_threshold(checkpoints, tmp_path):
    report = export(checkpoints("opt"), tmp_path / "onnx", ExportConfig(encoding="packed"))
    light = [r for r in report.encoded if report.sources[r.name].startswith(LIGHT + ".weight")]
    assert len(light) == 1 and 0.05 < light[0].sparsity < 0.2
    dense = export(checkpoints("opt"), tmp_path / "onnx", ExportConfig(encoding="packed", min_sparsity=0.99),
                   force=True)
    assert len(dense.encoded) == 2 * PRUNED_PER_LAYER["opt"], "manifest layers are encoded whatever the threshold"


def test_file_sizes_follow_the_encodings(checkpoints, tmp_path):
    ck = checkpoints("opt")
    packed = export(ck, tmp_path / "packed", ExportConfig(encoding="packed"))
    dense = export(ck, tmp_path / "dense", ExportConfig(encoding="dense"))
    auto = export(ck, tmp_path / "auto", ExportConfig(encoding="auto"))
    with pytest.warns(SparseEncodingWarning, match="coo takes"):
        coo = export(ck, tmp_path / "coo", ExportConfig(encoding="coo"))
    assert not dense.encoded and dense.parity.rel_diff == pytest.approx(packed.parity.rel_diff, abs=1e-6)
    saved = dense.model_bytes - packed.model_bytes
    overhead = (packed.dense_bytes - packed.stored_bytes) - saved  # the decode nodes and their names
    assert 0 < overhead < 2048 * len(packed.encoded)
    assert coo.model_bytes > dense.model_bytes and coo.checker == "structural" and coo.parity.passed
    assert len(coo.warnings) == len(coo.encoded) == 2 * PRUNED_PER_LAYER["opt"]
    assert {r.encoding for r in auto.encoded} == {"packed"} and abs(auto.model_bytes - packed.model_bytes) < 1024


def test_int8_runs_on_integer_kernels_and_keeps_zeros(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    ck = checkpoints("opt")
    report = export(ck, tmp_path / "int8", ExportConfig(quantize="int8"))
    assert report.parity.tolerance == DEFAULT_TOLERANCES["int8"] and report.parity.top1_agreement >= 0.8
    assert report.parity.rel_diff < DEFAULT_TOLERANCES["int8"]
    info = json.loads((tmp_path / "int8" / REPORT_NAME).read_text())
    assert info["settings"]["int8_scheme"] == "s7-per-channel" and info["settings"]["tolerance"] == 0.1
    assert INTEGER_OPS & set(report.parity.executed_ops)
    assert len(report.quantized) == 2 * PRUNED_PER_LAYER["opt"] + 1  # the blocks and the (untied) LM head
    assert all(r.dtype == "int8" for r in report.encoded) and len(report.encoded) == 2 * PRUNED_PER_LAYER["opt"]

    model = onnx.load(str(tmp_path / "int8" / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("_zero_point")}
    torch_model = AutoModelForCausalLM.from_pretrained(ck)
    params = dict(torch_model.named_parameters())
    for rec in report.encoded:
        q = read_packed(model, rec.name)
        source = report.sources[rec.name]
        W = params[source.split(" ")[0]].detach().numpy()
        W = W.T if source.endswith("(transposed)") else W
        assert q.dtype == np.int8 and q.shape == W.shape and np.all(q[W == 0] == 0), "pruned zeros stay exactly 0"
        assert np.abs(q).max() == 64, "7-bit grid: the largest weight of some channel maps to 64, none beyond"
        # AVX2 u8s8 (vpmaddubsw) adds uint8 x times q over neighbouring rows k into an int16: never past 32767
        q32 = np.concatenate([q, np.zeros((q.shape[0] % 2, q.shape[1]), q.dtype)]).astype(np.int32)
        for part in (np.maximum(q32, 0), np.maximum(-q32, 0)):
            assert 255 * int((part[0::2] + part[1::2]).max()) <= 32767
        assert np.all(inits[rec.name[: -len("_quantized")] + "_zero_point"] == 0)

    # numpy-decoded weights handed to ONNX Runtime give the same logits as its own folding of the decode
    import onnxruntime as ort

    dense = densify(model)
    options = ort.SessionOptions()
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in dense.weights.values()]
    options.add_external_initializers(list(dense.weights), values)
    sessions = [ort.InferenceSession(dense.model.SerializeToString(), options, providers=["CPUExecutionProvider"]),
                ort.InferenceSession(str(tmp_path / "int8" / "model.onnx"), providers=["CPUExecutionProvider"])]
    feeds = {"input_ids": np.array([[2, 100, 200, 300]]), "attention_mask": np.ones((1, 4), np.int64),
             "position_ids": np.arange(4)[None]}
    for arg in sessions[1].get_inputs():
        if arg.name.startswith("past_key_values."):
            feeds[arg.name] = np.zeros((1, arg.shape[1], 0, arg.shape[3]), np.float32)
    first, second = (s.run(["logits"], feeds)[0] for s in sessions)
    assert np.array_equal(first, second)


def test_bad_inputs_fail_cleanly(checkpoints, tmp_path):
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    with pytest.raises(ModelLoadError, match="not a folder"):
        export(tmp_path / "missing", out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        export(tmp_path / "empty", out)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        export(broken, out)
    (broken / "config.json").write_text(json.dumps({"model_type": "not-a-model"}))
    with pytest.raises(UnsupportedModelError):
        export(broken, out)
    from transformers import T5Config

    T5Config(d_model=32, num_layers=1).save_pretrained(broken)
    with pytest.raises(UnsupportedModelError, match="decoder-only and encoder-only"):
        export(broken, out)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for item in checkpoints("opt").iterdir():
        (corrupt / item.name).write_bytes(item.read_bytes())
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="could not be loaded"):
        export(corrupt, out)
    with pytest.raises(ExportMismatchError, match="relative"):
        export(checkpoints("opt"), out, ExportConfig(encoding="dense", tolerance=1e-12))
    assert list(out.parent.iterdir()) == [], "nothing half-written is left behind"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        export(checkpoints("opt"), out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_exports_and_reports_errors_on_one_line(checkpoints, tmp_path):
    from typer.testing import CliRunner

    from sparse_deploy.cli import app

    runner = CliRunner()
    help_text = runner.invoke(app, ["export", "--help"]).output
    assert all(flag in help_text for flag in ("--output", "--encoding", "--quantize", "--opset", "--force"))
    out = tmp_path / "cli"
    result = runner.invoke(app, ["export", str(checkpoints("gpt2")), "--output", str(out), "--encoding", "auto"])
    assert result.exit_code == 0, result.output
    assert "parity" in result.output and (out / "model.onnx").is_file()
    result = runner.invoke(app, ["export", str(checkpoints("gpt2")), "--output", str(out)])
    assert result.exit_code == 2 and "--force" in result.output
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["export", str(tmp_path / "empty"), "--output", str(tmp_path / "x")])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "config.json" in errors[0]
    assert not (tmp_path / "x").exists() and os.listdir(out)


def test_export_config_is_validated():
    from sparse_deploy.errors import ConfigError

    for bad in ({"encoding": "zip"}, {"quantize": "int3"}, {"group_size": 48}, {"group_size": True},
                {"opset": 7}, {"opset": 13}, {"opset": True},
                {"min_sparsity": 0}, {"tolerance": 0.0}, {"tolerance": float("nan")}, {"validation_tokens": 1}):
        with pytest.raises(ConfigError):
            ExportConfig(**bad)
    assert ExportConfig().encoding == "packed" and ExportConfig(opset=17).opset == 17
