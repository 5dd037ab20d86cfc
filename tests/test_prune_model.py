"""Whole-model pruning on tiny config-built models of every registered architecture."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import TINY_CONFIGS, make_tiny
from transformers import AutoModel, AutoModelForCausalLM

from sparse_deploy.adapters import REGISTRY, adapter_for
from sparse_deploy.api import evaluate, prune
from sparse_deploy.formats.checkpoint import read_manifest
from sparse_deploy.config import CalibrationConfig, EvalConfig, PruneConfig, SolverConfig, SparsitySpec
from sparse_deploy.errors import CalibrationError, ModelLoadError, OutputExistsError, UnsupportedModelError


def config_for(calib, spec=SparsitySpec.unstructured(0.5), **kwargs) -> PruneConfig:
    return PruneConfig(spec=spec, calibration=CalibrationConfig(str(calib), nsamples=4, seqlen=32),
                       solver=SolverConfig(device="cpu"), **kwargs)


def linear_weights(folder, model_type):
    """The pruned layers' weights as [out, in], loaded back with plain transformers."""
    auto = AutoModel if model_type == "bert" else AutoModelForCausalLM
    model = auto.from_pretrained(folder)
    adapter = adapter_for(model_type)
    modules = dict(model.named_modules())
    return {rec.name: adapter.get_weight(modules[rec.name]) for rec in read_manifest(folder).layers}


def test_every_registered_architecture_has_a_tiny_fixture():
    missing = set(REGISTRY) - set(TINY_CONFIGS)
    assert not missing, f"add a tiny config to tests/tiny_models.py for {sorted(missing)}"


@pytest.mark.parametrize("model_type", sorted(REGISTRY))
def test_every_architecture_prunes_to_target_and_evaluates(model_type, tmp_path, calib_text):
    source = make_tiny(model_type, tmp_path / "dense")
    report = prune(str(source), tmp_path / "pruned", config_for(calib_text), progress=False)
    adapter = adapter_for(model_type)
    assert len(report.manifest.layers) == 2 * sum(len(g) for g in adapter.groups)
    for name, weight in linear_weights(tmp_path / "pruned", model_type).items():
        assert abs(float((weight == 0).float().mean()) - 0.5) <= 0.005, name
    if adapter.kind == "decoder":
        result = evaluate(tmp_path / "pruned", EvalConfig(dataset=str(calib_text), seqlen=32, device="cpu"),
                          progress=False)
        assert 1.0 < result.perplexity < 2 * 8192, "a random 8192-token model is near uniform"
    else:
        result = evaluate(tmp_path / "pruned", EvalConfig(dataset=str(calib_text), reference=str(source),
                                                         device="cpu"), progress=False)
        assert 0.0 < result.mean_cosine < 0.99999


@pytest.mark.parametrize("model_type", ["opt", "gpt2", "llama"])
def test_nm_pattern_is_exact_in_saved_weights(model_type, tmp_path, calib_text):
    source = make_tiny(model_type, tmp_path / "dense")
    prune(str(source), tmp_path / "pruned", config_for(calib_text, SparsitySpec.pattern("2:4")), progress=False)
    for name, weight in linear_weights(tmp_path / "pruned", model_type).items():
        groups = (weight == 0).reshape(weight.shape[0], -1, 4).sum(-1)
        assert bool((groups >= 2).all()), name
        assert abs(float((weight == 0).float().mean()) - 0.5) < 0.01, name


def test_manifest_records_the_run(tmp_path, calib_text):
    source = make_tiny("opt", tmp_path / "dense")
    report = prune(str(source), tmp_path / "pruned", config_for(calib_text), progress=False)
    data = json.loads((tmp_path / "pruned" / "sparse_deploy.json").read_text())
    assert data["method"] == "sparsegpt" and data["sparsity"] == 0.5 and data["pattern"] is None
    assert data["calibration"] == {"source": str(calib_text), "nsamples": 4, "seqlen": 32, "seed": 0}
    assert len(data["time_per_layer_s"]) == 2 and data["peak_rss_bytes"] > 10_000_000
    assert all(0.0 <= layer["rel_error"] < 1.0 for layer in data["layers"])
    assert data["totals"]["sparsity"] == pytest.approx(0.5, abs=0.001)
    assert report.manifest == read_manifest(tmp_path / "pruned")
    assert (tmp_path / "pruned" / "tokenizer.json").exists()


