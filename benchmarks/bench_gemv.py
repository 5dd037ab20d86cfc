"""The native sparse MatMul kernels (ai.sparse_deploy ops) against ONNX Runtime's dense kernels, one layer.

    python benchmarks/bench_gemv.py [--shapes 4096x4096,11008x4096,4096x11008] [--sparsity 0.5] [--batches 1,128]
                                    [--threads 1,2] [--rounds 15] [--calls 10] [--isa amx|avx512|avx2|portable]
                                    [--json PATH] [--quick]

Shapes are rows x cols of the weight W (out x in, as nn.Linear stores it); Y[M, rows] = X[M, cols] @ W^T. Each
(shape, batch, threads) builds one-node ONNX Runtime sessions:
  ort-fp32  MatMul with the dense fp32 weight
  ort-int8  quantize_dynamic (per-channel symmetric int8 weights, uint8 activations; reduce_range where the CPU
            has no VNNI, so the u8s8 kernel cannot saturate)
  ort-int4  MatMulNBits, block 32, symmetric, accuracy level 4 (int8 activations)
  sparse    SparseMatMul (fp32 values) and SparseMatMulInt8 (int8 values, per-row scales) over the same pruned W
All sessions run in interleaved rounds (each round: one warm-up call, then --calls timed calls of each session,
through IO binding with preallocated outputs); a figure is the median of all timed calls of that session. With
one thread a call is timed in the calling thread's CPU time (ONNX Runtime computes on that thread), which a busy
shared machine does not inflate; with more threads, in wall time. The
weights are random with the given fraction of zeros. GB/s = bytes the kernel must read (values, masks, offsets,
scales) / time; `read GB/s` is numpy summing a 1 GiB array on one thread, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import common  # noqa: F401  (puts the checkout first on sys.path)
from sparse_deploy.runtime import kernels  # noqa: E402

DEFAULT_SHAPES = "4096x4096,11008x4096,4096x11008"
OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid(kernels.DOMAIN, 1), helper.make_opsetid("com.microsoft", 1)]


@dataclass(frozen=True)
class Timing:
    rows: int
    cols: int
    dtype: str  # fp32 | int8: the sparse op's value type
    sparsity: float
    batch: int
    threads: int
    baseline: str  # ort-fp32 | ort-int8 | ort-int4
    baseline_ms: float
    sparse_ms: float
    isa: str
    clock: str  # thread-cpu (1 thread) or wall
    sparse_gb_s: float  # bytes of the sparse weight / sparse time

    @property
    def speedup(self) -> float:
        return self.baseline_ms / self.sparse_ms


def cpu_description() -> tuple[str, list[str]]:
    model, flags = platform.processor() or "unknown", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown", ""):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vbmi2", "avx512_vnni", "avx_vnni", "amx_int8")
    return model, [f for f in wanted if f in flags]


def _model(nodes, inits, k: int, n: int) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], inits)
    return helper.make_model(graph, opset_imports=OPSETS, ir_version=10)


def dense_model(w: np.ndarray) -> onnx.ModelProto:
    n, k = w.shape
    init = numpy_helper.from_array(np.ascontiguousarray(w.T), "W")
    return _model([helper.make_node("MatMul", ["X", "W"], ["Y"], name="matmul")], [init], k, n)


def int8_model(dense: onnx.ModelProto, vnni: bool, tmp: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = tmp / "dense.onnx", tmp / "int8.onnx"
    onnx.save(dense, src)
    quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=not vnni,
                     weight_type=QuantType.QInt8, extra_options={"WeightSymmetric": True, "MatMulConstBOnly": True})
    return onnx.load(dst)


def int4_model(w: np.ndarray, block: int = 32) -> onnx.ModelProto:
    """com.microsoft MatMulNBits: 4-bit symmetric blocks of 32 along K (zero point 8), accuracy level 4."""
    n, k = w.shape
    blocks = -(-k // block)
    padded = np.zeros((n, blocks * block), np.float32)
    padded[:, :k] = w
    grouped = padded.reshape(n, blocks, block)
    scale = np.abs(grouped).max(axis=2) / 7
    safe = np.where(scale > 0, scale, 1)[..., None]
    q = (np.clip(np.rint(grouped / safe), -8, 7) + 8).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)  # element 2i in the low nibble
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scale.astype(np.float32).reshape(-1), "S")]
    node = helper.make_node("MatMulNBits", ["X", "B", "S"], ["Y"], domain="com.microsoft", name="matmul_nbits",
                            K=k, N=n, bits=4, block_size=block, accuracy_level=4)
    return _model([node], inits, k, n)


def sparse_model(packed: kernels.KernelWeights) -> onnx.ModelProto:
    n, k = packed.shape
    names = ["mask", "values", "row_ptr"] + (["scale"] if packed.scale is not None else [])
    inits = [numpy_helper.from_array(a, nm) for nm, a in zip(names, packed.inputs())]
    return _model([helper.make_node(packed.op_type, ["X", *names], ["Y"], domain=kernels.DOMAIN, name="sparse")],
                  inits, k, n)


class Runner:
    """One session with its input bound and its output preallocated, so a call times the kernel, not Python."""

    def __init__(self, model: onnx.ModelProto, x: np.ndarray, n: int, threads: int, sparse: bool):
        # One intra-op thread computes on the calling thread, so its CPU time is the kernel's time without the
        # stretches when a busy machine schedules it out; with more threads only wall time is meaningful.
        self.clock = time.thread_time if threads == 1 else time.perf_counter
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # The runners take turns; a pool spinning after its calls would take a core from the next runner's calls.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if sparse:
            kernels.register(options)
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.y = np.empty((x.shape[0], n), np.float32)
        self.binding = self.session.io_binding()
        self.binding.bind_cpu_input("X", x)
        self.binding.bind_output("Y", "cpu", 0, np.float32, list(self.y.shape), self.y.ctypes.data)
        self.times: list[float] = []

    def call(self) -> float:
        start = self.clock()
        self.session.run_with_iobinding(self.binding)
        return self.clock() - start

    def round(self, calls: int) -> None:
        self.call()
        self.times.extend(self.call() for _ in range(calls))

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times) * 1e3


def read_bandwidth_gb_s() -> float:
    a = np.ones(1 << 28, np.float32)  # 1 GiB
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - start)
    return a.nbytes / best / 1e9


def bench_shape(rows: int, cols: int, sparsity: float, batch: int, threads: int, rounds: int, calls: int,
                vnni: bool, isa: str, tmp: Path) -> list[Timing]:
    rng = np.random.default_rng(rows * 7 + cols)
    w = rng.standard_normal((rows, cols), dtype=np.float32)
    w[rng.random((rows, cols), dtype=np.float32) < sparsity] = 0
    x = rng.standard_normal((batch, cols), dtype=np.float32)
    dense = dense_model(w)
    packed32, packed8 = kernels.pack_rows(w), kernels.pack_rows_int8(w)
    runners = {
        "ort-fp32": Runner(dense, x, rows, threads, False),
        "ort-int8": Runner(int8_model(dense, vnni, tmp), x, rows, threads, False),
        "ort-int4": Runner(int4_model(w), x, rows, threads, False),
        "fp32": Runner(sparse_model(packed32), x, rows, threads, True),
        "int8": Runner(sparse_model(packed8), x, rows, threads, True),
    }
    reference = x @ w.T
    for name in ("fp32", "int8"):
        runners[name].call()
        err = np.abs(runners[name].y - reference).max() / np.abs(reference).max()
        if err > (1e-5 if name == "fp32" else 0.05):
            raise SystemExit(f"sparse {name} {rows}x{cols} disagrees with numpy: relative error {err:.2g}")
    for _ in range(rounds):
        for runner in runners.values():
            runner.round(calls)
    out = []
    for dtype, baseline in (("fp32", "ort-fp32"), ("int8", "ort-int8"), ("int8", "ort-int4")):
        sparse_ms = runners[dtype].median_ms
        nbytes = (packed32 if dtype == "fp32" else packed8).nbytes
        out.append(Timing(rows, cols, dtype, sparsity, batch, threads, baseline, runners[baseline].median_ms,
                          sparse_ms, isa, "thread-cpu" if threads == 1 else "wall", nbytes / sparse_ms / 1e6))
    return out


def main(argv: list[str] | None = None) -> list[Timing]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--batches", default="1,128")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--isa", choices=kernels.ISAS, help="force a kernel path (default: the best this CPU has)")
    parser.add_argument("--json", type=Path, help="write the figures here as a list of objects")
    parser.add_argument("--quick", action="store_true", help="one shape, batch 1, few rounds: a smoke run")
    args = parser.parse_args(argv)
    if args.isa:
        os.environ[kernels.ISA_ENV] = args.isa
    state = kernels.availability()
    if not state.ok:
        raise SystemExit(f"sparse kernels unavailable: {state.reason}")
    if args.quick:
        args.shapes, args.batches, args.rounds, args.calls = "4096x4096", "1", 3, 5
    model, flags = cpu_description()
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    isa = kernels.isa()
    print(f"CPU: {model}, {len(os.sched_getaffinity(0))} cores; flags: {' '.join(flags)}")
    print(f"onnxruntime {ort.__version__}; sparse path: {isa}; read GB/s (numpy, 1 thread): "
          f"{read_bandwidth_gb_s():.1f}; sparsity {args.sparsity}")
    print(f"{'shape':>11} {'M':>4} {'thr':>3} {'dtype':>5} {'baseline':>8} {'base ms':>8} {'sparse ms':>9} "
          f"{'speedup':>7} {'GB/s':>6}")
    results: list[Timing] = []
    with tempfile.TemporaryDirectory(prefix="bench_gemv_") as tmp:
        for shape in args.shapes.split(","):
            rows, cols = map(int, shape.split("x"))
            for batch in map(int, args.batches.split(",")):
                for threads in map(int, args.threads.split(",")):
                    for t in bench_shape(rows, cols, args.sparsity, batch, threads, args.rounds, args.calls, vnni,
                                         isa, Path(tmp)):
                        results.append(t)
                        print(f"{shape:>11} {batch:>4} {threads:>3} {t.dtype:>5} {t.baseline:>8} "
                              f"{t.baseline_ms:8.3f} {t.sparse_ms:9.3f} {t.speedup:6.2f}x {t.sparse_gb_s:6.1f}",
                              flush=True)
    if args.json:
        args.json.write_text(json.dumps([asdict(t) for t in results], indent=1))
    return results


if __name__ == "__main__":
    main()
