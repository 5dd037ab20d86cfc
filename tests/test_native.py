"""The native sparse MatMul ops (native/, sparse_deploy.runtime.kernels) against numpy, on every ISA path this CPU
has, forced in turn through SPARSE_DEPLOY_ISA."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sparse_deploy.errors import InvalidInputError, KernelsUnavailableError
from sparse_deploy.runtime import kernels

ROOT = Path(__file__).resolve().parent.parent
STATE = kernels.availability()
pytestmark = pytest.mark.skipif(not STATE.ok, reason=f"native kernels unavailable: {STATE.reason}")


def _supported_isas() -> list[str]:
    if not STATE.ok:
        return []
    found = []
    for name in kernels.ISAS:
        os.environ[kernels.ISA_ENV] = name
        try:
            if kernels.isa() == name:
                found.append(name)
        except KernelsUnavailableError:
            pass
        finally:
            del os.environ[kernels.ISA_ENV]
    return found


ISAS = _supported_isas()
SHAPES = [(1, 1), (7, 1), (1, 63), (5, 64), (33, 65), (31, 130), (70, 200), (9, 1000)]  # (N, K)
DENSITIES = [0.0, 0.5, 0.9, 1.0]
MS = [1, 2, 3, 5, 8, 16, 17, 33, 64]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv(kernels.ISA_ENV, request.param)
    assert kernels.isa() == request.param
    return request.param


def _model(op: str, inputs: dict[str, np.ndarray], k: int, n: int, as_initializers: bool = True) -> bytes:
    names = list(inputs)
    node = helper.make_node(op, ["X", *names], ["Y"], domain=kernels.DOMAIN)
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, None)
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    if as_initializers:
        graph = helper.make_graph([node], "g", [x], [y], [numpy_helper.from_array(a, nm) for nm, a in inputs.items()])
    else:
        extra = [helper.make_tensor_value_info(nm, helper.np_dtype_to_tensor_dtype(a.dtype), [None] * a.ndim)
                 for nm, a in inputs.items()]
        graph = helper.make_graph([node], "g", [x, *extra], [y])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(kernels.DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def _session(model: bytes, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    kernels.register(options)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _weight(rng, n: int, k: int, density: float) -> np.ndarray:
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[rng.random((n, k)) >= density] = 0
    return w


def _inputs(packed: kernels.KernelWeights, bias: np.ndarray | None) -> dict[str, np.ndarray]:
    names = ["mask", "values", "row_ptr"] + (["scale"] if packed.scale is not None else [])
    found = dict(zip(names, packed.inputs()))
    if bias is not None:
        found["bias"] = bias
    return found


def _int8_reference(x: np.ndarray, packed: kernels.KernelWeights, w_q: np.ndarray, bias) -> np.ndarray:
    q, s = kernels.quantize_activations(x)
    acc = q.astype(np.int64) @ w_q.astype(np.int64).T  # the exact integer sums
    assert np.abs(acc).max(initial=0) < 2**31
    y = acc.astype(np.float32) * (s[:, None] * packed.scale[None, :]).astype(np.float32)
    return y + bias if bias is not None else y


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("threads", [1, 2])
def test_fp32_matches_numpy(isa, shape, density, threads):
    n, k = shape
    rng = np.random.default_rng(n * 1000 + k)
    w = _weight(rng, n, k, density)
    for use_bias in (False, True):
        bias = rng.standard_normal(n).astype(np.float32) if use_bias else None
        session = _session(_model(kernels.OP_FP32, _inputs(kernels.pack_rows(w), bias), k, n), threads)
        for m in MS:
            x = rng.standard_normal((m, k)).astype(np.float32)
            y = session.run(None, {"X": x})[0]
            ref = x.astype(np.float64) @ w.T.astype(np.float64) + (bias if use_bias else 0)
            scale = np.abs(x).astype(np.float64) @ np.abs(w).T.astype(np.float64) + np.abs(ref) + 1e-30
            assert y.shape == (m, n) and y.dtype == np.float32
            np.testing.assert_array_less(np.abs(y - ref), 1e-5 * scale + 1e-37, err_msg=f"{isa} M={m}")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("threads", [1, 2])
def test_int8_equals_exact_integer_reference(isa, shape, density, threads):
    n, k = shape
    rng = np.random.default_rng(n * 1000 + k + 1)
    w = _weight(rng, n, k, density)
    packed = kernels.pack_rows_int8(w)
    w_q, _ = kernels.quantize_rows(w)
    for use_bias in (False, True):
        bias = rng.standard_normal(n).astype(np.float32) if use_bias else None
        session = _session(_model(kernels.OP_INT8, _inputs(packed, bias), k, n), threads)
        for m in MS:
            x = (rng.standard_normal((m, k)) * 3).astype(np.float32)
            y = session.run(None, {"X": x})[0]
            np.testing.assert_array_equal(y, _int8_reference(x, packed, w_q, bias), err_msg=f"{isa} M={m}")


@pytest.mark.parametrize("threads", [1, 2])
def test_int8_sums_do_not_saturate(isa, threads):
    """Extreme operands (x = -127, w = +-127 everywhere) overflow 16-bit pair sums and unsigned-offset tricks; with
    unit scales the output is the integer sum itself, exactly representable in float32."""
    n, k = 40, 700
    rng = np.random.default_rng(3)
    w_q = np.where(rng.random((n, k)) < 0.5, 127, -127).astype(np.int8)
    w_q[rng.random((n, k)) < 0.3] = 0
    w_q[:, 0] = 127  # full rows and a row of one sign exercise the largest sums
    w_q[0] = 127
    w_q[1] = -127
    packed = kernels.pack_rows_int8(w_q, np.ones(n, np.float32))
    session = _session(_model(kernels.OP_INT8, _inputs(packed, None), k, n), threads)
    for fill in (-127.0, 127.0):
        x = np.full((20, k), fill, np.float32)  # 20 rows: the prefill kernels too
        x[1, ::2] = -fill
        x[2:] = rng.integers(-127, 128, (18, k))
        x[2:, 0] = 127
        y = session.run(None, {"X": x})[0]
        exact = x.astype(np.int64) @ w_q.astype(np.int64).T
        np.testing.assert_array_equal(y, exact.astype(np.float32))
        assert np.abs(exact).max() > 2**16  # the case is one that 16-bit arithmetic would get wrong


def test_leading_dimensions_and_empty_batch(isa):
    rng = np.random.default_rng(4)
    w = _weight(rng, 12, 40, 0.5)
    session = _session(_model(kernels.OP_FP32, _inputs(kernels.pack_rows(w), None), 40, 12), 2)
    x = rng.standard_normal((2, 3, 40)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"X": x})[0], x @ w.T, rtol=1e-5, atol=1e-5)
    assert session.run(None, {"X": np.zeros((0, 40), np.float32)})[0].shape == (0, 12)


def test_large_matrix_split_over_threads(isa):
    """Big enough that the rows are split into tasks on ONNX Runtime's pool (tasks of 192 rows from 16 rows of X on,
    whose panels of W then start inside the task's range and end ragged)."""
    rng = np.random.default_rng(5)
    w = _weight(rng, 517, 1030, 0.5)
    for m in (3, 40):
        x = rng.standard_normal((m, 1030)).astype(np.float32)
        for threads in (1, 2):
            y = _session(_model(kernels.OP_FP32, _inputs(kernels.pack_rows(w), None), 1030, 517), threads).run(
                None, {"X": x})[0]
            np.testing.assert_allclose(y, x @ w.T, rtol=1e-4, atol=1e-4, err_msg=f"{isa} M={m} threads={threads}")


