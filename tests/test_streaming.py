"""Streaming prune: block by block from sharded safetensors, resumable; bit-identical to the in-memory prune."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import TINY_CONFIGS, tokenizer_source
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from sparse_deploy.adapters import REGISTRY
from sparse_deploy.api import prune
from sparse_deploy.config import (CalibrationConfig, PruneConfig, QuantSpec, SolverConfig, SparsitySpec,
                                  parse_size)
from sparse_deploy.errors import ConfigError, ModelLoadError, OutputExistsError, PruneInterrupted
from sparse_deploy.io import resumable_stage_path
from sparse_deploy.pruning.streaming import read_progress

ROOT = Path(__file__).resolve().parents[1]


def make_sharded(model_type: str, folder: Path, layers: int = 2, seed: int = 0, **overrides) -> Path:
    """A tiny model saved in several safetensors shards (a block spans one or two of them)."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[model_type]()
    config.num_hidden_layers = layers
    for key, value in overrides.items():
        setattr(config, key, value)
    auto = AutoModel if model_type == "bert" else AutoModelForCausalLM
    auto.from_config(config).save_pretrained(folder, max_shard_size="300KB")
    AutoTokenizer.from_pretrained(tokenizer_source(model_type)).save_pretrained(folder)
    return folder


def config_for(calib, **kwargs) -> PruneConfig:
    return PruneConfig(spec=SparsitySpec.unstructured(0.5), calibration=CalibrationConfig(str(calib), nsamples=4,
                                                                                         seqlen=32),
                       solver=SolverConfig(device="cpu"), **kwargs)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def assert_identical(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb)
    for key in ta:
        assert ta[key].dtype == tb[key].dtype, key
        assert torch.equal(ta[key], tb[key]), key


@pytest.mark.parametrize("model_type", sorted(REGISTRY))
def test_streaming_equals_in_memory_for_every_architecture(model_type, tmp_path, calib_text):
    source = make_sharded(model_type, tmp_path / "dense")
    assert len(list(source.glob("*.safetensors"))) > 1, "the fixture must be sharded"
    streamed = prune(source, tmp_path / "stream", config_for(calib_text), progress=False)
    whole = prune(source, tmp_path / "whole", config_for(calib_text, stream=False), progress=False)
    assert_identical(tmp_path / "stream", tmp_path / "whole")
    assert [r.rel_error for r in streamed.manifest.layers] == [r.rel_error for r in whole.manifest.layers]
    assert [p.name for p in (tmp_path / "stream").glob("*.safetensors")] == ["model.safetensors"], \
        "a small checkpoint ends as one file, as save_pretrained writes it"
    assert streamed.manifest.extra["streaming"]["resumed_from_block"] is None
    assert not resumable_stage_path(tmp_path / "stream").exists()
    auto = AutoModel if model_type == "bert" else AutoModelForCausalLM
    auto.from_pretrained(tmp_path / "stream")  # plain transformers loads it


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_and_tied_embeddings(dtype, tmp_path, calib_text):
    """OPT ties lm_head to the embeddings: the output leaves the copy out, as save_pretrained does; the
    pruned blocks come back in the model's own dtype, equal to the in-memory result."""
    torch.manual_seed(0)
    config = TINY_CONFIGS["opt"]()
    assert config.tie_word_embeddings
    AutoModelForCausalLM.from_config(config).to(dtype).save_pretrained(tmp_path / "dense", max_shard_size="200KB")
    AutoTokenizer.from_pretrained(tokenizer_source("opt")).save_pretrained(tmp_path / "dense")
    prune(tmp_path / "dense", tmp_path / "stream", config_for(calib_text), progress=False)
    prune(tmp_path / "dense", tmp_path / "whole", config_for(calib_text, stream=False), progress=False)
    assert_identical(tmp_path / "stream", tmp_path / "whole")
    out = tensors(tmp_path / "stream")
    assert "lm_head.weight" not in out and out["model.decoder.layers.0.fc1.weight"].dtype == dtype


def test_large_checkpoints_stay_sharded_with_an_index(tmp_path, calib_text, monkeypatch):
    import sparse_deploy.pruning.streaming as streaming

    monkeypatch.setattr(streaming, "SINGLE_FILE_MAX_BYTES", 0)
    source = make_sharded("gpt_neox", tmp_path / "dense", layers=3)
    prune(source, tmp_path / "stream", config_for(calib_text), progress=False)
    prune(source, tmp_path / "whole", config_for(calib_text, stream=False), progress=False)
    assert_identical(tmp_path / "stream", tmp_path / "whole")
    index = json.loads((tmp_path / "stream" / "model.safetensors.index.json").read_text())
    shards = {p.name for p in (tmp_path / "stream").glob("*.safetensors")}
    assert set(index["weight_map"].values()) == shards and len(shards) == 4
    assert "embed_out.weight" in index["weight_map"], "names as save_pretrained writes them"
    AutoModelForCausalLM.from_pretrained(tmp_path / "stream")