def test_rel_error_matches_a_direct_measurement(tmp_path, calib_text):
    """The manifest's error for the first layer's q_proj equals ‖(W − Ŵ)Xᵀ‖²/‖WXᵀ‖² measured on its inputs."""
    source = make_tiny("opt", tmp_path / "dense")
    config = config_for(calib_text)
    prune(str(source), tmp_path / "pruned", config, progress=False)
    dense = AutoModelForCausalLM.from_pretrained(source)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    from sparse_deploy.data.calibration import calibration_windows
    from transformers import AutoTokenizer

    windows = calibration_windows(AutoTokenizer.from_pretrained(source), config.calibration, 32)
    inputs = []
    layer = dense.model.decoder.layers[0].self_attn.q_proj
    handle = layer.register_forward_hook(lambda m, i, o: inputs.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        dense(input_ids=windows)
    handle.remove()
    X = torch.cat(inputs)
    W, W_hat = layer.weight.detach(), pruned.model.decoder.layers[0].self_attn.q_proj.weight.detach()
    measured = float(((W - W_hat) @ X.T).square().sum() / (W @ X.T).square().sum())
    recorded = read_manifest(tmp_path / "pruned").layer("model.decoder.layers.0.self_attn.q_proj").rel_error
    assert recorded == pytest.approx(measured, rel=0.02)


def test_true_sequential_and_skip(tmp_path, calib_text):
    source = make_tiny("opt", tmp_path / "dense")
    plain = prune(str(source), tmp_path / "plain", config_for(calib_text), progress=False).manifest
    seq = prune(str(source), tmp_path / "seq", config_for(calib_text, true_sequential=True,
                                                          skip=r"layers\.1\.fc2$"), progress=False).manifest
    assert seq.solver["true_sequential"] and seq.solver["skipped"] == ["model.decoder.layers.1.fc2"]
    assert seq.layer("model.decoder.layers.1.fc2") is None and len(seq.layers) == len(plain.layers) - 1
    # attention-input errors agree (same inputs); the out_proj saw inputs recomputed after q/k/v were pruned
    assert seq.layer("model.decoder.layers.0.self_attn.q_proj").rel_error == pytest.approx(
        plain.layer("model.decoder.layers.0.self_attn.q_proj").rel_error, rel=1e-4)
    assert seq.layer("model.decoder.layers.0.self_attn.out_proj").rel_error != pytest.approx(
        plain.layer("model.decoder.layers.0.self_attn.out_proj").rel_error, rel=1e-4)
    weights = linear_weights(tmp_path / "seq", "opt")
    assert "model.decoder.layers.1.fc2" not in weights
    dense_fc2 = AutoModelForCausalLM.from_pretrained(tmp_path / "seq").model.decoder.layers[1].fc2.weight
    assert float((dense_fc2 == 0).float().mean()) < 0.01


def test_errors_leave_nothing_behind(tmp_path, calib_text):
    source = make_tiny("opt", tmp_path / "dense")
    with pytest.raises(ModelLoadError, match="does not exist"):
        prune(str(tmp_path / "missing"), tmp_path / "out", config_for(calib_text), progress=False)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(CalibrationError, match="fewer than one window"):
        prune(str(source), tmp_path / "out", config_for(short), progress=False)
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        prune(str(source), tmp_path / "out", config_for(calib_text), progress=False)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "out", "short.txt"]


def test_unknown_architecture_lists_supported(tmp_path, calib_text):
    from transformers import T5Config

    T5Config(d_model=32, num_layers=1).save_pretrained(tmp_path / "t5")
    with pytest.raises(UnsupportedModelError, match="supported model types: bert, gpt2"):
        prune(str(tmp_path / "t5"), tmp_path / "out", config_for(calib_text), progress=False)


def test_dataset_name_offline_says_to_pass_a_local_file(tmp_path):
    source = make_tiny("opt", tmp_path / "dense")
    config = PruneConfig(calibration=CalibrationConfig("wikitext2", nsamples=2, seqlen=16))
    with pytest.raises(CalibrationError, match="pass (a local .txt or .jsonl file|--calibration .*valid.txt)"):
        prune(str(source), tmp_path / "out", config, progress=False)
    assert not (tmp_path / "out").exists()