def _error_of(model: bytes, feeds: dict[str, np.ndarray]) -> str:
    with pytest.raises(Exception) as info:
        _session(model).run(None, feeds)
    return str(info.value)


def test_wrong_shapes_give_clear_errors():
    rng = np.random.default_rng(6)
    w = _weight(rng, 8, 100, 0.5)
    packed = kernels.pack_rows(w)
    model = _model(kernels.OP_FP32, _inputs(packed, None), 100, 8)
    message = _error_of(model, {"X": np.zeros((2, 60), np.float32)})
    assert "mask" in message and "K=60" in message and "SparseMatMul" in message

    bad_bias = _inputs(packed, np.zeros(7, np.float32))
    assert "bias must be [N] = [8]" in _error_of(_model(kernels.OP_FP32, bad_bias, 100, 8),
                                                  {"X": np.zeros((1, 100), np.float32)})
    short = dict(_inputs(packed, None), row_ptr=packed.row_ptr[:-1])
    assert "row_ptr must be [N+1]" in _error_of(_model(kernels.OP_FP32, short, 100, 8),
                                                {"X": np.zeros((1, 100), np.float32)})
    int8 = kernels.pack_rows_int8(w)
    bad_scale = dict(_inputs(int8, None), scale=np.ones(3, np.float32))
    assert "scale must be [N]" in _error_of(_model(kernels.OP_INT8, bad_scale, 100, 8),
                                            {"X": np.zeros((1, 100), np.float32)})