def test_activations_on_disk_give_the_same_result(tmp_path, calib_text):
    source = make_sharded("llama", tmp_path / "dense", layers=3)
    report = prune(source, tmp_path / "disk", config_for(calib_text, max_memory=1024), progress=False)
    assert report.manifest.extra["streaming"]["activations"] == "disk"
    prune(source, tmp_path / "ram", config_for(calib_text), progress=False)
    assert_identical(tmp_path / "disk", tmp_path / "ram")


_CRASH = textwrap.dedent("""
    import os, signal, sys
    from sparse_deploy.api import prune
    from sparse_deploy.config import CalibrationConfig, PruneConfig, SolverConfig, SparsitySpec
    import sparse_deploy.pruning.streaming as streaming

    source, output, calib, after, max_memory = sys.argv[1:6]
    original = streaming._write_json

    def write_then_die(path, data):  # SIGKILL right after block `after` is recorded
        original(path, data)
        if path.name == "progress.json" and data["next_block"] == int(after):
            os.kill(os.getpid(), signal.SIGKILL)

    streaming._write_json = write_then_die
    prune(source, output, PruneConfig(spec=SparsitySpec.unstructured(0.5), solver=SolverConfig(device="cpu"),
          calibration=CalibrationConfig(calib, nsamples=4, seqlen=32),
          max_memory=int(max_memory) if max_memory != "none" else None), progress=False)
""")


@pytest.mark.parametrize("max_memory", ["none", "1024"])
def test_resume_after_sigkill_is_bit_identical(max_memory, tmp_path, calib_text):
    source = make_sharded("llama", tmp_path / "dense", layers=4)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _CRASH, str(source), str(out), str(calib_text), "2", max_memory],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    stage = resumable_stage_path(out)
    assert not out.exists() and read_progress(stage).next_block == 2
    config = config_for(calib_text, max_memory=None if max_memory == "none" else int(max_memory))
    resumed = prune(source, out, replace(config, resume=True), progress=False)
    assert resumed.manifest.extra["streaming"]["resumed_from_block"] == 2
    assert len(resumed.manifest.time_per_layer_s) == 4 and len(resumed.manifest.layers) == 4 * 7
    prune(source, tmp_path / "straight", config, progress=False)
    assert_identical(out, tmp_path / "straight")
    assert not stage.exists() and not (out / ".resume").exists()


def test_a_kill_after_the_last_block_finishes_on_rerun(tmp_path, calib_text):
    source = make_sharded("bert", tmp_path / "dense", layers=2)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _CRASH, str(source), str(out), str(calib_text), "2", "none"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    report = prune(source, out, config_for(calib_text), progress=False)
    assert report.manifest.extra["streaming"]["resumed_from_block"] == 2 and len(report.manifest.layers) == 2 * 6
    prune(source, tmp_path / "whole", config_for(calib_text, stream=False), progress=False)
    assert_identical(out, tmp_path / "whole")


def test_rerun_with_other_settings_refuses_to_resume(tmp_path, calib_text):
    source = make_sharded("opt", tmp_path / "dense", layers=3)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _CRASH, str(source), str(out), str(calib_text), "1", "none"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    other = replace(config_for(calib_text), spec=SparsitySpec.unstructured(0.6))
    with pytest.raises(ConfigError, match="other settings.*delete that folder"):
        prune(source, out, other, progress=False)
    assert read_progress(resumable_stage_path(out)).next_block == 1, "a refused resume keeps the stage"
    # the same settings (no --resume) continue it
    report = prune(source, out, config_for(calib_text), progress=False)
    assert report.manifest.extra["streaming"]["resumed_from_block"] == 1


