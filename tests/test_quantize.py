"""Quantization grids (sparse_deploy.grids) and the int8 graph, checked in numpy; no model export here."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sparse_deploy import grids
from sparse_deploy.exporting.quantize import QUANT_SUFFIX, quantize_int8

INT16_MIN, INT16_MAX = -32768, 32767


def u8s8_avx2(xq: np.ndarray, q: np.ndarray) -> np.ndarray:
    """x [K] uint8 · q [K, N] int8 as AVX2 without VNNI computes it (vpmaddubsw then vpmaddwd): the products of
    neighbouring k pairs are added into an int16 that saturates, then the pair sums are added exactly in int32."""
    k = xq.shape[0]
    products = xq.astype(np.int32)[:, None] * q.astype(np.int32)  # [K, N]
    if k % 2:
        products = np.concatenate([products, np.zeros((1, q.shape[1]), np.int32)])
    pairs = np.clip(products[0::2] + products[1::2], INT16_MIN, INT16_MAX)  # vpmaddubsw's saturating int16
    return pairs.sum(axis=0, dtype=np.int64)


def exact(xq: np.ndarray, q: np.ndarray) -> np.ndarray:
    return xq.astype(np.int64) @ q.astype(np.int64)


def worst_inputs(q: np.ndarray) -> list[np.ndarray]:
    """Per column, the uint8 x that drives every pair sum to its largest positive and negative value."""
    return [np.where(q[:, n] > 0, 255, 0).astype(np.uint8) for n in range(q.shape[1])] + \
           [np.where(q[:, n] < 0, 255, 0).astype(np.uint8) for n in range(q.shape[1])]


def full_range_int8(B: np.ndarray) -> np.ndarray:
    """The former scheme: q = round(w / (max|w| / 127)) per output channel, in [-127, 127]."""
    scale = np.abs(B).max(axis=0) / 127.0
    return np.clip(np.rint(B / np.where(scale > 0, scale, 1)), -127, 127).astype(np.int8)


def matmul_model(B: np.ndarray) -> onnx.ModelProto:
    k, n = B.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])], [numpy_helper.from_array(B, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def heavy_tailed(rng, k: int, n: int, sparsity: float = 0.5) -> np.ndarray:
    """[K, N] weights with a few outliers per column (as trained LLM weights have), half of them pruned."""
    B = rng.standard_t(3, size=(k, n)).astype(np.float32)
    B[rng.random((k, n)) < sparsity] = 0.0
    return B


def test_exported_int8_weights_never_saturate_avx2_u8s8():
    rng = np.random.default_rng(0)
    B = heavy_tailed(rng, 97, 24)  # odd K: the last pair has one product
    model = quantize_int8(matmul_model(B)).model
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    q = inits["W" + QUANT_SUFFIX]
    assert q.dtype == np.int8 and np.abs(q).max() == grids.INT8_QMAX and np.all(q[B == 0] == 0)
    assert np.all(inits["W_zero_point"] == 0)
    np.testing.assert_allclose(inits["W_scale"], np.abs(B).max(axis=0) / 64, rtol=1e-6)
    assert {n.op_type for n in model.graph.node} == {"DynamicQuantizeLinear", "MatMulInteger", "Cast", "Mul"}
    onnx.checker.check_model(model, full_check=True)
    random_x = [rng.integers(0, 256, 97).astype(np.uint8) for _ in range(20)]
    for xq in worst_inputs(q) + random_x + [np.full(97, 255, np.uint8)]:
        np.testing.assert_array_equal(u8s8_avx2(xq, q), exact(xq, q))
    # the bound behind it: a pair of products can reach at most 2 · 255 · 64
    assert 2 * 255 * grids.INT8_QMAX <= INT16_MAX

    old = full_range_int8(B)
    wrong = [xq for xq in worst_inputs(old) if not np.array_equal(u8s8_avx2(xq, old), exact(xq, old))]
    assert wrong, "full-range int8 weights do saturate the emulated AVX2 kernel"


def test_int8_model_matches_numpy_reference_under_onnxruntime():
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    B = heavy_tailed(rng, 64, 16)
    model = quantize_int8(matmul_model(B)).model
    x = rng.normal(size=(1, 64)).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    scales = grids.int8_scales(B.T)
    W = grids.dequantize(grids.quantize(B.T, scales, bits=8), scales).T  # [K, N] on the 7-bit grid
    assert np.abs(W - B).max() <= np.abs(B).max() / 128 + 1e-6
    # ONNX Runtime quantizes x to uint8 as well: compare within x's rounding, |Δy| <= scale_x / 2 · Σ|W|
    scale_x = (max(x.max(), 0) - min(x.min(), 0)) / 255
    bound = scale_x / 2 * np.abs(W).sum(axis=0) + 1e-5
    assert np.all(np.abs(got[0] - x[0] @ W) <= bound)


def test_int8_grid_functions():
    rng = np.random.default_rng(2)
    w = heavy_tailed(rng, 40, 8).T  # [N, K] = [8, 40]
    w[3] = 0.0
    scales = grids.int8_scales(w)
    assert scales.shape == (8,) and scales.dtype == np.float32 and scales[3] == 0
    q = grids.quantize(w, scales, bits=8)
    assert q.dtype == np.int8 and q.min() >= -64 and q.max() <= 64 and np.all(q[w == 0] == 0) and np.all(q[3] == 0)
    back = grids.dequantize(q, scales)
    assert np.all(back[w == 0] == 0.0) and np.all(np.abs(back - w) <= scales[:, None] / 2 + 1e-7)
    assert grids.on_grid(back, scales, bits=8) and not grids.on_grid(w, scales, bits=8)
    assert not grids.on_grid(back * 1.5, scales, bits=8), "values past 64 steps are off the grid"
    with pytest.raises(ValueError, match="bits"):
        grids.quantize(w, scales, bits=3)


def int4_reference(B: np.ndarray, group_size: int) -> np.ndarray:
    """B [K, N] rounded to the symmetric int4 grid in plain loops: per column n and group of G rows, scale =
    (the value of largest magnitude, signed) / -8, q = clip(round(w / scale), -8, 7)."""
    out = np.zeros_like(B)
    for n in range(B.shape[1]):
        for start in range(0, B.shape[0], group_size):
            block = B[start:start + group_size, n]
            m = block[np.argmax(np.abs(block))]
            scale = np.float32(m) / np.float32(-8.0)
            if scale != 0:
                out[start:start + group_size, n] = np.clip(np.rint(block / scale), -8, 7) * scale
    return out


@pytest.mark.parametrize("k, group_size", [(64, 32), (100, 32), (96, 64), (200, 128), (40, 128)])
def test_int4_packing_round_trips_against_reference_and_onnxruntime(k, group_size):
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    from sparse_deploy.exporting.quantize import pack_int4, unpack_int4

    rng = np.random.default_rng(k + group_size)
    B = heavy_tailed(rng, k, 12)
    packed, scales = pack_int4(B, group_size)
    blocks = -(-k // group_size)
    assert packed.shape == (12, blocks, group_size // 2) and packed.dtype == np.uint8
    assert scales.shape == (12 * blocks,) and scales.dtype == np.float32
    W = unpack_int4(packed, scales, k)
    np.testing.assert_array_equal(W, int4_reference(B, group_size))
    assert np.all(W[B == 0] == 0.0), "pruned weights stay exactly 0"
    # bit for bit what ONNX Runtime's own symmetric block quantizer writes (on K zero padded to whole blocks)
    ref = np.zeros_like(packed)
    ref_scales = np.zeros((12, blocks), np.float32)
    padded = np.zeros((blocks * group_size, 12), np.float32)
    padded[:k] = B
    quantize_matmul_4bits(ref, padded, ref_scales, np.zeros((12, (blocks + 1) // 2), np.uint8), group_size, 12,
                          blocks * group_size, True)
    np.testing.assert_array_equal(packed, ref)
    np.testing.assert_array_equal(scales, ref_scales.ravel())


@pytest.mark.parametrize("k, group_size", [(64, 32), (72, 32), (160, 64), (136, 128)])
def test_int4_matmulnbits_runs_as_the_numpy_reference(k, group_size):
    import onnxruntime as ort

    from sparse_deploy.exporting.quantize import quantize_int4

    rng = np.random.default_rng(k)
    B = heavy_tailed(rng, k, 16)
    model = quantize_int4(matmul_model(B), group_size=group_size).model
    nodes = list(model.graph.node)
    assert [n.op_type for n in nodes] == ["MatMulNBits"] and nodes[0].domain == "com.microsoft"
    attrs = {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs == {"K": k, "N": 16, "bits": 4, "block_size": group_size, "accuracy_level": 4}
    assert len(nodes[0].input) == 3, "symmetric: no zero_points input"
    assert "W" not in {i.name for i in model.graph.initializer}, "the float weight is gone"
    x = rng.normal(size=(3, k)).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = x @ int4_reference(B, group_size)
    # accuracy level 4 quantizes x to int8 per block: |Δy| <= Σ_blocks max|x_block| / 254 · Σ|W_block|, loosely
    bound = np.abs(x).max(axis=1, keepdims=True) / 127 * np.abs(int4_reference(B, group_size)).sum(axis=0) + 1e-4
    assert np.all(np.abs(got - want) <= bound)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_int4_grid_functions_zero_groups_and_asymmetric():
    rng = np.random.default_rng(3)
    w = heavy_tailed(rng, 70, 6).T  # [N, K] = [6, 70]: the last group of 32 holds 6 columns
    w[2, 32:64] = 0.0
    scales, zero_points = grids.int4_scales(w, 32)
    assert scales.shape == (6, 3) and zero_points is None and scales[2, 1] == 0
    q = grids.quantize(w, scales, bits=4, group_size=32)
    assert q.dtype == np.int8 and q.min() >= -8 and q.max() <= 7 and np.all(q[w == 0] == 0)
    back = grids.dequantize(q, scales, group_size=32)
    assert grids.on_grid(back, scales, bits=4, group_size=32) and np.all(back[w == 0] == 0.0)
    scales, zero_points = grids.int4_scales(w, 32, symmetric=False)
    assert zero_points.dtype == np.uint8 and zero_points.shape == (6, 3)
    q = grids.quantize(w, scales, zero_points, bits=4, group_size=32)
    assert q.dtype == np.uint8 and q.max() <= 15
    back = grids.dequantize(q, scales, zero_points, group_size=32)
    assert np.all(back[w == 0] == 0.0), "asymmetric: zero is on the grid too"
    assert np.all(np.abs(back - w) <= np.repeat(scales, 32, axis=1)[:, :70] / 2 + 1e-6)
    with pytest.raises(ValueError, match="group_size"):
        grids.int4_scales(w, 0)


@pytest.fixture(scope="module")
def pruned_opt(tmp_path_factory):
    from test_export import make_checkpoint

    return make_checkpoint("opt", tmp_path_factory.mktemp("opt"))


def test_int4_export_runs_matmulnbits_and_keeps_zeros(pruned_opt, tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    from sparse_deploy import ExportConfig, export
    from sparse_deploy.config import DEFAULT_TOLERANCES
    from sparse_deploy.exporting import REPORT_NAME
    from sparse_deploy.exporting.quantize import INT4_SUFFIX, unpack_int4

    out = tmp_path / "int4"
    report = export(pruned_opt, out, ExportConfig(quantize="int4", group_size=64))
    assert report.parity.tolerance == DEFAULT_TOLERANCES["int4"] and report.parity.passed
    assert report.parity.top1_agreement >= 0.5  # a random tiny model: its logits span < 1, with near ties
    assert "MatMulNBits" in report.parity.executed_ops
    assert len(report.quantized) == 2 * 6 + 1  # OPT's six linears per block, two blocks, and the (untied) LM head
    info = json.loads((out / REPORT_NAME).read_text())
    assert info["settings"]["int4_scheme"] == grids.INT4_SCHEME and info["settings"]["group_size"] == 64
    assert info["quantization"]["block_size"] == 64 and info["settings"]["tolerance"] == DEFAULT_TOLERANCES["int4"]

    model = onnx.load(str(out / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    params = dict(AutoModelForCausalLM.from_pretrained(pruned_opt).named_parameters())
    checked = 0
    for name in report.quantized:
        source = report.sources[name]
        B = params[source.split(" ")[0]].detach().numpy()
        B = B.T if source.endswith("(transposed)") else B  # MatMul's B [K, N], as the int8 test reads it
        back = unpack_int4(inits[name + INT4_SUFFIX], inits[name + "_scales"], B.shape[0])  # [K, N]
        np.testing.assert_array_equal(back, int4_reference(B, 64))
        if np.any(B == 0):
            assert np.all(back[B == 0] == 0.0), "pruned weights stay exactly 0"
            checked += 1
    assert checked >= 2 * 6


def test_cli_int4_group_size_and_errors(pruned_opt, tmp_path):
    from typer.testing import CliRunner

    from sparse_deploy.cli import app

    runner = CliRunner()
    help_text = runner.invoke(app, ["export", "--help"]).output
    assert "int4" in help_text and "--group-size" in help_text
    for args, words in ((["--quantize", "int4", "--group-size", "48"], "32, 64, 128"),
                        (["--quantize", "int8", "--group-size", "32"], "int4 only"),
                        (["--group-size", "64"], "int4 only"),
                        (["--quantize", "int3"], "int3")):
        result = runner.invoke(app, ["export", str(pruned_opt), "-o", str(tmp_path / "bad"), *args])
        errors = [line for line in result.output.splitlines() if line.startswith("error")]
        assert result.exit_code == 2 and len(errors) == 1 and words in errors[0], result.output
        assert "Traceback" not in result.output and not (tmp_path / "bad").exists()
    result = runner.invoke(app, ["export", str(pruned_opt), "-o", str(tmp_path / "ok"), "--quantize", "int4"])
    assert result.exit_code == 0, result.output
    assert "tolerance 4e-01" in result.output