def test_inconsistent_layout_is_rejected_not_read_out_of_bounds():
    rng = np.random.default_rng(7)
    packed = kernels.pack_rows(_weight(rng, 8, 100, 0.5))
    feeds = {"X": np.zeros((1, 100), np.float32), **_inputs(packed, None)}
    model = _model(kernels.OP_FP32, _inputs(packed, None), 100, 8, as_initializers=False)
    session = _session(model)
    session.run(None, feeds)  # valid
    row_ptr = packed.row_ptr.copy()
    row_ptr[3] += 1
    with pytest.raises(Exception, match="row_ptr does not match"):
        session.run(None, dict(feeds, row_ptr=row_ptr))
    mask = packed.mask.copy()
    mask[0, -1] |= 0x80  # bit 63 of the last word, beyond K = 100
    with pytest.raises(Exception, match="beyond K"):
        session.run(None, dict(feeds, mask=mask))
    with pytest.raises(Exception, match="number of values"):
        session.run(None, dict(feeds, values=packed.values[:-1]))


def test_missing_library_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "_package_dir", lambda: tmp_path)
    state = kernels.availability()
    assert not state.ok and "not built" in state.reason
    (tmp_path / kernels.UNAVAILABLE_NAME).write_text("no C++ compiler found\n")
    with pytest.raises(KernelsUnavailableError, match="no C\\+\\+ compiler found"):
        kernels.register(ort.SessionOptions())


def test_model_without_registration_fails_to_load():
    packed = kernels.pack_rows(np.eye(4, dtype=np.float32))
    with pytest.raises(Exception, match=kernels.DOMAIN.replace(".", r"\.")):
        ort.InferenceSession(_model(kernels.OP_FP32, _inputs(packed, None), 4, 4), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("threads", [1, 2])
def test_int8_prefill_between_onnx_runtime_int8_matmuls(isa, threads):
    """ONNX Runtime's own int8 GEMM (AMX tiles where the CPU has them, configured once per thread) before and after
    the sparse int8 op on the same threads: each result stays right, so the op leaves the threads' tile state as it
    found it."""
    rng = np.random.default_rng(11)
    m, k, n = 128, 1024, 512
    # [K, N], scale 0.01, on the exports' 7-bit grid: ONNX Runtime's u8s8 int8 saturates on full-range weights where
    # the CPU has no VNNI (sparse_deploy.grids), which this test is not about
    wa, wb = (rng.integers(-64, 65, shape).astype(np.int8) for shape in ((k, k), (k, n)))
    ws = _weight(rng, k, k, 0.5)  # [N, K] of the sparse op
    packed = kernels.pack_rows_int8(ws)
    w_q, _ = kernels.quantize_rows(ws)
    inits = {"wa": wa, "wb": wb, "s": np.array(0.01, np.float32), **_inputs(packed, None)}
    nodes = [helper.make_node("DynamicQuantizeMatMul", ["X", "wa", "s"], ["Y1"], domain="com.microsoft"),
             helper.make_node(kernels.OP_INT8, ["Y1", "mask", "values", "row_ptr", "scale"], ["Y2"],
                              domain=kernels.DOMAIN),
             helper.make_node("DynamicQuantizeMatMul", ["Y2", "wb", "s"], ["Y3"], domain="com.microsoft")]
    outs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("Y1", "Y2", "Y3")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)], outs,
                              [numpy_helper.from_array(a, name) for name, a in inits.items()])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1),
              helper.make_opsetid(kernels.DOMAIN, 1)]
    session = _session(helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString(), threads)
    x = rng.standard_normal((m, k)).astype(np.float32)
    for _ in range(3):
        y1, y2, y3 = session.run(None, {"X": x})
        for got, want in ((y1, x @ (0.01 * wa)), (y3, y2 @ (0.01 * wb))):  # ONNX Runtime's int8: about 1% off
            assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
        np.testing.assert_array_equal(y2, _int8_reference(y1, packed, w_q, None))


