"""Which packed layers run on the native sparse kernels: ``SessionConfig.kernels`` = auto | sparse | dense.

``sparse`` puts every packed layer the ops cover on a sparse node, ``dense`` none. ``auto`` (the default) keeps a
sparse node only where it is faster on this CPU: for each distinct layer (shape, dtype, sparsity to the nearest
5%) it times ONNX Runtime's dense kernel against the sparse op on models with random weights of that pattern
(enough copies of the layer that its weights stream from memory, as a whole model's do at each step), runs of
the two interleaved, at M = 1 (a decode step) and M = ``PREFILL_M`` (a prompt), and keeps the
sparse op when it is faster at M = 1 and the reference generation (a ``PREFILL_M``-token prompt, then
``DECODE_STEPS`` tokens) takes less time with it, both by ``MARGIN`` (5%): by the fastest runs, by the median of
the paired runs' sparse / dense ratios, and by their upper quartile (three pairs in four agree), so that noise in
the timing (a busy machine, a thread waking late) can only cost the gain, never make a layer slower than dense.
A layer's node serves every M, so a layer whose decode gain outweighs a slower prompt is kept sparse (prefill can
then be slower than dense); one that loses at M = 1 never is. An encoder runs every layer on all tokens at once, so
for an encoder the layer is timed at M = ``PREFILL_M`` only and kept sparse where it wins there (``encoder=True``;
its timings are cached under their own keys). The dense kernel is ORT's fp32 MatMul for fp32 layers and its dynamically quantized int8 MatMul for int8 layers, the kernels the layer would otherwise run on.
Timings are kept in a small JSON table per CPU model, ISA path, thread count, ONNX Runtime version and library
build, under the user cache folder ($SPARSE_DEPLOY_CACHE, else $XDG_CACHE_HOME/sparse-deploy, else
~/.cache/sparse-deploy), so each shape is timed once per machine.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from sparse_deploy.config import KERNEL_MODES
from sparse_deploy.errors import ConfigError
from sparse_deploy.formats.packed import Stored
from sparse_deploy.machine import user_cache_dir as cache_dir
from sparse_deploy.runtime.sparse_ops import DOMAIN, OP_INT8, Site

KernelMode = Literal["auto", "sparse", "dense"]
PREFILL_M = 128
DECODE_STEPS = 64  # the reference generation: a PREFILL_M-token prompt, then this many tokens
TABLE_NAME = "kernel-choice.json"
_WARMUP, _REPEATS = 2, 21
_MIN_PAIRS = {1: 7, PREFILL_M: 3}  # interleaved dense/sparse pairs timed at least, per M
_BUDGET_S = 0.25  # per kernel and M: stop repeating once this much time was spent (after the minimum pairs)
MARGIN = 0.05  # the sparse op must be this much faster than dense (M = 1 and the reference generation)
# A model's layers stream from memory at every decode step; one layer timed alone would sit in the last-level cache
# and favour the dense kernel. The timed graph therefore holds enough copies of the layer (rows rolled, so no two
# are equal) to pass this many bytes of dense weights, and each copy counts as one run of the layer.
STREAM_BYTES = 96 << 20
_MAX_COPIES = 8  # bounds the timing graphs of small layers (memory and session setup at first load)


def check_mode(mode: str) -> None:
    if mode not in KERNEL_MODES:
        raise ConfigError(f"kernels must be one of {', '.join(KERNEL_MODES)}, got {mode!r}")


@dataclass(frozen=True)
class Timing:
    """Milliseconds (fastest of interleaved runs) of one layer pattern at M = 1 and M = PREFILL_M; ``ratio``: the
    median over interleaved pairs of sparse / dense run time (None in tables written before it was recorded);
    ``noisy``: the medians favour the sparse op but the upper quartiles of the ratios do not (the layer then stays
    dense)."""

    dense_ms: tuple[float, float]
    sparse_ms: tuple[float, float]
    ratio: tuple[float, float] | None = None
    noisy: bool = False

    @property
    def sparse_wins(self) -> bool:
        """Sparse by a margin at M = 1 and over the reference generation, by the fastest runs, by the median pair
        and by the upper quartile of the pairs (``noisy`` otherwise), so that neither a lucky run nor a slow spell
        of the machine decides."""
        if self.noisy:
            return False
        (d1, dm), (s1, sm), limit = self.dense_ms, self.sparse_ms, 1 - MARGIN
        dense = dm + DECODE_STEPS * d1
        if s1 > limit * d1 or sm + DECODE_STEPS * s1 > limit * dense:
            return False
        if self.ratio is not None:
            r1, rm = self.ratio
            return r1 <= limit and rm * dm + DECODE_STEPS * r1 * d1 <= limit * dense
        return True


@dataclass
class Choice:
    """What a session chose: the mode, the layers on sparse nodes and those left dense, and why."""

    mode: str
    isa: str | None = None
    sparse: list[str] = field(default_factory=list)
    dense: list[str] = field(default_factory=list)
    timings: dict[str, Timing] = field(default_factory=dict)  # pattern key -> timing (auto)
    reason: str = ""  # why no sparse kernels ran, when none did
    timed: int = 0  # layer patterns timed by this load (the others came from the cached table)

    def to_json(self) -> dict:
        return {"mode": self.mode, "isa": self.isa, "sparse_layers": len(self.sparse), "dense_layers": len(self.dense),
                "timed_shapes": self.timed,
                "reason": self.reason}


def pattern_key(site: Site, encoder: bool = False) -> str:
    n, k = site.shape
    return f"{'encoder ' if encoder else ''}{site.dtype} {n}x{k} s{round(site.sparsity * 20) * 5:02d}"


class TimingTable:
    """The cached timings of one machine setting (CPU, ISA, threads, ONNX Runtime, library build)."""

    def __init__(self, setting: str, path: Path | None = None):
        self.setting = setting
        self.path = path or cache_dir() / TABLE_NAME
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        self._all = data if isinstance(data, dict) else {}
        entries = self._all.get(setting, {})
        self.entries: dict[str, Timing] = {}
        for key, value in (entries.items() if isinstance(entries, dict) else ()):
            try:
                ratio = value.get("ratio")
                self.entries[key] = Timing(tuple(value["dense_ms"]), tuple(value["sparse_ms"]),
                                           tuple(ratio) if ratio else None, bool(value.get("noisy", False)))
            except (KeyError, TypeError, AttributeError):
                continue

    def save(self) -> None:
        self._all[self.setting] = {k: {"dense_ms": list(t.dense_ms), "sparse_ms": list(t.sparse_ms),
                                       "ratio": list(t.ratio) if t.ratio else None, "noisy": t.noisy}
                                   for k, t in self.entries.items()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(self._all, indent=1) + "\n", encoding="utf-8")
            tmp.replace(self.path)
        except OSError:
            pass  # a read-only home: the choice is timed again next time


def setting_key(isa: str, threads: int | None, library: Path) -> str:
    import onnxruntime as ort

    from sparse_deploy.machine import cpu_model

    try:
        stat = library.stat()
        build = f"{stat.st_size}-{int(stat.st_mtime)}"
    except OSError:
        build = "?"
    return f"{cpu_model()} | {isa} | threads {threads or 'default'} | ort {ort.__version__} | lib {build}"


def chooser(mode: str, choice: Choice, time_site: Callable[[Site], Timing], table: TimingTable | None,
            encoder: bool = False) -> Callable[[Site], bool]:
    """The ``keep`` predicate for ``sparse_ops.rewrite``: records each decision in ``choice`` (``encoder``: the
    timings are an encoder's, see ``measure``)."""

    def keep(site: Site) -> bool:
        if mode == "sparse":
            sparse = True
        elif mode == "dense":
            sparse = False
        else:
            key = pattern_key(site, encoder)
            timing = choice.timings.get(key) or (table.entries.get(key) if table else None)
            if timing is None:
                timing = time_site(site)
                choice.timed += 1
                if table is not None:
                    table.entries[key] = timing
            choice.timings[key] = timing
            sparse = timing.sparse_wins
        (choice.sparse if sparse else choice.dense).append(site.weight)
        return sparse

    return keep


def _random_pattern(site: Site, rng: np.random.Generator) -> np.ndarray:
    n, k = site.shape
    w = rng.standard_normal((n, k), dtype=np.float32)
    w[rng.random((n, k)) < site.sparsity] = 0
    return w


def packer(native) -> Callable[[Site, np.ndarray, np.ndarray | None], list[np.ndarray]]:
    """``rewrite``'s ``pack``: the native module's row packing of W [N, K] (int8 W with its per-row scale; stored
    fp32 chunks repacked without decoding)."""

    def pack(site: Site, weight, scale: np.ndarray | None) -> list[np.ndarray]:
        if isinstance(weight, Stored):  # as the file stores it ([K, N] when transposed): never decoded
            return native.pack_bits(weight.mask_bits(), weight.nonzeros(), weight.shape, transpose=site.transpose,
                                    scale=scale).inputs()
        if site.op == OP_INT8:
            return native.pack_rows_int8(weight, scale).inputs()
        return native.pack_rows(weight).inputs()

    return pack


def measure(site: Site, native, threads: int | None, encoder: bool = False) -> Timing:
    """Time the dense and the sparse kernel on models of this layer's pattern (random weights), each holding
    ``copies`` nodes of the layer with their own weights, so that the weights stream from memory as in a model.
    The weights reach ONNX Runtime as arrays it uses in place (no copy in a proto), and are freed on return.
    ``encoder``: timed at M = PREFILL_M only, as an encoder runs (the Timing then holds those figures for both M)."""
    import tempfile

    import onnxruntime as ort
    from onnx import TensorProto, helper

    from sparse_deploy.runtime.sparse_ops import _placeholder

    pack, register = packer(native), native.register
    rng = np.random.default_rng(0)
    n, k = site.shape
    w = _random_pattern(site, rng)
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])
    copies = max(1, min(_MAX_COPIES, -(-STREAM_BYTES // (n * k * 4))))
    if site.op == OP_INT8:
        q, scale = native.quantize_rows(w)  # [N, K] int8, [N]
        copy = lambda i: (np.roll(q, i, axis=0), np.roll(scale, i))  # noqa: E731
    else:
        copy = lambda i: (np.roll(w, i, axis=0), None)  # noqa: E731
    names = ["mask", "values", "row_ptr", "scale"]
    dense_nodes, dense_arrays, sparse_nodes, sparse_arrays = [], {}, [], {}
    for i in range(copies):
        wi, si = copy(i)
        dense_arrays[f"w{i}"] = np.ascontiguousarray(wi.T)
        if site.op == OP_INT8:
            dense_arrays |= {f"s{i}": si, f"z{i}": np.zeros(n, np.int8)}
            dense_nodes.append(helper.make_node("DynamicQuantizeMatMul", ["x", f"w{i}", f"s{i}", f"z{i}"], [f"y{i}"],
                                                domain="com.microsoft"))
        else:
            dense_nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]))
        parts = pack(site, wi, si)
        sparse_arrays |= {f"{name}{i}": part for part, name in zip(parts, names)}
        sparse_nodes.append(helper.make_node(site.op, ["x", *(f"{name}{i}" for name in names[: len(parts)])],
                                             [f"y{i}"], domain=DOMAIN))
    del w, copy
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1), helper.make_opsetid(DOMAIN, 1)]

    def session(nodes, arrays, folder: str) -> ort.InferenceSession:
        outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["m", n]) for i in range(copies)]
        inits = [_placeholder(name, array, "placeholder") for name, array in arrays.items()]
        graph = helper.make_graph(nodes, "layer", [x_info], outputs, inits)
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = 8
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # two sessions take turns: a pool spinning after its run would steal the other's cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if nodes[0].domain == DOMAIN:
            register(options)
        values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}
        for name, value in values.items():
            options.add_initializer(name, value)
        sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        sess._sparse_deploy_arrays = (values, arrays)  # used in place: they live as long as the session
        return sess

    limit = 1 - MARGIN
    first = PREFILL_M if encoder else 1  # the M that decides

    def paired(sessions, m: int) -> Paired:
        """Interleaved runs of the two sessions (which goes first alternates): the fastest run of each (on a shared
        machine other work only adds time, so the minimum is each kernel's own cost), and the median and upper
        quartile of the pairs' sparse / dense ratios (a slow spell hits both runs of a pair). At the M that decides,
        pairs that straddle the margin (quartiles on both sides of it) are repeated, up to 8x the time budget."""
        x = {"x": rng.standard_normal((m, k), dtype=np.float32)}
        for sess in sessions:
            for _ in range(_WARMUP if m == 1 else 1):
                sess.run(None, x)
        dense, sparse = [], []
        spent, straddle = 0.0, True
        least = _MIN_PAIRS[1] if m == first else _MIN_PAIRS[m]
        while len(dense) < _REPEATS and (len(dense) < least or spent < 2 * _BUDGET_S
                                         or (m == first and straddle and spent < 8 * _BUDGET_S)):
            pair = {}
            for sess in (sessions if len(dense) % 2 == 0 else sessions[::-1]):
                start = time.perf_counter()
                sess.run(None, x)
                pair[id(sess)] = time.perf_counter() - start
            dense.append(pair[id(sessions[0])])
            sparse.append(pair[id(sessions[1])])
            spent += dense[-1] + sparse[-1]
            q1, med, q3 = np.percentile(np.array(sparse) / np.array(dense), [25, 50, 75])
            straddle = q1 <= limit < q3
        return min(dense) * 1e3 / copies, min(sparse) * 1e3 / copies, float(med), float(q3)

    with tempfile.TemporaryDirectory(prefix="sparse-deploy-timing-") as folder:
        Path(folder, "placeholder").touch()  # what the placeholders name: ONNX Runtime checks it exists
        pair = (session(dense_nodes, dense_arrays, folder), session(sparse_nodes, sparse_arrays, folder))
    del dense_arrays, sparse_arrays
    try:
        if encoder:  # the same figures for both M: sparse_wins then asks for the margin at M = PREFILL_M
            dm, sm, rm, um = paired(pair, PREFILL_M)
            return Timing((dm, dm), (sm, sm), (rm, rm), noisy=_unsure((dm, sm, rm, um)))
        decode = paired(pair, 1)
        return judge(decode, paired(pair, PREFILL_M) if decode_favours_sparse(decode) else None)
    finally:
        del pair
        release_freed_memory()


