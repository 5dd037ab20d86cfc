"""Quantization grids (sparse_deploy.grids) and the int8 graph, checked in numpy; no model export here."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sparse_deploy import grids
from sparse_deploy.export.quantize import QUANT_SUFFIX, quantize_int8

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
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [numpy_helper.from_array(B, "W")])
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
