"""Sparse matrix-vector kernels against ONNX Runtime's dense MatMul, and the cost of the hybrid design.

    python benchmarks/bench_gemv.py [--shapes 4096x11008,...] [--sparsities 0.5,0.6,0.7] [--batches 1,4]
                                    [--dtypes fp32,bf16,int8] [--threads N] [--rounds 5] [--cold] [--json PATH]
                                    [--no-hybrid] [--quick]

For each shape, batch and value type, the dense baseline and every kernel run in interleaved rounds (a warm-up
call, then timed calls, per round); the figure is the median of all timed calls, with p90 beside it. The same
matrix is multiplied again and again, so a weight smaller than this CPU's share of the L3 cache (up to ~64 MB
here) is read from L3 rather than memory. --cold reads 384 MiB of other data before every timed call, so each
call streams its weight from memory, as one token of a model larger than the cache does.
dense: fp32 is a one-node ONNX Runtime MatMul session; int8 is ONNX Runtime's DynamicQuantizeMatMul with the
same per-row weight scales (it also quantizes x to uint8 per call); bf16 has no ONNX Runtime CPU MatMul
(NOT_IMPLEMENTED), so its dense counterpart is this package's dense bf16 kernel. ort_fp32_ms is always there.
GB/s = bytes of the encoded weight (values, masks, offsets, scales) / time; copy GB/s (bytes read + written by
a numpy copy of 512 MiB) and read GB/s (a numba read of 1 GiB on the benchmark's threads) are measured in
the same run. Sparse weights are random with the given fraction of zeros, or 2:4 by magnitude.

hybrid: decoder-like blocks (LayerNorm, d x d MatMul, residual, LayerNorm, d x 4d MatMul, Gelu, 4d x d MatMul,
residual) as one ONNX Runtime session, against the same graph cut into ONNX Runtime segments at each MatMul,
with the MatMuls done by gemv in between. At d = 64 the MatMuls cost next to nothing, so (hybrid - full) /
MatMuls is the time each boundary adds: one more session run, the gemv call, the hand-over of the arrays.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass

import numba
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from sparse_deploy.kernels import decode, encode, gemv, quantize
from sparse_deploy.kernels._simd import prefetch, vadd, vload, vsum, vzero
from sparse_deploy.machine import machine_info

DEFAULT_SHAPES = "768x768,3072x768,768x3072,4096x4096,11008x4096,4096x11008"
# the hybrid's ONNX Runtime segments (LayerNorm, Gelu, Add on one token) run on one thread without spinning:
# too small to split; with 2 intra-op threads, a second pool waking and sleeping beside numba's made each
# boundary cost 190-220 us instead of 33-61 us (d = 64, 2 threads)
SEGMENT_THREADS = 1


@dataclass(frozen=True)
class GemvTiming:
    rows: int
    cols: int
    format: str
    dtype: str
    sparsity: float | str  # fraction of zeros, or "2:4"
    batch: int
    dense_ms: float
    sparse_ms: float
    dense_impl: str
    ort_fp32_ms: float
    dense_p90_ms: float
    sparse_p90_ms: float
    sparse_bytes: int
    dense_bytes: int
    threads: int

    @property
    def sparse_gbps(self) -> float:
        return self.sparse_bytes / self.sparse_ms / 1e6

    @property
    def dense_gbps(self) -> float:
        return self.dense_bytes / self.dense_ms / 1e6


@dataclass(frozen=True)
class HybridTiming:
    d: int
    blocks: int
    boundaries: int  # MatMuls taken out of ONNX Runtime
    kernel: str
    full_ms: float  # one ONNX Runtime session
    hybrid_ms: float  # ONNX Runtime segments + gemv
    segment_run_us: float  # one session.run of a one-LayerNorm segment
    gemv_call_us: float  # one gemv of the first d x d matrix (dense fp32)

    @property
    def us_per_boundary(self) -> float:
        return (self.hybrid_ms - self.full_ms) * 1e3 / self.boundaries


def timed(fns: dict[str, callable], rounds: int, budget_s: float, evict=None) -> dict[str, list[float]]:
    """Interleaved rounds: per round and function one warm-up call then timed calls; seconds per call. evict,
    when given, runs untimed before every timed call."""
    runs = {}
    for name, fn in fns.items():  # calls per round from one probe, so each function gets ~budget_s in all
        fn()
        start = time.perf_counter()
        fn()
        per_round = budget_s / rounds / max(time.perf_counter() - start, 1e-6)
        runs[name] = int(min(200 if evict is None else 6, max(5, per_round)))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            time.sleep(0.02)  # let the previous function's idle threads stop spinning
            fn()
            for _ in range(runs[name]):
                if evict is not None:
                    evict()
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return times


def median_ms(ts: list[float]) -> float:
    return statistics.median(ts) * 1e3


def p90_ms(ts: list[float]) -> float:
    return float(np.percentile(ts, 90)) * 1e3


def session(model, threads: int, spinning: bool = True) -> ort.InferenceSession:
    """An ONNX Runtime CPU session. spinning (ORT's default) keeps idle pool threads busy-waiting for a while
    after each run, which slows whatever runs next on the other vCPU: timed() pauses before switching functions,
    and the hybrid's segments run without it."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def model(nodes, inits, inputs, outputs, opsets=(("", 20),)):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets], ir_version=10)


def ort_dense(W: np.ndarray, dtype: str, threads: int, spinning: bool = True):
    """y = x · Wᵀ as ONNX Runtime runs it: MatMul (fp32) or DynamicQuantizeMatMul with per-row scales (int8)."""
    rows, cols = W.shape
    io = ([helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, cols])],
          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, rows])])
    if dtype == "fp32":
        m = model([helper.make_node("MatMul", ["x", "W"], ["y"])],
                  [numpy_helper.from_array(np.ascontiguousarray(W.T), "W")], *io)
    else:
        q, scales = quantize(W, "int8")
        m = model([helper.make_node("DynamicQuantizeMatMul", ["x", "B", "s", "z"], ["y"], domain="com.microsoft")],
                  [numpy_helper.from_array(np.ascontiguousarray(q.T), "B"), numpy_helper.from_array(scales, "s"),
                   numpy_helper.from_array(np.zeros(rows, np.int8), "z")], *io, opsets=(("", 20), ("com.microsoft", 1)))
    return session(m, threads, spinning)