def test_forced_isa_must_exist(monkeypatch):
    monkeypatch.setenv(kernels.ISA_ENV, "sse9")
    state = kernels.availability()
    assert not state.ok and "sse9" in state.reason
    with pytest.raises(KernelsUnavailableError):
        kernels.isa()


def test_every_path_this_cpu_has_is_tested():
    assert "portable" in ISAS
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if " avx2" in flags and " fma" in flags:
        assert "avx2" in ISAS
    if all(f" {f}" in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512_vbmi2", "avx512_vnni")):
        assert "avx512" in ISAS
        if " amx_tile" in flags and " amx_int8" in flags:  # the OS grants the tile state on Linux >= 5.16
            assert "amx" in ISAS


def test_pack_rows_layout():
    w = np.zeros((2, 70), np.float32)
    w[0, [0, 9, 69]] = [1, 2, 3]
    w[1, 64] = 4
    packed = kernels.pack_rows(w)
    assert packed.mask.shape == (2, 16) and packed.mask.dtype == np.uint8
    assert packed.mask[0, 0] == 1 and packed.mask[0, 1] == 2 and packed.mask[0, 8] == 1 << 5
    assert packed.row_ptr.tolist() == [0, 3, 4] and packed.values.tolist() == [1, 2, 3, 4]


def test_kernels_module_needs_no_torch():
    code = "import sys, sparse_deploy.runtime.kernels as k; k.availability(); k.isa(); sys.exit('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr


def _ort_headers() -> Path | None:
    candidates = [os.environ.get("SPARSE_DEPLOY_ORT_INCLUDE", ""), "/usr/include/onnxruntime",
                  str(ROOT / "build" / "ort-headers" / "usr" / "include" / "onnxruntime")]  # where setup.py puts them
    return next((Path(c) for c in candidates if c and (Path(c) / "onnxruntime_c_api.h").is_file()), None)


def build_c_runner(folder: Path) -> Path:
    """tests/native_c/run_sparse.c compiled against the onnxruntime wheel's libonnxruntime.so (skips without a C
    compiler or the ONNX Runtime headers)."""
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    headers = _ort_headers()
    libs = sorted((Path(ort.__file__).parent / "capi").glob("libonnxruntime.so*"))
    if not compiler or headers is None or not libs:
        pytest.skip(f"needs a C compiler ({compiler}), ONNX Runtime headers ({headers}) and libonnxruntime ({libs})")
    exe = folder / "run_sparse"
    (folder / "libonnxruntime.so.1").symlink_to(libs[-1])  # the wheel's file carries the full version in its name
    build = subprocess.run([compiler, "-std=c11", "-O1", "-Wall", "-Werror",
                            str(ROOT / "tests" / "native_c" / "run_sparse.c"), f"-I{headers}", "-o", str(exe),
                            str(folder / "libonnxruntime.so.1"), f"-Wl,-rpath,{folder}"],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    return exe


def run_c(exe: Path, model: Path, output: str, inputs: dict[str, np.ndarray], folder: Path) -> np.ndarray:
    """The output ``output`` of ``model`` run by the C program on ``inputs`` (float32 or int64 arrays)."""
    args = []
    for name, array in inputs.items():
        path = folder / f"{name}.bin"
        path.write_bytes(array.tobytes())
        kind = {np.dtype(np.float32): "f32", np.dtype(np.int64): "i64"}[array.dtype]
        args.append(f"{name}={kind}:{'x'.join(str(d) for d in array.shape)}:{path}")
    out = folder / f"{output}.out.bin"
    run = subprocess.run([str(exe), str(model), str(kernels.library_path()), output, str(out), *args],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    return np.fromfile(out, np.float32)


def test_c_program_runs_a_sparse_model(tmp_path):
    """An app outside Python (C, linked against the wheel's libonnxruntime.so) registers the library and runs."""
    exe = build_c_runner(tmp_path)
    rng = np.random.default_rng(8)
    w = _weight(rng, 24, 50, 0.5)
    bias = rng.standard_normal(24).astype(np.float32)
    x = rng.standard_normal((2, 50)).astype(np.float32)
    model = tmp_path / "sparse.onnx"
    model.write_bytes(_model(kernels.OP_FP32, _inputs(kernels.pack_rows(w), bias), 50, 24))
    y = run_c(exe, model, "Y", {"X": x}, tmp_path).reshape(2, 24)
    np.testing.assert_allclose(y, x @ w.T + bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows, cols, chunk", [(100, 40, 1 << 20), (129, 70, 16 * 70), (64, 64, 8 * 64),
                                              (1100, 37, 1 << 20)])
def test_repack_transposed_equals_packing_the_transpose(rows, cols, chunk):
    """The stored layout of S [R, C] repacks in one native pass to what pack_rows / pack_rows_int8 give for S^T."""
    from sparse_deploy.formats.packed import Stored, pack

    rng = np.random.default_rng(rows)
    s = rng.standard_normal((rows, cols), dtype=np.float32)
    s[rng.random(s.shape) < 0.6] = 0
    stored = Stored(pack(s, chunk_elems=chunk), s.shape)
    got = kernels.pack_bits(stored.mask_bits(), stored.nonzeros(), s.shape, transpose=True)
    for a, b in zip(got.inputs(), kernels.pack_rows(s.T).inputs()):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    q, scale = kernels.quantize_rows(s.T)
    qs = Stored(pack(np.ascontiguousarray(q.T), chunk_elems=chunk), s.shape)
    got = kernels.pack_bits(qs.mask_bits(), qs.nonzeros(), s.shape, transpose=True, scale=scale)
    for a, b in zip(got.inputs(), kernels.pack_rows_int8(q, scale).inputs()):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    with pytest.raises(InvalidInputError, match="mark"):
        kernels.pack_bits(stored.mask_bits(), stored.nonzeros()[:-1], s.shape, transpose=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8])
@pytest.mark.parametrize("rows, cols, chunk, density", [(100, 40, 1 << 20, 0.4), (129, 70, 16 * 70, 0.5),
                                                        (33, 17, 8 * 17, 0.0), (20, 9, 1 << 20, 1.0)])
def test_native_unpack_equals_numpy(dtype, rows, cols, chunk, density):
    """The native decode of a packed weight left dense gives numpy's array (chunks, ragged shapes, 0-100% kept)."""
    from sparse_deploy.formats.packed import pack, unpack

    rng = np.random.default_rng(rows + cols)
    s = (rng.standard_normal((rows, cols)) * 50).astype(dtype)
    s[rng.random(s.shape) >= density] = 0
    parts = pack(s, chunk_elems=chunk)
    got = kernels.unpack(parts, s.shape)
    assert got.dtype == s.dtype and np.array_equal(got, unpack(parts, s.shape)) and np.array_equal(got, s)
    if s.any():
        bits, values = parts[-1]
        with pytest.raises(InvalidInputError, match="mark"):
            kernels.unpack(parts[:-1] + [(bits, values[:-1])], s.shape)