def test_ctrl_c_keeps_a_resumable_stage_and_says_how_to_continue(tmp_path, calib_text, monkeypatch):
    import sparse_deploy.pruning.streaming as streaming

    source = make_sharded("gpt2", tmp_path / "dense", layers=3)
    original = streaming._write_json

    def interrupt_after_first_block(path, data):
        original(path, data)
        if path.name == "progress.json" and data["next_block"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(streaming, "_write_json", interrupt_after_first_block)
    with pytest.raises(PruneInterrupted, match="after 1 of 3 blocks.*run the same command again.*delete"):
        prune(source, tmp_path / "out", config_for(calib_text), progress=False)
    monkeypatch.undo()
    assert read_progress(resumable_stage_path(tmp_path / "out")).next_block == 1
    report = prune(source, tmp_path / "out", config_for(calib_text), progress=False)
    assert report.manifest.extra["streaming"]["resumed_from_block"] == 1
    prune(source, tmp_path / "whole", config_for(calib_text, stream=False), progress=False)
    assert_identical(tmp_path / "out", tmp_path / "whole")


def test_joint_quantization_streams_and_resumes_to_the_same_grid(tmp_path, calib_text, monkeypatch):
    import sparse_deploy.pruning.streaming as streaming

    source = make_sharded("llama", tmp_path / "dense", layers=3)
    config = config_for(calib_text, quant=QuantSpec.from_options(4, 32, True))
    original = streaming._write_json

    def interrupt(path, data):
        original(path, data)
        if path.name == "progress.json" and data["next_block"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(streaming, "_write_json", interrupt)
    with pytest.raises(PruneInterrupted):
        prune(source, tmp_path / "stream", config, progress=False)
    monkeypatch.undo()
    streamed = prune(source, tmp_path / "stream", config, progress=False)
    whole = prune(source, tmp_path / "whole", replace(config, stream=False), progress=False)
    assert_identical(tmp_path / "stream", tmp_path / "whole")
    a = load_file(str(tmp_path / "stream" / "quant_scales.safetensors"))
    b = load_file(str(tmp_path / "whole" / "quant_scales.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert streamed.manifest.quantization == whole.manifest.quantization


def test_resume_without_a_stage_is_an_error(tmp_path, calib_text):
    source = make_sharded("opt", tmp_path / "dense")
    with pytest.raises(ConfigError, match="no unfinished run"):
        prune(source, tmp_path / "out", config_for(calib_text, resume=True), progress=False)


def test_pickle_only_models_need_opt_in(tmp_path, calib_text):
    torch.manual_seed(0)
    folder = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS["opt"]())
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(tokenizer_source("opt")).save_pretrained(folder)
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        prune(folder, tmp_path / "out", config_for(calib_text), progress=False)
    prune(folder, tmp_path / "out", config_for(calib_text, allow_pickle=True), progress=False)
    assert (tmp_path / "out" / "sparse_deploy.json").exists()


def test_a_locked_stage_is_refused(tmp_path, calib_text):
    import fcntl

    source = make_sharded("opt", tmp_path / "dense")
    stage = resumable_stage_path(tmp_path / "out")
    stage.mkdir()
    with open(stage / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        with pytest.raises(OutputExistsError, match="another run"):
            prune(source, tmp_path / "out", config_for(calib_text), progress=False)
    assert stage.exists()


def test_prune_options_are_validated():
    assert parse_size("8GiB") == 8 * 2**30 and parse_size("4GB") == 4 * 10**9 and parse_size("512M") == 512 * 2**20
    with pytest.raises(ConfigError, match="not a size"):
        parse_size("lots")
    with pytest.raises(ConfigError, match="max_memory"):
        PruneConfig(max_memory=0)
    with pytest.raises(ConfigError, match="--resume"):
        PruneConfig(resume=True, stream=False)


@pytest.mark.gpu
def test_streaming_on_cuda_matches_in_memory(tmp_path, calib_text):
    source = make_sharded("llama", tmp_path / "dense")
    gpu = PruneConfig(spec=SparsitySpec.unstructured(0.5), calibration=CalibrationConfig(str(calib_text), nsamples=4,
                                                                                        seqlen=32),
                      solver=SolverConfig(device="cuda"))
    prune(source, tmp_path / "stream", gpu, progress=False)
    prune(source, tmp_path / "whole", replace(gpu, stream=False), progress=False)
    assert_identical(tmp_path / "stream", tmp_path / "whole")


def test_every_method_a_config_accepts_is_registered():
    from typing import get_args

    from sparse_deploy.config import Method
    from sparse_deploy.pruning.methods import METHODS, method

    assert set(METHODS) == set(get_args(Method))
    with pytest.raises(ConfigError, match="method must be one of"):
        method("obc")


def test_output_files_are_ordinary_files(tmp_path, calib_text):
    source = make_sharded("opt", tmp_path / "dense")
    prune(source, tmp_path / "out", config_for(calib_text), progress=False)
    umask = os.umask(0)
    os.umask(umask)
    for shard in (tmp_path / "out").glob("*.safetensors"):
        assert shard.stat().st_mode & 0o777 == 0o666 & ~umask, shard.name