def pruned(rows: int, cols: int, sparsity: float | str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(cols**-0.5)
    if sparsity == "2:4":  # the two smallest magnitudes of each aligned group of four
        groups = W.reshape(rows, -1, 4)
        np.put_along_axis(groups, np.argsort(np.abs(groups), axis=2)[:, :, :2], 0, axis=2)
    else:
        W[rng.random(W.shape, dtype=np.float32) < sparsity] = 0
    return W


@numba.njit(parallel=True, cache=True, nogil=True)
def _read_all(a, parts):  # pragma: no cover - compiled
    """Sum of a float32 array, read once (4 accumulators per thread, the kernels' 16 KiB prefetch lead)."""
    n = a.size // parts // 64 * 64
    sums = np.zeros(parts, np.float32)
    for t in numba.prange(parts):
        z = vzero()
        s0, s1, s2, s3 = z, z, z, z
        for i in range(t * n, (t + 1) * n, 64):
            prefetch(a, i + 4096)
            s0, s1 = vadd(s0, vload(a, i)), vadd(s1, vload(a, i + 16))
            s2, s3 = vadd(s2, vload(a, i + 32)), vadd(s3, vload(a, i + 48))
        sums[t] = vsum(vadd(vadd(s0, s1), vadd(s2, s3)))
    return sums.sum()


def bandwidth(threads: int) -> tuple[float, float]:
    """(copy GB/s of a numpy copy of 512 MiB, counting bytes read + written; read GB/s of 1 GiB on `threads`)."""
    src = np.ones(128 << 20, np.float32)
    dst = np.empty_like(src)
    copy = timed({"copy": lambda: np.copyto(dst, src)}, rounds=3, budget_s=1.5)["copy"]
    big = np.ones(256 << 20, np.float32)
    read = timed({"read": lambda: _read_all(big, threads)}, rounds=3, budget_s=1.5)["read"]
    return 2 * src.nbytes / statistics.median(copy) / 1e9, big.nbytes / statistics.median(read) / 1e9


def kernel_cases(sparsities: list[float], formats: list[str]) -> list[tuple[float | str, str]]:
    """(sparsity, format): unstructured sparsities in bitmask and CSR, 2:4 in its own format and in bitmask."""
    cases = [(s, f) for s in sparsities for f in formats if f in ("bitmask", "csr")]
    return cases + [("2:4", f) for f in formats if f in ("2:4", "bitmask")]


def bench_shape(rows: int, cols: int, args) -> list[GemvTiming]:
    results = []
    cases = kernel_cases(args.sparsities, args.formats)
    weights = {s: pruned(rows, cols, s, seed=rows + cols) for s in {s for s, _ in cases}}
    dense_W = weights[cases[0][0]]  # dense baselines multiply the first pruned matrix (zeros cost them nothing)
    ort_fp32 = ort_dense(dense_W, "fp32", args.threads, args.ort_spinning)
    rng = np.random.default_rng(1)
    for dtype in args.dtypes:
        mats = {case: encode(weights[case[0]], case[1], dtype) for case in cases}
        if dtype == "int8":
            base, impl = ort_dense(dense_W, "int8", args.threads, args.ort_spinning), "ort-dqmm-int8"
            base_bytes = dense_W.size + 8 * rows
        elif dtype == "bf16":
            base, impl = encode(dense_W, "dense", "bf16"), "kernels-dense-bf16"
            base_bytes = base.nbytes
        else:
            base, impl, base_bytes = ort_fp32, "ort-matmul-fp32", dense_W.nbytes
        for batch in args.batches:
            x = rng.standard_normal((batch, cols), dtype=np.float32)
            dense = (lambda: gemv(base, x)) if impl.startswith("kernels") else (lambda: base.run(["y"], {"x": x}))
            fns = {"ort_fp32": lambda: ort_fp32.run(["y"], {"x": x}), "dense": dense}
            for case, M in mats.items():
                fns[case] = lambda M=M: gemv(M, x)
            times = timed(fns, args.rounds, args.budget, args.evict)
            for (sparsity, fmt), M in mats.items():
                results.append(GemvTiming(rows, cols, fmt, dtype, sparsity, batch, median_ms(times["dense"]),
                                          median_ms(times[(sparsity, fmt)]), impl, median_ms(times["ort_fp32"]),
                                          p90_ms(times["dense"]), p90_ms(times[(sparsity, fmt)]), M.nbytes,
                                          base_bytes, args.threads))
        del mats
    return results


def check_kernels(rows: int = 96, cols: int = 200) -> None:
    """Every benchmarked kernel equals the dense product here before anything is timed."""
    x = np.random.default_rng(2).standard_normal((3, cols), dtype=np.float32)
    for sparsity, fmt in kernel_cases([0.5], ["bitmask", "2:4", "csr", "dense"]) + [(0.5, "dense")]:
        for dtype in ("fp32", "bf16", "int8"):
            M = encode(pruned(rows, cols, sparsity), fmt, dtype)
            ref = x.astype(np.float64) @ decode(M).T
            tol = 0.03 if dtype == "int8" else 1e-5  # int8 multiplies x rounded to uint8
            if np.abs(gemv(M, x) - ref).max() > tol * np.abs(ref).max():
                raise SystemExit(f"{fmt} {dtype}: kernel disagrees with the dense product")


def decoder_blocks(d: int, blocks: int, seed: int = 0):
    """(ModelProto of `blocks` decoder-like blocks on x [1, d], {MatMul output: (input, W [out, in])})."""
    rng = np.random.default_rng(seed)
    nodes, inits, matmuls = [], [], {}
    inits += [numpy_helper.from_array(np.full(d, v, np.float32), n) for n, v in (("g", 1.0), ("b", 0.0))]
    h = "x"
    for i in range(blocks):
        def mm(src, n_in, n_out, name):
            W = pruned(n_out, n_in, 0.5, seed=rng.integers(1 << 30))
            inits.append(numpy_helper.from_array(np.ascontiguousarray(W.T), f"{name}_w"))
            nodes.append(helper.make_node("MatMul", [src, f"{name}_w"], [name]))
            matmuls[name] = (src, W)
            return name
        nodes.append(helper.make_node("LayerNormalization", [h, "g", "b"], [f"ln1_{i}"]))
        nodes.append(helper.make_node("Add", [h, mm(f"ln1_{i}", d, d, f"attn_{i}")], [f"h1_{i}"]))
        nodes.append(helper.make_node("LayerNormalization", [f"h1_{i}", "g", "b"], [f"ln2_{i}"]))
        nodes.append(helper.make_node("Gelu", [mm(f"ln2_{i}", d, 4 * d, f"up_{i}")], [f"act_{i}"]))
        nodes.append(helper.make_node("Add", [f"h1_{i}", mm(f"act_{i}", 4 * d, d, f"down_{i}")], [f"h_{i}"]))
        h = f"h_{i}"
    io = ([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, d])],
          [helper.make_tensor_value_info(h, TensorProto.FLOAT, [1, d])])
    return model(nodes, inits, *io), matmuls


