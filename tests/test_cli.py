"""The command line: one-line errors with non-zero exits, nothing half-written, and the happy path."""

from __future__ import annotations

import json
import shutil

import pytest
from tiny_models import make_tiny
from typer.testing import CliRunner

from sparse_deploy.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory):
    return make_tiny("opt", tmp_path_factory.mktemp("tiny") / "opt")


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code: int, text: str):
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and text in lines[0], result.output


@pytest.mark.parametrize(
    "extra,text",
    [
        (["--sparsity", "1.5"], "[0, 1)"),
        (["--pattern", "3:2"], "0 < n < m"),
        (["--pattern", "two:four"], "form n:m"),
        (["--sparsity", "0.5", "--pattern", "2:4"], "not both"),
        (["--method", "obs"], "sparsegpt, wanda or magnitude"),
        (["--skip", "("], "not a valid regular expression"),
        (["--device", "tpu"], "auto, cpu or cuda"),
        (["--pattern", "2:4", "--blocksize", "6"], "multiple of m=4"),
        (["--bits", "3"], "--bits must be 8 or 4"),
        (["--bits", "4", "--group-size", "100"], "32, 64 or 128"),
        (["--bits", "8", "--group-size", "64"], "per output channel"),
        (["--group-size", "64"], "--group-size needs --bits 4"),
        (["--bits", "4", "--method", "magnitude"], "--bits needs --method sparsegpt"),
        (["--bits", "4", "--group-size", "64", "--blocksize", "96"], "divide one another"),
        (["--bits", "8", "--asymmetric"], "--asymmetric applies to --bits 4"),
    ],
)
def test_bad_settings(tiny_opt, tmp_path, extra, text):
    one_line_error(run("prune", tiny_opt, "-o", tmp_path / "out", *extra), 2, text)
    assert not (tmp_path / "out").exists()


def test_missing_model_and_existing_output(tiny_opt, tmp_path, calib_text):
    one_line_error(run("prune", tmp_path / "nope", "-o", tmp_path / "out"), 2, "does not exist")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    one_line_error(run("prune", tiny_opt, "-o", tmp_path / "out", "--calibration", calib_text), 2, "--force")


def test_prune_inspect_eval(tiny_opt, tmp_path, calib_text):
    out = tmp_path / "pruned"
    result = run("prune", tiny_opt, "-o", out, "--pattern", "2:4", "--calibration", calib_text,
                 "--nsamples", 4, "--seqlen", 32, "--device", "cpu", "--json", tmp_path / "prune.json")
    assert result.exit_code == 0, result.output
    assert "pruned 12 linear layers" in result.output and "50.0%" in result.output
    manifest = json.loads((tmp_path / "prune.json").read_text())
    assert manifest == json.loads((out / "sparse_deploy.json").read_text())
    table = run("inspect", out, "--json", tmp_path / "inspect.json")
    assert table.exit_code == 0
    rows = [line for line in table.output.splitlines() if ".fc1.weight" in line]
    assert len(rows) == 2 and all("50.00%" in r and "2:4" in r for r in rows)
    assert "pruned matrices: 12" in table.output
    # the per-layer reconstruction error the manifest stores is shown beside each pruned matrix
    fc1_errors = [layer["rel_error"] for layer in manifest["layers"] if layer["name"].endswith(".fc1")]
    assert all(f"{e:.2e}" in r for e, r in zip(fc1_errors, rows))
    listed = json.loads((tmp_path / "inspect.json").read_text())
    assert sum(w["pruned"] for w in listed["weights"]) == 12
    assert {w["name"]: w["rel_error"] for w in listed["weights"] if w["pruned"]} == {
        layer["name"] + ".weight": layer["rel_error"] for layer in manifest["layers"]}
    report = tmp_path / "ppl.json"
    result = run("eval", out, "--dataset", calib_text, "--seqlen", 32, "--max-chars", 5000, "--json", report,
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["kind"] == "perplexity" and data["perplexity"] > 1 and data["seqlen"] == 32
    assert f"{data['perplexity']:.3f}" in result.output


def test_inspect_and_eval_errors(tmp_path, tiny_opt):
    one_line_error(run("inspect", tmp_path / "nope"), 2, "not a folder")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"not a safetensors file")
    one_line_error(run("inspect", tmp_path / "broken"), 2, "not a readable safetensors file")
    one_line_error(run("eval", tiny_opt, "--dataset", tmp_path / "missing.txt"), 2, "neither a file")
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_opt, truncated)
    (truncated / "model.safetensors").write_bytes((tiny_opt / "model.safetensors").read_bytes()[:50])
    one_line_error(run("prune", truncated, "-o", tmp_path / "out"), 2, "could not load the weights")
    one_line_error(run("eval", truncated, "--dataset", tmp_path / "missing.txt"), 2, "could not load the weights")


def test_help_explains_options():
    result = run("prune", "--help")
    assert result.exit_code == 0
    for option in ("--pattern", "--calibration", "--true-sequential", "--skip", "--force"):
        assert option in result.output


def test_settings_that_would_waste_a_run_are_refused(tiny_opt, tmp_path, calib_text):
    one_line_error(run("prune", tiny_opt, "-o", tmp_path / "out", "--calibration", calib_text, "--nsamples", 2,
                       "--seqlen", 16, "--skip", ".*"), 2, "matches all 12 linear layers")
    (tmp_path / "file.txt").write_text("x")
    one_line_error(run("prune", tiny_opt, "-o", tmp_path / "file.txt" / "out"), 2, "is not a folder")
    one_line_error(run("eval", tiny_opt, "--dataset", calib_text, "--json", tmp_path / "missing" / "x.json"), 2,
                   "does not exist")
    one_line_error(run("eval", tiny_opt, "--dataset", calib_text, "--reference", tiny_opt), 2,
                   "--reference applies to encoders")
    one_line_error(run("bench", tiny_opt, "--new-tokens", 1), 2, "new-tokens must be >= 2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_prune_with_bits_reports_the_grid_and_help_explains_it(tiny_opt, tmp_path, calib_text):
    out = tmp_path / "q"
    result = run("prune", tiny_opt, "-o", out, "--sparsity", 0, "--bits", 4, "--group-size", 32, "--calibration",
                 calib_text, "--nsamples", 4, "--seqlen", 32, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "int4 group 32" in result.output and "warning" not in result.output, "--sparsity 0 with --bits is GPTQ"
    assert json.loads((out / "sparse_deploy.json").read_text())["quantization"]["group_size"] == 32
    text = " ".join(run("prune", "--help").output.split())
    assert "--bits" in text and "GPTQ" in text and "--group-size" in text and "--asymmetric" in text
