"""export --quantize of a checkpoint pruned with --bits: the ONNX file holds the solver's integers and scales
(no second rounding), and weights that left the solver's grid are refused."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from safetensors.numpy import load_file, save_file
from tiny_models import make_tiny

from sparse_deploy import ExportConfig, export, grids
from sparse_deploy.api import prune
from sparse_deploy.formats.checkpoint import read_grids
from sparse_deploy.config import CalibrationConfig, PruneConfig, QuantSpec, SolverConfig, SparsitySpec
from sparse_deploy.errors import ExportError
from sparse_deploy.exporting.quantize import INT4_SUFFIX, unpack_int4
from sparse_deploy.exporting.sparse_encoding import read_packed


def pruned(folder, calib, quant):
    source = make_tiny("opt", folder / "dense")
    config = PruneConfig(spec=SparsitySpec.unstructured(0.5), quant=quant, solver=SolverConfig(device="cpu"),
                         calibration=CalibrationConfig(str(calib), nsamples=4, seqlen=32))
    prune(str(source), folder / "pruned", config, progress=False)
    return folder / "pruned"


@pytest.fixture(scope="module")
def int8_checkpoint(tmp_path_factory, calib_text):
    return pruned(tmp_path_factory.mktemp("q8"), calib_text, QuantSpec(8, None))


def test_int8_export_writes_the_solver_integers_and_scales(int8_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    report = export(int8_checkpoint, tmp_path / "onnx", ExportConfig(quantize="int8"))
    model = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("_scale")}
    params = dict(AutoModelForCausalLM.from_pretrained(int8_checkpoint).named_parameters())
    solver = read_grids(int8_checkpoint)
    checked = 0
    for name, source in report.sources.items():
        param = source.split(" ")[0]
        if not name.endswith("_quantized") or param not in solver:
            continue
        W = params[param].detach().numpy()  # [out, in]
        scales = solver[param].scales
        assert np.array_equal(inits[name[: -len("_quantized")] + "_scale"], scales), "the solver's scales"
        q = read_packed(model, name) if any(r.name == name for r in report.encoded) else None
        if q is None:
            q = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))
        assert np.array_equal(q.T, grids.quantize(W, scales, bits=8)), "the solver's integers"
        assert np.array_equal(grids.dequantize(q.T, scales), W), "dequantizing gives the checkpoint back exactly"
        checked += 1
    assert checked == len(solver) == 12
    assert report.parity.rel_diff < 0.1


def test_off_grid_weights_and_the_wrong_quantization_are_refused(int8_checkpoint, tmp_path, calib_text):
    damaged = tmp_path / "damaged"
    shutil.copytree(int8_checkpoint, damaged)
    tensors = load_file(str(damaged / "model.safetensors"))
    key = "model.decoder.layers.0.fc1.weight"
    w = tensors[key].copy()
    kept = np.flatnonzero(w)
    w.flat[kept[0]] *= 1.37  # off the grid
    tensors[key] = w
    save_file(tensors, str(damaged / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ExportError, match="off the solver's int8 grid"):
        export(damaged, tmp_path / "out", ExportConfig(quantize="int8"))
    assert not (tmp_path / "out").exists()
    int4 = pruned(tmp_path / "q4", calib_text, QuantSpec(4, 32))
    with pytest.raises(ExportError, match="--quantize int4"):
        export(int4, tmp_path / "out4", ExportConfig(quantize="int8"))
    with pytest.raises(ExportError, match="--group-size 32"):
        export(int4, tmp_path / "out4", ExportConfig(quantize="int4", group_size=64))
    asym = pruned(tmp_path / "q4a", calib_text, QuantSpec(4, 32, symmetric=False))
    with pytest.raises(ExportError, match="--symmetric"):
        export(asym, tmp_path / "out4", ExportConfig(quantize="int4", group_size=32))
    assert not (tmp_path / "out4").exists()


def test_int4_export_writes_the_solver_nibbles_and_scales(tmp_path, calib_text):
    from transformers import AutoModelForCausalLM

    checkpoint = pruned(tmp_path, calib_text, QuantSpec(4, 32))
    report = export(checkpoint, tmp_path / "onnx", ExportConfig(quantize="int4", group_size=32))
    model = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    params = dict(AutoModelForCausalLM.from_pretrained(checkpoint).named_parameters())
    solver = read_grids(checkpoint)
    checked = 0
    for name, source in report.sources.items():
        param = source.split(" ")[0]
        if not name.endswith(INT4_SUFFIX) or param not in solver:
            continue
        W = params[param].detach().numpy()  # [out, in]
        base = name[: -len(INT4_SUFFIX)]
        packed = read_packed(model, name) if any(r.name == name for r in report.encoded) else \
            numpy_helper.to_array(inits[name])
        scales = numpy_helper.to_array(inits[base + "_scales"])
        assert np.array_equal(scales, solver[param].scales.reshape(-1)), "the solver's scales"
        assert np.array_equal(unpack_int4(packed, scales, W.shape[1]).T, W), "the solver's integers, exactly"
        checked += 1
    assert checked == len(solver) == 12
