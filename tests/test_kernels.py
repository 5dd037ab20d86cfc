"""The CPU matrix-vector kernels: every format and value type against the dense product, exact round trips,
the layout each format documents, and rejected input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from sparse_deploy.errors import InvalidInputError, SparseDeployError
from sparse_deploy.kernels import (FORMATS, VALUE_TYPES, BitmaskMatrix, CSRMatrix, NMMatrix, decode, encode,
                                   encode_bitmask, encode_csr, encode_nm, gemv, quantize)
from sparse_deploy.kernels._gemv import quantize_u8
from sparse_deploy.kernels._simd import lane_columns
from sparse_deploy.kernels.formats import STORAGE, aligned_zeros

# rows x cols: one row, ragged rows, fewer than 64 columns, ragged columns, exact multiples of 64
SHAPES = [(1, 4), (3, 60), (37, 64), (64, 200), (130, 260), (17, 1028)]


def pruned(rows: int, cols: int, fmt: str, seed: int, sparsity: float = 0.5) -> np.ndarray:
    """A random float32 weight pruned to 2:4 (format "2:4") or to `sparsity` unstructured."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((rows, cols)).astype(np.float32)
    if fmt == "2:4":
        groups = W.reshape(rows, -1, 4)
        np.put_along_axis(groups, np.argsort(np.abs(groups), axis=2)[:, :, :2], 0, axis=2)
    else:
        W[rng.random(W.shape) < sparsity] = 0
    return W


def assert_product(M, W_used: np.ndarray, x: np.ndarray) -> None:
    """gemv equals the float64 product with the matrix the kernel uses, within float32 summation error; int8
    matrices also with x quantized to uint8: exactly the integer product, and within x's rounding of the float
    product."""
    ref = x.astype(np.float64) @ W_used.T.astype(np.float64)
    bound = np.abs(x).astype(np.float64) @ np.abs(W_used).T.astype(np.float64)
    y = gemv(M, x, quantize_x=False)
    assert y.shape == ref.shape and y.dtype == np.float32
    np.testing.assert_array_less(np.abs(y - ref), 4e-6 * bound + 1e-30)
    if M.dtype != "int8" or isinstance(M, CSRMatrix):
        return
    y = gemv(M, x)
    x2 = x.reshape(-1, M.shape[1])
    xq, sx, zero = quantize_u8(x2, x2.shape[1])
    q = np.rint(W_used / np.where(M.scales > 0, M.scales, 1)[:, None]).astype(np.int64)  # the stored int8 values
    exact = (sx[: len(x2), None].astype(np.float64) * M.scales) * ((xq.astype(np.int64) - zero[: len(x2), None]) @ q.T)
    np.testing.assert_allclose(y.reshape(exact.shape), exact, rtol=1e-5, atol=1e-6 * np.abs(exact).max())
    step = sx[: len(x2), None].astype(np.float64)  # x's rounding: |x - sx (xq - zero)| <= sx / 2
    np.testing.assert_array_less(np.abs(y.reshape(exact.shape) - ref.reshape(exact.shape)),
                                 (step / 2 + 1e-6) * np.abs(W_used).sum(axis=1) + 1e-5)