def split_at_matmuls(m, matmuls: dict) -> list[tuple[str, object]]:
    """The graph as steps: ("ort", (sub-model, inputs, outputs)) for each run of non-MatMul nodes, ("gemv", name)
    for each MatMul in `matmuls`. A segment's inputs/outputs are the tensors crossing its edges."""
    nodes = list(m.graph.node)
    consumers = {n: i for i, node in enumerate(nodes) for n in node.input}  # last reader of each tensor
    final = m.graph.output[0].name
    weights = {t.name: t for t in m.graph.initializer}
    steps, run = [], []

    def close():
        if not run:
            return
        made = {o for node in run for o in node.output}
        read = {n for node in run for n in node.input}
        ins = sorted(n for n in read if n not in made and n not in weights)
        last = nodes.index(run[-1])
        outs = sorted(o for o in made if o == final or consumers.get(o, -1) > last)
        sub = model(run, [weights[n] for n in sorted(read & weights.keys())],
                    [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ins],
                    [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outs])
        steps.append(("ort", (sub, ins, outs)))
        run.clear()

    for node in nodes:
        if node.op_type == "MatMul" and node.output[0] in matmuls:
            close()
            steps.append(("gemv", node.output[0]))
        else:
            run.append(node)
    close()
    return steps


def bench_hybrid(d: int, blocks: int, threads: int, rounds: int, budget: float) -> list[HybridTiming]:
    full_model, matmuls = decoder_blocks(d, blocks)
    full = session(full_model, threads)
    steps = [(kind, (session(s[0], SEGMENT_THREADS, spinning=False), s[1], s[2]) if kind == "ort" else s)
             for kind, s in split_at_matmuls(full_model, matmuls)]
    x = np.random.default_rng(3).standard_normal((1, d), dtype=np.float32)
    final = full_model.graph.output[0].name
    expected = full.run([final], {"x": x})[0]

    def hybrid(mats):
        env = {"x": x}
        for kind, step in steps:
            if kind == "gemv":
                env[step] = gemv(mats[step], env[matmuls[step][0]])
            else:
                sess, ins, outs = step
                env.update(zip(outs, sess.run(outs, {n: env[n] for n in ins})))
        return env[final]

    kernels = {fmt: {name: encode(W, fmt, "fp32") for name, (_, W) in matmuls.items()} for fmt in ("dense", "bitmask")}
    for fmt, mats in kernels.items():
        if not np.allclose(hybrid(mats), expected, rtol=1e-3, atol=1e-3):
            raise SystemExit(f"hybrid ({fmt}) disagrees with the single ONNX Runtime session")
    sess, ins, outs = next(step for kind, step in steps if kind == "ort")  # a LayerNorm segment
    first, (src, _) = next(iter(matmuls.items()))
    feed = {n: x for n in ins}
    fns = {"full": lambda: full.run([final], {"x": x}), "segment": lambda: sess.run(outs, feed),
           "gemv": lambda: gemv(kernels["dense"][first], x)}
    fns.update({fmt: (lambda mats=mats: hybrid(mats)) for fmt, mats in kernels.items()})
    times = timed(fns, rounds, budget)
    return [HybridTiming(d, blocks, len(matmuls), f"{fmt}-fp32", median_ms(times["full"]), median_ms(times[fmt]),
                         median_ms(times["segment"]) * 1e3, median_ms(times["gemv"]) * 1e3) for fmt in kernels]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="rows x cols, comma separated")
    p.add_argument("--sparsities", default="0.5,0.6,0.7", help="unstructured fractions of zeros (2:4 is added)")
    p.add_argument("--formats", default="bitmask,2:4,csr")
    p.add_argument("--dtypes", default="fp32,bf16,int8")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS, help="numba and ONNX Runtime")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per measurement")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timed calls per function and case")
    p.add_argument("--no-ort-spinning", dest="ort_spinning", action="store_false",
                   help="ONNX Runtime's idle pool threads sleep instead of spinning")
    p.add_argument("--cold", action="store_true", help="evict the caches (read 384 MiB) before every timed call")
    p.add_argument("--json", default=None, help="write the measurements as a JSON list here")
    p.add_argument("--no-hybrid", action="store_true")
    p.add_argument("--quick", action="store_true", help="2 rounds, 0.2 s per function: a smoke run")
    args = p.parse_args()
    args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    args.sparsities = [float(s) for s in args.sparsities.split(",") if s]
    args.formats, args.dtypes = args.formats.split(","), args.dtypes.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.quick:
        args.rounds, args.budget = 2, 0.2
    return args


