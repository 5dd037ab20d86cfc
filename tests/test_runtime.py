"""The ONNX Runtime side: torch-free imports, greedy generation equal to transformers, embeddings, eval
parity with torch, bench fields, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny_models import make_tiny
from transformers import AutoModelForCausalLM, AutoTokenizer

from sparse_deploy.evaluation import evaluate
from sparse_deploy.config import CalibrationConfig, EvalConfig, ExportConfig, PruneConfig, SolverConfig
from sparse_deploy.exporting import export
from sparse_deploy.errors import InvalidInputError, RuntimeSessionError
from sparse_deploy.runtime import DecoderRunner, ExportedModel, SessionConfig, embed, generate
from sparse_deploy.bench import BenchConfig, benchmark


def export_folder(source, out, encoding="dense"):
    return export(source, out, ExportConfig(encoding=encoding)).output


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """model_type -> (checkpoint folder, exported folder), built on first use."""
    root = tmp_path_factory.mktemp("runtime")
    cache = {}

    def get(model_type):
        if model_type not in cache:
            source = make_tiny(model_type, root / f"{model_type}-dense")
            cache[model_type] = (source, export_folder(source, root / f"{model_type}-onnx"))
        return cache[model_type]

    return get


def test_runtime_import_does_not_import_torch():
    code = "import sys, sparse_deploy.runtime, sparse_deploy.bench; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("model_type", ["opt", "gpt2", "llama"])
def test_greedy_tokens_equal_transformers(tiny, model_type):
    source, onnx_dir = tiny(model_type)
    model = ExportedModel(onnx_dir)
    prompt = AutoTokenizer.from_pretrained(source)("def parse(self, text):\n    return", return_tensors="np")
    ids = prompt["input_ids"].astype(np.int64)
    ours = DecoderRunner(model).greedy(ids, 12, stop_at_eos=False)
    hf = AutoModelForCausalLM.from_pretrained(source).eval()
    with torch.no_grad():
        theirs = hf.generate(torch.from_numpy(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                             max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert ours.tolist() == theirs.tolist()
    text = generate(model, "def parse(self, text):", max_new_tokens=3)
    assert isinstance(text, str)


def test_onnx_perplexity_agrees_with_torch(tiny, calib_text):
    source, onnx_dir = tiny("opt")
    config = EvalConfig(dataset=str(calib_text), seqlen=64, max_chars=20_000, device="cpu")
    ours = evaluate(onnx_dir, config, progress=False)
    theirs = evaluate(source, config, progress=False)
    assert ours.backend == "onnxruntime" and theirs.backend == "torch" and ours.windows == theirs.windows
    assert abs(ours.perplexity / theirs.perplexity - 1) < 0.005


def test_encoder_embeddings_match_torch(tiny, calib_text):
    source, onnx_dir = tiny("bert")
    model = ExportedModel(onnx_dir)
    sentences = ["A short sentence.", "Another, somewhat longer sentence about sparse weights on CPUs."]
    vectors = embed(model, sentences)
    assert vectors.shape == (2, 64)
    result = evaluate(onnx_dir, EvalConfig(dataset=str(calib_text), max_chars=3000, reference=str(source),
                                           device="cpu"), progress=False)
    assert result.mean_cosine > 0.9999, "the dense export must reproduce torch's embeddings"


def test_bench_produces_every_field(tiny, tmp_path):
    source, onnx_dir = tiny("opt")
    config = BenchConfig(prompt_len=8, new_tokens=4, runs=2)
    result = benchmark(onnx_dir, baseline=onnx_dir, torch_baseline=source, config=config).to_json()
    for key in ("file_bytes", "load_s", "peak_rss_bytes", "prefill_ms", "decode_ms_p50", "decode_ms_p90",
                "decode_ms_p99", "tokens_per_s"):
        assert result["model"][key] > 0 and result["torch"][key] > 0, key
    assert {"decode_p50_ratio", "file_bytes_ratio", "load_s_ratio", "peak_rss_ratio"} <= set(result["vs_dense"])
    assert result["vs_dense"]["file_bytes_ratio"] == 1.0
    assert result["machine"]["threads"] >= 1 and result["machine"]["onnxruntime_version"]
    assert json.loads(json.dumps(result)) == result


def test_bench_encoder_fields(tiny):
    _, onnx_dir = tiny("bert")
    result = benchmark(onnx_dir, config=BenchConfig(runs=1)).model
    assert result.kind == "encoder" and result.sentences_per_s_batch1 > 0 and result.sentences_per_s_batch32 > 0


def test_bad_runtime_input(tiny, tmp_path):
    source, onnx_dir = tiny("opt")
    with pytest.raises(RuntimeSessionError, match="is not a folder"):
        ExportedModel(tmp_path / "missing")
    with pytest.raises(RuntimeSessionError, match="no model.onnx"):
        ExportedModel(source)
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "model.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(RuntimeSessionError, match="could not load"):
        ExportedModel(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "export.json").write_text('{"settings": {"encoding": "packed"}}')
    with pytest.raises(RuntimeSessionError, match="could not decode the packed weights"):
        ExportedModel(tmp_path / "corrupt")
    _, bert_dir = tiny("bert")
    with pytest.raises(RuntimeSessionError, match="encoder export; this needs a decoder"):
        generate(ExportedModel(bert_dir), "hello")
    long_prompt = np.ones((1, 120), dtype=np.int64)
    with pytest.raises(InvalidInputError, match="beyond the model's context of 128"):
        DecoderRunner(ExportedModel(onnx_dir)).greedy(long_prompt, 20)


@pytest.mark.parametrize("model_type", ["opt", "bert"])
def test_a_tokenizer_beyond_the_vocabulary_is_one_clear_error(tiny, tmp_path, model_type):
    """A tokenizer.json that gives ids past config.json's vocab_size (it belongs to another model) is named, for
    generate and embed, before ONNX Runtime fails on an out-of-bounds Gather."""
    import shutil

    _, onnx_dir = tiny(model_type)
    folder = shutil.copytree(onnx_dir, tmp_path / "mismatched")
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = 3  # every real token id is beyond it
    (folder / "config.json").write_text(json.dumps(config))
    model = ExportedModel(folder, SessionConfig(verify=False))
    with pytest.raises(InvalidInputError, match=r"beyond the model's vocabulary of 3 .*does not belong"):
        generate(model, "hello world") if model_type == "opt" else embed(model, ["hello world"])


def test_packed_export_runs_like_the_dense_one(tiny, tmp_path, calib_text):
    """A pruned model exported packed: the runtime's staged load and ONNX Runtime's own folding both give the
    dense export's greedy tokens, and the packed file is smaller."""
    from sparse_deploy.api import prune

    source, _ = tiny("opt")
    config = PruneConfig(calibration=CalibrationConfig(str(calib_text), 4, 32), solver=SolverConfig(device="cpu"))
    pruned = prune(source, tmp_path / "pruned", config, progress=False).output
    dense = ExportedModel(export_folder(pruned, tmp_path / "dense"))
    packed_dir = export_folder(pruned, tmp_path / "packed", encoding="packed")
    ids = np.arange(5, 15, dtype=np.int64)[None, :]
    expected = DecoderRunner(dense).greedy(ids, 8, stop_at_eos=False)
    for mode in ("stage", "fold"):
        packed = ExportedModel(packed_dir, SessionConfig(packed=mode))
        assert DecoderRunner(packed).greedy(ids, 8, stop_at_eos=False).tolist() == expected.tolist(), mode
    assert packed.file_bytes < dense.file_bytes


@pytest.mark.parametrize("model_type", ["opt", "bert"])
def test_export_json_written_before_model_facts_still_opens(tiny, tmp_path, model_type):
    """export.json records the model's kind and context; a file written before those keys is read by its task and
    config.json, to the same result."""
    import shutil

    _, exported = tiny(model_type)
    recorded = json.loads((exported / "export.json").read_text())["model"]
    assert recorded["kind"] == ("decoder" if model_type == "opt" else "encoder") and recorded["max_context"] > 0
    old = tmp_path / "old"
    shutil.copytree(exported, old)
    data = json.loads((old / "export.json").read_text())
    del data["model"]["kind"], data["model"]["max_context"]
    (old / "export.json").write_text(json.dumps(data))
    new_info, old_info = ExportedModel(exported).info, ExportedModel(old).info
    assert (old_info.kind, old_info.max_context) == (new_info.kind, new_info.max_context)
    assert (new_info.kind, new_info.max_context) == (recorded["kind"], recorded["max_context"])