@pytest.mark.parametrize("dtype", VALUE_TYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_equals_dense_product(fmt, dtype):
    for i, (rows, cols) in enumerate(SHAPES):
        W = pruned(rows, cols, fmt, seed=i)
        M = encode(W, fmt, dtype)
        W_used = decode(M)
        rng = np.random.default_rng(100 + i)
        for batch in range(1, 9):
            assert_product(M, W_used, rng.standard_normal((batch, cols)).astype(np.float32))
        assert_product(M, W_used, rng.standard_normal(cols).astype(np.float32))


@pytest.mark.parametrize("fmt", ["bitmask", "csr", "dense"])
@pytest.mark.parametrize("sparsity", [0.0, 0.7, 0.95, 1.0])
def test_kernel_at_any_density(fmt, sparsity):
    W = pruned(50, 333, fmt, seed=7, sparsity=sparsity)
    M = encode(W, fmt, "fp32")
    x = np.random.default_rng(8).standard_normal((4, 333)).astype(np.float32)
    assert_product(M, W, x)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fp32_round_trip_is_exact(fmt):
    for i, (rows, cols) in enumerate(SHAPES):
        W = pruned(rows, cols, fmt, seed=i)
        np.testing.assert_array_equal(decode(encode(W, fmt, "fp32")), W)


@pytest.mark.parametrize("fmt", FORMATS)
def test_bf16_round_trip_is_exact_for_bf16_values(fmt):
    W = pruned(33, 200, fmt, seed=3)
    W = (W.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)  # representable in bf16
    np.testing.assert_array_equal(decode(encode(W, fmt, "bf16")), W)


def test_bf16_rounds_to_nearest_even():
    W = np.array([[1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -(1.0 + 2.0**-9), 3.0]], np.float32)
    stored, _ = quantize(W, "bf16")
    # 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to the even one (1.0)
    np.testing.assert_array_equal(decode(encode(W, "dense", "bf16")), [[1.0, 1.0 + 2.0**-6, -1.0, 3.0]])
    assert stored.dtype == np.uint16


@pytest.mark.parametrize("fmt", FORMATS)
def test_int8_round_trip(fmt):
    W = pruned(40, 260, fmt, seed=5)
    W[3] = 0  # an all-zero row keeps scale 0
    M = encode(W, fmt, "int8")
    once = decode(M)
    assert np.all(np.abs(once - W) <= M.scales[:, None] / 2 * 1.0001)
    np.testing.assert_array_equal(decode(encode(once, fmt, "int8")), once)
    assert M.scales.shape == (40,) and M.scales[3] == 0


def test_bitmask_layout():
    W = np.zeros((2, 130), np.float32)
    W[0, [0, 63, 64, 129]] = [1, 2, 3, 4]
    W[1, 5] = 5
    M = encode_bitmask(W, block_cols=128)  # blocks: columns 0..127 (two words a row), 128..191 (one word)
    assert isinstance(M, BitmaskMatrix) and M.masks.dtype == np.uint64 and M.blocks == 2
    assert M.masks.tolist() == [1 | 1 << 63, 1, 1 << 5, 0, 2, 0]  # block 0: row 0, row 1; block 1: row 0, row 1
    assert M.row_start.tolist() == [[0, 3, 4], [4, 5, 5]]
    np.testing.assert_array_equal(M.values[:5], [1, 2, 3, 5, 4])


def test_nm_layout():
    W = np.zeros((2, 72), np.float32)
    W[0, [1, 3, 4]] = [10, 30, 40]  # group 0 keeps columns 1, 3; group 1 keeps 4 and (zero) 5
    W[1, [64, 67]] = [64, 67]  # in the second block
    M = encode_nm(W, block_cols=64)
    assert isinstance(M, NMMatrix) and M.meta.dtype == np.uint32 and M.meta.shape == (8,)
    assert M.meta[0] & 0xFF == (1 | 3 << 2) | (0 | 1 << 2) << 4  # padding groups hold (0, 1) too
    assert M.meta[6] & 0xF == 0 | 3 << 2  # block 1, row 1, first word
    np.testing.assert_array_equal(M.values[:4], [10, 30, 40, 0])
    assert M.row_start.tolist() == [[0, 32, 64], [64, 96, 128]]
    assert M.values[96] == 64 and M.values[97] == 67


@pytest.mark.parametrize("block_cols", [64, 192, 1024, 4096])
@pytest.mark.parametrize("fmt", ["dense", "bitmask", "2:4"])
def test_any_block_width(fmt, block_cols):
    W = pruned(45, 1000, fmt, seed=9)
    M = encode(W, fmt, "bf16", block_cols=block_cols)
    assert M.blocks == -(-1024 // block_cols)
    assert_product(M, decode(M), np.random.default_rng(1).standard_normal((5, 1000)).astype(np.float32))


def test_csr_layout_and_size():
    W = pruned(64, 4096, "csr", seed=1)
    M = encode_csr(W)
    assert isinstance(M, CSRMatrix) and M.indices.dtype == np.uint16
    nnz = int(np.count_nonzero(W))
    assert M.row_start.shape == (1, 65) and M.row_start[0, -1] == nnz
    # 6 bytes per nonzero (fp32 value + uint16 index) plus row starts and padding
    assert 6 * nnz <= M.nbytes <= 6 * nnz + 8 * 65 + 6 * 64


@pytest.mark.parametrize("dtype, bytes_per_weight", [("fp32", 2.125), ("bf16", 1.125), ("int8", 0.625)])
@pytest.mark.parametrize("fmt", ["bitmask", "2:4"])
def test_half_sparse_formats_read_the_expected_bytes(fmt, dtype, bytes_per_weight):
    W = pruned(256, 4096, fmt, seed=2)
    per_weight = encode(W, fmt, dtype).nbytes / W.size
    # int8 rounds a few tiny weights to 0, which are then not stored
    assert bytes_per_weight * 0.97 <= per_weight <= bytes_per_weight * 1.02


def test_lane_columns_are_permutations():
    for dtype in STORAGE.values():
        assert sorted(lane_columns(dtype).tolist()) == list(range(64))


def test_aligned_zeros_is_aligned():
    for n in (1, 17, 4096):
        a = aligned_zeros((3, n), np.float32)
        assert a.ctypes.data % 64 == 0 and a.shape == (3, n) and not a.any()


def test_gemv_writes_out_and_keeps_x():
    W = pruned(20, 100, "bitmask", seed=4)
    M = encode_bitmask(W)
    x = np.random.default_rng(0).standard_normal((2, 100)).astype(np.float32)
    x_before = x.copy()
    out = np.full((2, 20), np.nan, np.float32)
    assert gemv(M, x, out=out) is out
    np.testing.assert_allclose(out, x @ W.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(x, x_before)
    assert gemv(M, x[0]).shape == (20,)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gemv_rejects_wrong_x(fmt):
    M = encode(pruned(8, 64, fmt, seed=0), fmt, "fp32")
    bad = [np.zeros(63, np.float32), np.zeros((2, 65), np.float32), np.zeros((1, 2, 64), np.float32),
           np.zeros((0, 64), np.float32), np.zeros(64, np.float64), [0.0] * 64]
    for x in bad:
        with pytest.raises(InvalidInputError):
            gemv(M, x)
    for out in (np.zeros((1, 8), np.float32), np.zeros(8, np.float64), np.zeros(16, np.float32)[::2]):
        with pytest.raises(InvalidInputError, match="out must be"):
            gemv(M, np.zeros(64, np.float32), out=out)
    with pytest.raises(InvalidInputError):
        gemv(np.zeros((8, 64), np.float32), np.zeros(64, np.float32))


def test_encoders_reject_bad_weights():
    good = pruned(4, 16, "2:4", seed=0)
    cases = [
        (lambda: encode(np.zeros(16, np.float32), "bitmask"), "2-D"),
        (lambda: encode(np.zeros((4, 0), np.float32), "bitmask"), "2-D"),
        (lambda: encode(np.ones((4, 16), np.int32), "bitmask"), "floating point"),
        (lambda: encode(np.full((4, 16), np.nan, np.float32), "csr"), "NaN"),
        (lambda: encode(good, "bitmask", "fp16"), "value type"),
        (lambda: encode(good, "blocked"), "format"),
        (lambda: encode(good, "bitmask", block_cols=100), "multiple of 64"),
        (lambda: encode_nm(np.ones((4, 16), np.float32)), "not 2:4 sparse: row 0, columns 0..3"),
        (lambda: encode_nm(np.zeros((4, 18), np.float32)), "multiple of 4"),
        (lambda: encode_csr(np.zeros((1, 65537), np.float32)), "uint16"),
        (lambda: encode(np.full((1, 4), 3.4e38, np.float32), "dense", "bf16"), "bf16 range"),
    ]
    for make, message in cases:
        with pytest.raises(InvalidInputError, match=message) as info:
            make()
        assert isinstance(info.value, (SparseDeployError, ValueError))


def test_quantize_u8_matches_dynamic_quantize_linear():
    """x's uint8 quantization is ONNX DynamicQuantizeLinear per batch row, bit for bit."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    outs = [helper.make_tensor_value_info(n, t, s) for n, t, s in
            (("q", TensorProto.UINT8, [37]), ("s", TensorProto.FLOAT, []), ("z", TensorProto.UINT8, []))]
    graph = helper.make_graph([helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [37])], outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 37)).astype(np.float32) * rng.uniform(0.01, 100, (60, 1)).astype(np.float32)
    x[:10] = np.abs(x[:10])  # all positive, as after an activation
    x[10, :] = 0
    xq, scale, zero = quantize_u8(x, 64)
    assert xq.shape == (60, 64) and not xq[:, 37:].any()
    for b in range(60):
        q, s, z = session.run(None, {"x": x[b]})
        np.testing.assert_array_equal(xq[b, :37], q)
        assert scale[b] == s and zero[b] == z


def test_generic_cpu_lowering(tmp_path, request):
    """The same kernels compiled for a generic x86-64 CPU (no AVX-512: LLVM lowers expand, gather and the
    uint8 · int8 dot product to plain code) give the same answers."""
    code = (
        "import numpy as np\n"
        "from sparse_deploy.kernels import decode, encode, gemv\n"
        "from sparse_deploy.kernels._simd import has_vnni\n"
        "assert not has_vnni()\n"
        "rng = np.random.default_rng(0)\n"
        "W = rng.standard_normal((19, 136)).astype(np.float32)\n"
        "g = W.reshape(19, -1, 4); np.put_along_axis(g, np.argsort(np.abs(g), 2)[:, :, :2], 0, 2)\n"
        "x = rng.standard_normal((5, 136)).astype(np.float32)\n"
        "for fmt, dtype in [('bitmask', 'bf16'), ('2:4', 'fp32'), ('csr', 'fp32'), ('2:4', 'int8')]:\n"
        "    M = encode(W, fmt, dtype)\n"
        "    ref = x @ decode(M).T\n"
        "    tol = 0.05 if dtype == 'int8' else 1e-4\n"
        "    assert np.abs(gemv(M, x) - ref).max() <= tol * np.abs(ref).max(), (fmt, dtype)\n"
    )
    env = {**__import__("os").environ, "NUMBA_CPU_NAME": "generic",
           "NUMBA_CACHE_DIR": str(request.config.cache.mkdir("numba-generic"))}
    done = subprocess.run([sys.executable, "-c", code], cwd=str(__import__("pathlib").Path(__file__).parents[1]),
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_kernels_do_not_import_torch():
    code = "import sys, sparse_deploy.kernels; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=str(__import__("pathlib").Path(__file__).parents[1]),
                          timeout=120).returncode == 0