def main() -> None:
    args = parse_args()
    # numba's OpenMP workers sleep between calls instead of spinning: on these 2-vCPU VMs, shared with other
    # work, the default spin-then-sleep policy measured 5-10x slower calls at 2 threads (a worker waiting for
    # its core); set OMP_WAIT_POLICY yourself to override
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    numba.set_num_threads(args.threads)
    check_kernels()
    copy_gbps, read_gbps = bandwidth(args.threads)
    filler = np.ones(96 << 20, np.float32)  # 384 MiB, more than the 260 MB L3 of the host CPU
    args.evict = (lambda: _read_all(filler, args.threads)) if args.cold else None
    print(f"# {machine_info(('numba', 'onnxruntime', 'numpy')).describe()}; {args.threads} threads "
          f"(numba {numba.threading_layer()} with OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, ONNX Runtime "
          f"intra-op, spinning {'on' if args.ort_spinning else 'off'}); copy {copy_gbps:.1f} GB/s "
          f"(read + write, 1 thread), read {read_gbps:.1f} GB/s ({args.threads} threads); "
          f"{'cold: caches evicted before each call' if args.cold else 'warm: weights may sit in L3'}")
    print(f"{'shape':>12} {'sparsity':>8} {'format':>7} {'dtype':>5} {'b':>2} {'dense_ms':>9} {'(dense impl)':>19} "
          f"{'sparse_ms':>9} {'p90':>7} {'GB/s':>5} {'%copy':>5} {'dense/sparse':>12} {'ortfp32/sparse':>14}")
    results = []
    for rows, cols in args.shapes:
        for t in bench_shape(rows, cols, args):
            results.append(t)
            print(f"{rows:>6}x{cols:<5} {t.sparsity!s:>8} {t.format:>7} {t.dtype:>5} {t.batch:>2} {t.dense_ms:9.3f} "
                  f"{t.dense_impl:>19} {t.sparse_ms:9.3f} {t.sparse_p90_ms:7.3f} {t.sparse_gbps:5.1f} "
                  f"{100 * t.sparse_gbps / copy_gbps:4.0f}% {t.dense_ms / t.sparse_ms:11.2f}x "
                  f"{t.ort_fp32_ms / t.sparse_ms:13.2f}x", flush=True)
    hybrid = []
    if not args.no_hybrid:
        for d in (64, 768):
            hybrid += bench_hybrid(d, 4, args.threads, args.rounds, args.budget)
        for h in hybrid:
            print(f"# hybrid d={h.d}, {h.blocks} blocks, {h.boundaries} MatMuls by {h.kernel}: one session "
                  f"{h.full_ms:.3f} ms, segments + gemv {h.hybrid_ms:.3f} ms, {h.us_per_boundary:+.1f} us per boundary "
                  f"(a LayerNorm segment's run {h.segment_run_us:.1f} us, a {h.d}x{h.d} gemv {h.gemv_call_us:.1f} us)")
    if args.json:
        extra = {"copy_gbps": copy_gbps, "read_gbps": read_gbps, "cold": args.cold}
        rows = [{**asdict(t), "sparse_gbps": t.sparse_gbps, "dense_gbps": t.dense_gbps, **extra} for t in results]
        rows += [{"rows": h.d, "cols": h.d, "format": f"hybrid-{h.kernel}", "dtype": "fp32", "sparsity": 0.5,
                  "batch": 1, "dense_ms": h.full_ms, "sparse_ms": h.hybrid_ms, **asdict(h),
                  "us_per_boundary": h.us_per_boundary, "threads": args.threads} for h in hybrid]
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