Paired = tuple[float, float, float, float]  # fastest dense ms, fastest sparse ms, median and upper quartile of the
# pairs' sparse / dense ratios


def decode_favours_sparse(decode: Paired) -> bool:
    """Whether the decode step (M = 1) is faster on the sparse op by the margin: by the fastest runs, the median
    pair and the upper quartile of the pairs (only then is the prompt timed)."""
    d1, s1, r1, u1 = decode
    return max(s1 / d1, r1, u1) <= 1 - MARGIN


def _unsure(paired: Paired) -> bool:
    """The fastest runs and the median pair favour the sparse op by the margin, the upper quartile does not."""
    dense_ms, sparse_ms, median, upper = paired
    return max(sparse_ms / dense_ms, median) <= 1 - MARGIN < upper


def judge(decode: Paired, prefill: Paired | None) -> Timing:
    """One layer's ``Timing`` from its paired runs at M = 1 and, where the decode step favours sparse, at M =
    PREFILL_M; ``noisy`` where the fastest runs and the medians favour sparse and the upper quartiles do not."""
    d1, s1, r1, u1 = decode
    limit = 1 - MARGIN
    if prefill is None:
        return Timing((d1, d1), (s1, d1), (r1, 1.0), noisy=_unsure(decode))
    dm, sm, rm, um = prefill
    unsure = um * dm + DECODE_STEPS * u1 * d1 > limit * (dm + DECODE_STEPS * d1)  # the generation, by quartiles
    return Timing((d1, dm), (s1, sm), (r1, rm), unsure)


def release_freed_memory() -> None:
    """Give the C heap's free pages back to the system (glibc keeps freed blocks of up to 32 MB in its heap, so the
    timing graphs' weights would otherwise stay in the process's resident memory); a no-op elsewhere."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = libc.malloc_trim if libc is not None else None
    except (OSError, AttributeError):
        return
    if trim is not None:
        trim(0)
