"""The sparse encodings on small hand-built ONNX graphs: exact decoding, sizes, checker, ORT folding."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sparse_deploy.exporting.sparse_encoding import (
    coo_nbytes, densify, encode, initializer_bytes, pack, packed_nbytes, plan, read_packed, unpack, write_dense,
    weight_names,
)


def pruned(rows: int, cols: int, sparsity: float, seed: int = 0, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((rows, cols)).astype(np.float32)
    W[rng.random((rows, cols)) < sparsity] = 0
    if dtype == np.int8:
        return np.clip(np.round(W * 40), -127, 127).astype(np.int8)
    return W


def matmul_model(weights: dict[str, np.ndarray], opset: int = 18) -> onnx.ModelProto:
    """y_k = x_k @ W_k for each weight, with the weights also returned (as Identity outputs) for exact checks."""
    nodes, inputs, outputs, inits = [], [], [], []
    for k, (name, W) in enumerate(weights.items()):
        rows, cols = W.shape
        inputs.append(helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, rows]))
        nodes.append(helper.make_node("MatMul", [f"x{k}", name], [f"y{k}"]))
        outputs.append(helper.make_tensor_value_info(f"y{k}", TensorProto.FLOAT, [1, cols]))
        inits.append(numpy_helper.from_array(W, name))
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def weight_model(W: np.ndarray, opset: int = 18) -> onnx.ModelProto:
    """A graph that uses W as a matmul weight and also returns it, so ORT's decoded tensor can be compared bit by
    bit; int8 weights feed a MatMulInteger as after quantization."""
    dtype = helper.np_dtype_to_tensor_dtype(W.dtype)
    integer = W.dtype == np.int8
    matmul = helper.make_node("MatMulInteger" if integer else "MatMul", ["x", "W"], ["y"])
    graph = helper.make_graph(
        [matmul, helper.make_node("Identity", ["W"], ["w_out"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.UINT8 if integer else dtype, [1, W.shape[0]])],
        [helper.make_tensor_value_info("w_out", dtype, list(W.shape)),
         helper.make_tensor_value_info("y", TensorProto.INT32 if integer else dtype, [1, W.shape[1]])],
        [numpy_helper.from_array(W, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("shape", [(8, 16), (5, 13), (1, 7), (33, 64)])
@pytest.mark.parametrize("dtype", [np.float32, np.int8])
def test_pack_unpack_is_exact(shape, dtype):
    W = pruned(*shape, 0.6, dtype=dtype)
    W[0] = 0  # an empty row
    if shape[0] > 2:
        W[1] = np.where(W[1] == 0, 1, W[1])  # a full row
    for chunk_elems in (1 << 20, 8 * shape[1], 1):  # one chunk; 8 rows per chunk; the smallest chunks (8 rows)
        parts = pack(W, chunk_elems)
        bits, values = parts[0]
        assert bits.dtype == np.uint8 and values[0] == 0
        assert sum(v.size - 1 for _, v in parts) == np.count_nonzero(W)
        decoded = unpack(parts, shape)
        assert decoded.dtype == W.dtype and np.array_equal(decoded, W)
        stored = sum(b.nbytes + v.nbytes for b, v in parts)
        assert stored == packed_nbytes(shape, W.itemsize, np.count_nonzero(W), chunk_elems)


@pytest.mark.parametrize("opset", [14, 18])
@pytest.mark.parametrize("dtype", [np.float32, np.int8])
def test_onnx_runtime_decodes_packed_weights_bit_exactly(tmp_path, opset, dtype):
    W = pruned(37, 29, 0.5, seed=3, dtype=dtype)  # 29 columns: rows padded to whole bytes
    model = weight_model(W, opset)
    records = plan(model, "packed", chunk_elems=29 * 8)
    assert [r.encoding for r in records] == ["packed"]
    path = tmp_path / "packed.onnx"
    encoded = encode(model, records, chunk_elems=29 * 8)  # 5 chunks of 8 rows and a Concat
    assert 2048 < initializer_bytes(encoded) - records[0].stored_bytes < 2200  # lookup table, shape constants
    assert np.array_equal(read_packed(encoded, "W"), W)
    onnx.save(encoded, path)
    onnx.checker.check_model(str(path), full_check=True)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.zeros((1, 37), np.uint8 if W.dtype == np.int8 else W.dtype)
    got = session.run(["w_out"], {"x": x})[0]
    assert got.dtype == W.dtype and np.array_equal(got.view(np.uint8), W.view(np.uint8))
    folded = {node.op_type for node in onnx.load(tmp_path / "optimized.onnx").graph.node}
    assert not folded & {"CumSum", "GatherElements", "Concat"}, "the decode was not constant-folded"


def test_plan_encodes_only_sparse_weights_and_sizes_add_up(tmp_path):
    weights = {"dense": pruned(64, 48, 0.0), "half": pruned(64, 48, 0.5, 1), "light": pruned(64, 48, 0.1, 2),
               "almost_empty": pruned(64, 48, 0.995, 3)}
    model = matmul_model(weights)
    by_name = {r.name: r for r in plan(model, "packed", min_sparsity=0.25, pruned={"light"})}
    assert by_name["dense"].encoding == "dense" and by_name["half"].encoding == "packed"
    assert by_name["light"].encoding == "packed", "a weight recorded as pruned is encoded below the threshold"
    half = by_name["half"]
    assert half.packed_bytes == packed_nbytes((64, 48), 4, half.nnz) and half.coo_bytes == coo_nbytes(4, half.nnz)
    assert half.packed_bytes < 0.6 * half.dense_bytes < half.dense_bytes < half.coo_bytes
    auto = {r.name: r.encoding for r in plan(model, "auto")}
    assert auto == {"dense": "dense", "half": "packed", "light": "dense", "almost_empty": "coo"}
    assert {r.encoding for r in plan(model, "dense")} == {"dense"}

    records = plan(model, "auto")
    encoded = encode(model, records)
    stored = sum(r.stored_bytes for r in records)
    assert 2048 < initializer_bytes(encoded) - stored < 2200  # the shared 256x8 lookup table and a few constants
    dense_path, auto_path = tmp_path / "dense.onnx", tmp_path / "auto.onnx"
    onnx.save(model, dense_path)
    onnx.save(encoded, auto_path)
    saved = dense_path.stat().st_size - auto_path.stat().st_size
    assert abs(saved - (sum(r.dense_bytes for r in records) - stored)) < 4096  # node and header overhead only


def test_coo_is_checker_valid_and_runs(tmp_path):
    W = pruned(40, 24, 0.8, seed=5)
    model = matmul_model({"W": W})
    records = plan(model, "coo")
    encoded = encode(model, records)
    assert len(encoded.graph.sparse_initializer) == 1 and not encoded.graph.initializer
    sparse = encoded.graph.sparse_initializer[0]
    assert sparse.indices.data_type == TensorProto.INT64 and list(sparse.dims) == [40, 24]
    path = tmp_path / "coo.onnx"
    onnx.save(encoded, path)
    onnx.checker.check_model(str(path))
    x = np.random.default_rng(0).standard_normal((1, 40)).astype(np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x0": x})[0]
    np.testing.assert_allclose(got, x @ W, rtol=1e-5, atol=1e-5)
    assert records[0].coo_bytes == np.count_nonzero(W) * 12


def test_weights_are_found_by_role_not_name():
    W = pruned(16, 8, 0.5)
    model = matmul_model({"onnx::MatMul_123": W})
    gemm = helper.make_node("Gemm", ["x0", "fc.weight"], ["z"], transB=1)
    model.graph.node.append(gemm)
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(W.T), "fc.weight"))
    model.graph.initializer.append(numpy_helper.from_array(np.ones((4, 4), np.float32), "not_a_weight"))
    assert weight_names(model) == ["onnx::MatMul_123", "fc.weight"]


def test_densify_hands_decoded_weights_to_onnx_runtime(tmp_path):
    W = pruned(24, 40, 0.5, seed=7)
    model = weight_model(W)
    encoded = encode(model, plan(model, "packed"))
    dense = densify(encoded)
    assert list(dense.weights) == ["W"] and np.array_equal(dense.weights["W"], W)
    assert [n.op_type for n in dense.model.graph.node] == ["MatMul", "Identity"]
    assert initializer_bytes(dense.model) == 0, "the placeholder carries no data"
    options = ort.SessionOptions()
    values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in dense.weights.items()}
    options.add_external_initializers(list(values), list(values.values()))
    session = ort.InferenceSession(dense.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    assert np.array_equal(session.run(["w_out"], {"x": np.zeros((1, 24), np.float32)})[0], W)


def test_write_dense_gives_onnx_runtime_a_dense_file(tmp_path):
    weights = {"W": pruned(32, 64, 0.5, seed=8), "E": pruned(64, 16, 0.0, seed=9)}
    model = matmul_model(weights)
    path = tmp_path / "packed.onnx"
    onnx.save(encode(model, plan(model, "packed")), path)
    dense_path = write_dense(path, tmp_path / "dense", min_bytes=1024)
    written = onnx.load(str(dense_path), load_external_data=False)
    assert initializer_bytes(written) == 0, "every large initializer lives in weights.bin"
    assert not any(n.op_type in ("CumSum", "GatherElements") for n in written.graph.node), "no decode subgraph left"
    session = ort.InferenceSession(str(dense_path), providers=["CPUExecutionProvider"])
    x = np.ones((1, 32), np.float32)
    np.testing.assert_allclose(session.run(["y0"], {"x0": x, "x1": np.ones((1, 64), np.float32)})[0],
                               x @ weights["W"], rtol=1e-5)
    stored = onnx.load(str(dense_path))
    arrays = {t.name: numpy_helper.to_array(t) for t in stored.graph.initializer}
    assert all(np.array_equal(arrays[k], v) for k, v in weights.items())