def test_seqlen_beyond_context_is_rejected(tmp_path, calib_text):
    from sparse_deploy.errors import ConfigError

    source = make_tiny("opt", tmp_path / "dense")
    config = PruneConfig(calibration=CalibrationConfig(str(calib_text), nsamples=2, seqlen=4096))
    with pytest.raises(ConfigError, match="context of 128 tokens; pass --seqlen 128 or less"):
        prune(str(source), tmp_path / "out", config, progress=False)


@pytest.mark.gpu
def test_cuda_prune_matches_cpu_prune(tmp_path, calib_text):
    source = make_tiny("opt", tmp_path / "dense")
    cpu = prune(str(source), tmp_path / "cpu", config_for(calib_text), progress=False).manifest
    gpu_config = PruneConfig(spec=SparsitySpec.unstructured(0.5), solver=SolverConfig(device="cuda"),
                             calibration=CalibrationConfig(str(calib_text), nsamples=4, seqlen=32))
    gpu = prune(str(source), tmp_path / "gpu", gpu_config, progress=False).manifest
    assert gpu.solver["device"] == "cuda"
    for name, weight in linear_weights(tmp_path / "gpu", "opt").items():
        assert abs(float((weight == 0).float().mean()) - 0.5) <= 0.005, name
    for a, b in zip(cpu.layers, gpu.layers):
        assert a.rel_error == pytest.approx(b.rel_error, rel=0.1, abs=1e-4), a.name


@pytest.mark.parametrize("bits,group_size,symmetric", [(8, None, True), (4, 32, True), (4, 64, False)])
def test_joint_quantization_checkpoint_holds_grid_values_and_their_scales(tmp_path, calib_text, bits, group_size,
                                                                           symmetric):
    """prune --bits: transformers loads the dequantized weights; the manifest and the sidecar give back, for every
    pruned linear, scales under which every stored weight is an integer of the grid and pruned ones are 0."""
    import numpy as np

    from sparse_deploy import grids
    from sparse_deploy.formats.checkpoint import SCALES_NAME, read_grids
    from sparse_deploy.config import QuantSpec

    source = make_tiny("opt", tmp_path / "dense")
    quant = QuantSpec(bits, group_size, symmetric)
    report = prune(str(source), tmp_path / "pruned", config_for(calib_text, quant=quant), progress=False)
    info = read_manifest(tmp_path / "pruned").quantization
    assert info == report.manifest.quantization
    assert (info["bits"], info["group_size"], info["symmetric"]) == (bits, group_size, symmetric)
    assert info["scales_file"] == SCALES_NAME and (tmp_path / "pruned" / SCALES_NAME).exists()
    found = read_grids(tmp_path / "pruned")
    weights = linear_weights(tmp_path / "pruned", "opt")
    assert set(found) == {f"{name}.weight" for name in weights}
    for name, weight in weights.items():
        grid = found[f"{name}.weight"]
        w = weight.detach().numpy()
        assert float((w == 0).mean()) >= 0.495, name  # pruned, plus kept weights that round to 0
        assert grid.scales.shape == ((w.shape[0],) if bits == 8 else (w.shape[0], -(-w.shape[1] // group_size)))
        assert (grid.zero_points is None) == symmetric
        assert grids.on_grid(w, grid.scales, grid.zero_points, bits=bits, group_size=group_size), name
        q = grids.quantize(w, grid.scales, grid.zero_points, bits=bits, group_size=group_size)
        assert np.array_equal(grids.dequantize(q, grid.scales, grid.zero_points, group_size=group_size), w), name


def test_plain_gptq_keeps_every_weight(tmp_path, calib_text):
    from sparse_deploy.config import QuantSpec

    source = make_tiny("opt", tmp_path / "dense")
    report = prune(str(source), tmp_path / "q", config_for(calib_text, SparsitySpec.unstructured(0.0),
                                                           quant=QuantSpec(4, 32)), progress=False)
    assert report.manifest.totals["pruned_params"] == 0
    assert report.manifest.quantization["bits"] == 4
    assert all(0.0 < layer.rel_error < 0.2 for layer in report.manifest.layers), "4-bit rounding costs something"
