"""Bad inputs, one case per test: each exits non-zero with one line and no traceback, leaves nothing behind and
never touches the input. Also: no foreign code runs without --trust-remote-code, and no wrong number is printed
with exit 0."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import make_tiny
from typer.testing import CliRunner

from sparse_deploy.cli import app
from sparse_deploy.io import remove_stale_stages, staged_output

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny OPT model folder; tests must not change it (``fingerprint`` checks that)."""
    return make_tiny("opt", tmp_path_factory.mktemp("bad") / "opt")


def fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, text: str, code: int | None = None) -> str:
    """Exit non-zero, one line starting with ``error:`` that holds ``text``, and no traceback."""
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line.split("\r")[-1] for line in result.output.split("\n")]  # a cleared progress bar ends with \r
    lines = [line for line in lines if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and text in lines[0], result.output
    assert "Traceback" not in result.output
    return lines[0]


# --- 1. --force never destroys an input ---------------------------------------------------------------------

def test_prune_onto_its_own_input_is_refused(tiny):
    before = fingerprint(tiny)
    one_line_error(run("prune", tiny, "-o", tiny, "--force"), "is the input", 2)
    assert fingerprint(tiny) == before


def test_prune_onto_a_folder_holding_the_input_is_refused(tiny):
    before = fingerprint(tiny)
    one_line_error(run("prune", tiny, "-o", tiny.parent, "--force"), "or holds it", 2)
    assert fingerprint(tiny) == before


def test_export_onto_the_parent_of_its_input_is_refused(tiny):
    before = fingerprint(tiny)
    one_line_error(run("export", tiny, "-o", tiny.parent, "--force"), "or holds it", 2)
    assert fingerprint(tiny) == before


def test_output_inside_the_input_is_refused(tiny):
    one_line_error(run("export", tiny, "-o", tiny / "onnx"), "lies inside the input", 2)
    assert not (tiny / "onnx").exists()


def test_output_reaching_the_input_through_a_symlink_is_refused(tiny, tmp_path):
    before = fingerprint(tiny)
    (tmp_path / "link").symlink_to(tiny, target_is_directory=True)
    one_line_error(run("prune", tiny, "-o", tmp_path / "link", "--force"), "is the input", 2)
    assert fingerprint(tiny) == before


def test_force_replaces_only_folders_sparse_deploy_wrote(tiny, tmp_path):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"\xff\xd8")
    one_line_error(run("prune", tiny, "-o", mine, "--force"), "not written by sparse-deploy", 2)
    assert [p.name for p in mine.iterdir()] == ["holiday.jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


# --- 2. no stale stages ----------------------------------------------------------------------------------------

_STAGE_AND_HANG = """
import sys, time
from sparse_deploy.io import staged_output
with staged_output(sys.argv[1]) as stage:
    (stage / "half.bin").write_bytes(b"x" * 1000)
    print(stage.name, flush=True)
    time.sleep(60)
"""


def test_a_killed_run_leaves_a_recognisable_stage_that_the_next_run_removes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _STAGE_AND_HANG, str(tmp_path / "out")], stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        name = proc.stdout.readline().strip()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    assert name.startswith(f".out.sparse-deploy-partial-{proc.pid}-"), name
    assert [p.name for p in tmp_path.iterdir()] == [name], "SIGKILL leaves the stage"
    live = tmp_path / f".other.sparse-deploy-partial-{os.getpid()}-abc"
    live.mkdir()  # a running process's stage is never touched
    with staged_output(tmp_path / "next") as stage:
        (stage / "ok").write_text("ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "next"])
    assert remove_stale_stages(tmp_path) == []


# --- 3. no foreign code -----------------------------------------------------------------------------------------

_REMOTE_CONFIG = """
from pathlib import Path
Path(__file__).with_name("RAN").write_text("configuration_x.py ran")
from transformers import PretrainedConfig
class XConfig(PretrainedConfig):
    model_type = "xcustom"
"""


@pytest.fixture()
def remote_code_model(tiny, tmp_path):
    """A model folder whose config names its own code (auto_map); importing that code writes ``RAN``."""
    import json
    import shutil

    folder = tmp_path / "remote"
    shutil.copytree(tiny, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="xcustom", auto_map={"AutoConfig": "configuration_x.XConfig",
                                                  "AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_x.py").write_text(_REMOTE_CONFIG)
    (folder / "modeling_x.py").write_text("from .configuration_x import XConfig\n")
    return folder


@pytest.mark.parametrize("command", [["prune", "-o", "{out}"], ["export", "-o", "{out}"], ["eval"]])
def test_remote_code_never_runs_without_the_flag(remote_code_model, tmp_path, command, calib_text):
    args = [a.format(out=tmp_path / "out") for a in command]
    extra = ["--calibration", calib_text] if command[0] == "prune" else (
        ["--dataset", calib_text] if command[0] == "eval" else [])
    one_line_error(run(args[0], remote_code_model, *args[1:], *extra), "--trust-remote-code", 2)
    assert not (remote_code_model / "RAN").exists() and not (tmp_path / "out").exists()


def test_remote_code_files_travel_only_when_trusted_and_named(remote_code_model, tmp_path):
    from sparse_deploy.hf import copy_side_files

    (remote_code_model / "unrelated.py").write_text("raise SystemExit")
    for trusted, expected in ((False, set()), (True, {"configuration_x.py", "modeling_x.py"})):
        target = tmp_path / f"copy-{trusted}"
        target.mkdir()
        copy_side_files(str(remote_code_model), target, trust_remote_code=trusted)
        assert {p.name for p in target.glob("*.py")} == expected


def test_inspect_refuses_a_pickle_that_would_run_code(tmp_path):
    import pickle

    folder = tmp_path / "pickled"
    folder.mkdir()

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'RAN'}",))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Payload()}))
    one_line_error(run("inspect", folder), "convert it to safetensors", 2)
    assert not (tmp_path / "RAN").exists()


# --- 4. no wrong answer with exit 0 ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nan_model(tiny, tmp_path_factory):
    """The tiny model with one NaN in its first MLP weight."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("nan") / "opt"
    model = AutoModelForCausalLM.from_pretrained(tiny)
    with torch.no_grad():
        model.model.decoder.layers[0].fc1.weight[3, 5] = float("nan")
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        if (tiny / name).exists():
            (folder / name).write_bytes((tiny / name).read_bytes())
    return folder


@pytest.mark.parametrize("command", ["prune", "export", "eval", "inspect"])
def test_a_nan_weight_is_named_on_load(nan_model, tmp_path, calib_text, command):
    extra = {"prune": ["-o", tmp_path / "out", "--calibration", calib_text, "--nsamples", 2, "--seqlen", 16],
             "export": ["-o", tmp_path / "out"], "eval": ["--dataset", calib_text], "inspect": []}[command]
    one_line_error(run(command, nan_model, *extra), "layers.0.fc1.weight holds 1 NaN or infinite", 2)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    from sparse_deploy.config import ExportConfig
    from sparse_deploy.exporting import export

    return export(tiny, tmp_path_factory.mktemp("exp") / "onnx", ExportConfig(encoding="dense")).output


def _copy(folder: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(folder, target)
    return target


def test_export_records_sha256_and_a_damaged_model_is_refused(exported, tmp_path):
    import json

    info = json.loads((exported / "export.json").read_text())
    from sparse_deploy.integrity import sha256_file

    assert info["sha256"] == {"model.onnx": sha256_file(exported / "model.onnx")}
    damaged = _copy(exported, tmp_path / "damaged")
    data = bytearray((damaged / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a weight: loads fine, answers wrong
    (damaged / "model.onnx").write_bytes(bytes(data))
    for args in (["generate", damaged, "Hello"], ["eval", damaged, "--dataset", exported / "config.json"],
                 ["bench", damaged, "--runs", 1, "--new-tokens", 2, "--prompt-len", 4]):
        one_line_error(run(*args), "does not match the sha256 in export.json", 2)
    assert run("generate", damaged, "Hello", "--max-new-tokens", 2, "--no-verify").exit_code == 0


def test_nan_logits_are_an_error_not_a_perplexity_or_text(exported, tmp_path, calib_text):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    broken = _copy(exported, tmp_path / "broken")
    model = onnx.load(str(broken / "model.onnx"))
    init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))  # the embedding / LM head
    values = numpy_helper.to_array(init).copy()
    values[...] = np.nan
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    onnx.save(model, str(broken / "model.onnx"))
    one_line_error(run("eval", broken, "--dataset", calib_text, "--seqlen", 32, "--max-chars", 3000, "--no-verify"),
                   "not a finite number", 1)
    one_line_error(run("generate", broken, "Hello", "--no-verify"), "NaN or infinite logits", 1)


def test_bench_refuses_a_baseline_of_another_model(exported, tmp_path):
    import json

    other = _copy(exported, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] = 50272
    (other / "config.json").write_text(json.dumps(config))
    one_line_error(run("bench", exported, "--baseline", other, "--runs", 1), "--allow-mismatch", 2)


def test_sparsity_is_never_rounded_to_a_whole_model(tiny, tmp_path, calib_text):
    from sparse_deploy.cli import percent
    from sparse_deploy.config import SparsitySpec

    assert percent(0.9995) == "99.95%" and percent(0.5) == "50.0%" and percent(1.0) == "100.0%"
    assert percent(1e-5, 2) == "0.001%" and percent(0.0) == "0.0%"
    assert str(SparsitySpec(sparsity=0.999)) == "99.9%"
    result = run("prune", tiny, "-o", tmp_path / "out", "--sparsity", 0, "--calibration", calib_text,
                 "--nsamples", 2, "--seqlen", 16, "--method", "magnitude", "--device", "cpu")
    assert result.exit_code == 0 and "warning: --sparsity 0 prunes nothing" in result.output, result.output


# --- 5. one-line errors, also for malformed flags --------------------------------------------------------------

@pytest.mark.parametrize("args,text", [
    (["prune", "m", "-o", "out", "--sparsity", "abc"], "--sparsity"),
    (["export", "m", "-o", "out", "--encoding", "zstd"], "'zstd' is not one of"),
    (["export", "m", "-o", "out", "--opset", "99"], "from 14 to"),
    (["frobnicate"], "No such command"),
])
def test_malformed_flags_give_one_line(args, text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(run(*args), text, 2)
    assert list(tmp_path.iterdir()) == []


def test_help_keeps_its_defaults_and_version_is_a_plain_flag():
    prune_help = run("prune", "--help").output
    assert "[default: 0.5]" in " ".join(prune_help.split()) and "<bool>" not in prune_help
    assert "[default: False]" not in run("--help").output


def test_calibration_that_cannot_fit_in_memory_is_refused_up_front(tiny, tmp_path, calib_text):
    line = one_line_error(run("prune", tiny, "-o", tmp_path / "out", "--nsamples", 10**9, "--seqlen", 64,
                              "--calibration", calib_text, "--device", "cpu"), "lower --nsamples to", 2)
    assert "GiB" in line and not (tmp_path / "out").exists()


def test_a_window_longer_than_the_context_names_the_limit(tiny, exported, calib_text):
    for folder in (tiny, exported):
        one_line_error(run("eval", folder, "--dataset", calib_text, "--seqlen", 4096), "pass --seqlen 128 or less", 2)


# --- 6. offline datasets ------------------------------------------------------------------------------------

def test_offline_dataset_names_use_a_local_copy_or_say_where_to_put_one(tmp_path, monkeypatch):
    from sparse_deploy.data.text import load_text
    from sparse_deploy.errors import CalibrationError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text(" = Title = \n\n Some text . \n")
    monkeypatch.setenv("SPARSE_DEPLOY_DATA", str(tmp_path))
    assert "Some text" in load_text("wikitext2", "test")
    with pytest.raises(CalibrationError, match="SPARSE_DEPLOY_DATA"):
        load_text("wikitext2", "train")


def test_export_and_generate_write_json(tiny, tmp_path):
    import json

    out = tmp_path / "onnx"
    result = run("export", tiny, "-o", out, "--encoding", "dense", "--json", tmp_path / "export.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "export.json").read_text()) == json.loads((out / "export.json").read_text())
    assert "MiB" in result.output and "warning" not in result.output
    result = run("generate", out, "Hello", "--new-tokens", 3, "--json", tmp_path / "gen.json")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "gen.json").read_text())
    assert data["prompt"] == "Hello" and data["new_tokens"] == 3
    assert data["continuation"] and "Hello" + data["continuation"] in result.output
    one_line_error(run("generate", out, "Hello", "--json", tmp_path / "missing" / "gen.json"), "does not exist", 2)


def test_export_warns_when_top1_agreement_is_low(tiny, tmp_path, monkeypatch):
    import dataclasses

    import sparse_deploy.exporting as export_package

    real_export = export_package.export

    def disagreeing_export(*args, **kwargs):
        report = real_export(*args, **kwargs)
        return dataclasses.replace(report, parity=dataclasses.replace(report.parity, top1_agreement=0.8))

    monkeypatch.setattr(export_package, "export", disagreeing_export)
    result = run("export", tiny, "-o", tmp_path / "onnx", "--encoding", "dense")
    assert result.exit_code == 0, result.output
    assert "top-1 agreement 80.0%" in result.output
    assert "warning: the export's next-token choice differs from torch at 20.0% of positions" in result.output


def test_bench_torch_baseline_never_runs_remote_code_without_the_flag(remote_code_model, exported):
    result = run("bench", exported, "--torch-baseline", remote_code_model, "--allow-mismatch", "--runs", 1,
                 "--new-tokens", 2, "--prompt-len", 4)
    one_line_error(result, "--trust-remote-code", 2)
    assert not (remote_code_model / "RAN").exists()
    assert "--trust-remote-code" in run("bench", "--help").output
