"""Sparse encodings of pruned weights inside an ONNX ModelProto: ``packed``, ``coo`` and ``dense``.

``packed``: for each chunk of whole rows, a bit per weight of the flattened chunk (uint8, least significant bit
first) and the chunk's nonzero values in row-major order behind one leading zero. A subgraph of standard ops
rebuilds the dense weight:

    bits [n/8] ─Cast int32─► Gather(LUT [256, 8]) ─► [n/8, 8] ─Reshape─► mask [n] (uint8) ─Cast int32─►
    CumSum ─► 1-based rank of each nonzero, × mask ─► GatherElements(values) ─► chunk [n] ─Concat, Reshape─► [R, C]

Everything is computed from initializers, so ONNX Runtime constant-folds it when the session is created. The
ops were chosen by measurement: a 256-entry lookup table instead of BitShift/BitwiseAnd, GatherElements instead
of Gather (9x faster for element-wise lookups in ONNX Runtime 1.31), int32 index arithmetic. Row chunks keep every
folded tensor below ONNX Runtime's 1 GB constant-folding limit. ONNX Runtime keeps every folded intermediate until
its folding pass ends, so the decode holds about 22 bytes per weight at its peak whatever the chunk size.
``write_dense`` decodes the packed weights with numpy instead, one at a time, into a dense model file that ONNX
Runtime loads like any dense export (the runtime's default way to open packed exports); ``densify`` does the same
in memory.

``coo``: ONNX's ``sparse_initializer`` (linear INT64 indices, as the checker demands; ONNX Runtime densifies
it at load). ``dense``: the initializer as exported.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sparse_deploy.errors import ExportError

Encoding = Literal["packed", "coo", "dense"]
EncodingMode = Literal["packed", "coo", "dense", "auto"]
ENCODINGS: tuple[str, ...] = ("packed", "coo", "dense")

# Operators whose input 1 is a weight matrix that pruning may have sparsified.
_WEIGHT_CONSUMERS = {"MatMul": 1, "Gemm": 1, "MatMulInteger": 1}
_WEIGHT_DTYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT8)
_SHARED = "sparse_deploy.packed"
PACKED_MIN_OPSET = 11  # CumSum, GatherElements
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # protobuf files stop at 2 GB; keep headroom for the graph itself
DEFAULT_CHUNK_ELEMS = 1 << 26  # 256 MB int32 per folded node; ONNX Runtime does not fold outputs over 1 GB


@dataclass(frozen=True)
class TensorEncoding:
    """How one weight initializer is (or would be) stored; byte counts are of the tensor data alone."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nnz: int
    encoding: str
    dense_bytes: int
    packed_bytes: int
    coo_bytes: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / max(1, math.prod(self.shape))

    @property
    def stored_bytes(self) -> int:
        return {"dense": self.dense_bytes, "packed": self.packed_bytes, "coo": self.coo_bytes}[self.encoding]


def chunk_rows(rows: int, cols: int, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> list[tuple[int, int]]:
    """Row ranges of the decode chunks: about ``chunk_elems`` weights each, a multiple of 8 rows (so every chunk
    but the last holds a whole number of bytes of bits)."""
    step = max(8, chunk_elems // max(1, cols) // 8 * 8)
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def packed_nbytes(shape: tuple[int, ...], itemsize: int, nnz: int, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> int:
    """Bytes of the packed encoding: per chunk ⌈n/8⌉ bytes of bits, and nnz + one leading zero per chunk values."""
    rows, cols = shape
    chunks = chunk_rows(rows, cols, chunk_elems)
    return sum(((b - a) * cols + 7) // 8 for a, b in chunks) + (nnz + len(chunks)) * itemsize


def coo_nbytes(itemsize: int, nnz: int) -> int:
    """Bytes of an ONNX sparse_initializer: values [nnz] + INT64 linear indices [nnz]."""
    return nnz * (itemsize + 8)


def weight_names(model: onnx.ModelProto) -> list[str]:
    """Initializers that are weight matrices: 2-D float or int8 tensors fed to a MatMul/Gemm as input B.

    Found from the graph itself, since exporters store Linear weights transposed or under generated names."""
    inits = {init.name: init for init in model.graph.initializer}
    graph_inputs = {inp.name for inp in model.graph.input}
    names: dict[str, None] = {}  # ordered set
    for node in model.graph.node:
        slot = _WEIGHT_CONSUMERS.get(node.op_type)
        init = inits.get(node.input[slot]) if slot is not None and len(node.input) > slot else None
        if init is not None and init.name not in graph_inputs and len(init.dims) == 2 \
                and init.data_type in _WEIGHT_DTYPES:
            names[init.name] = None
    return list(names)


def describe(name: str, array: np.ndarray, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> TensorEncoding:
    """The record of a weight stored dense, with the sizes the other encodings would take."""
    nnz = int(np.count_nonzero(array))
    itemsize = array.dtype.itemsize
    return TensorEncoding(
        name=name, shape=tuple(array.shape), dtype=str(array.dtype), nnz=nnz, encoding="dense",
        dense_bytes=array.size * itemsize, packed_bytes=packed_nbytes(array.shape, itemsize, nnz, chunk_elems),
        coo_bytes=coo_nbytes(itemsize, nnz),
    )


def plan(
    model: onnx.ModelProto,
    mode: EncodingMode,
    *,
    min_sparsity: float = 0.25,
    pruned: Iterable[str] = (),
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> tuple[TensorEncoding, ...]:
    """Choose an encoding for every weight matrix of ``model``.

    A weight is encoded only when it is actually sparse: its measured zero fraction is at least ``min_sparsity``,
    or it is named in ``pruned`` (from the checkpoint's manifest) and has zeros. ``auto`` takes the smallest of
    dense, packed and coo per tensor; ``coo`` may be larger than dense (the caller warns)."""
    pruned = set(pruned)
    inits = {init.name: init for init in model.graph.initializer}
    records = []
    for name in weight_names(model):
        rec = describe(name, numpy_helper.to_array(inits[name]), chunk_elems)
        sparse = rec.sparsity >= min_sparsity or (name in pruned and rec.nnz < math.prod(rec.shape))
        if not sparse or mode == "dense":
            choice = "dense"
        elif mode == "auto":
            sizes = {"dense": rec.dense_bytes, "packed": rec.packed_bytes, "coo": rec.coo_bytes}
            choice = min(sizes, key=sizes.__getitem__)
        else:
            choice = mode
        records.append(replace(rec, encoding=choice))
    return tuple(records)


def pack(weight: np.ndarray, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per row chunk: (bits [⌈n/8⌉] uint8 of the flattened chunk, values [nnz + 1] with a leading 0)."""
    parts = []
    for start, stop in chunk_rows(*weight.shape, chunk_elems):
        flat = weight[start:stop].reshape(-1)  # [n], row-major
        mask = flat != 0
        if mask.sum() >= np.iinfo(np.int32).max:
            raise ExportError(f"a weight of shape {weight.shape} has too many nonzeros for int32 indices")
        bits = np.packbits(mask, bitorder="little")  # [⌈n/8⌉]: bit j of byte b is weight 8b + j
        parts.append((bits, np.concatenate([np.zeros(1, weight.dtype), flat[mask]])))  # [nnz + 1]
    return parts


def unpack(parts: list[tuple[np.ndarray, np.ndarray]], shape: tuple[int, int]) -> np.ndarray:
    """The numpy reference of the decode subgraph: the dense weight [R, C] from ``pack``'s chunks."""
    rows, cols = shape
    values0 = parts[0][1]
    out = np.zeros(rows * cols, dtype=values0.dtype)
    done = 0
    for k, (bits, values) in enumerate(parts):
        n = rows * cols - done if k == len(parts) - 1 else bits.size * 8  # all but the last chunk fill whole bytes
        mask = np.unpackbits(bits, count=n, bitorder="little").view(bool)  # [n]
        out[done : done + n][mask] = values[1:]  # the nonzeros in row-major order, after the leading zero
        done += n
    return out.reshape(rows, cols)


def read_packed(model: onnx.ModelProto, name: str) -> np.ndarray:
    """Decode the packed weight ``name`` of an encoded model with numpy (what ONNX Runtime's folding computes)."""
    inits = {init.name: init for init in model.graph.initializer}
    shape = inits.get(f"{name}.packed.shape")
    if shape is None:
        raise ExportError(f"{name} is not a packed weight of this model")
    parts, k = [], 0
    while f"{name}.packed.{k}.bits" in inits:
        parts.append((numpy_helper.to_array(inits[f"{name}.packed.{k}.bits"]),
                      numpy_helper.to_array(inits[f"{name}.packed.{k}.values"])))
        k += 1
    rows, cols = (int(d) for d in numpy_helper.to_array(shape))
    return unpack(parts, (rows, cols))


PLACEHOLDER_LOCATION = "sparse_deploy-decoded-in-memory"
DENSE_DATA_FILE = "weights.bin"


@dataclass(frozen=True)
class Densified:
    """A packed model with its decode subgraphs taken out: each packed weight is an external-data placeholder in
    ``model`` and its decoded array is in ``weights`` (for tests and tools that want the arrays in memory)."""

    model: onnx.ModelProto
    weights: dict[str, np.ndarray]


def packed_names(model: onnx.ModelProto) -> list[str]:
    suffix = ".packed.shape"
    return [init.name[: -len(suffix)] for init in model.graph.initializer if init.name.endswith(suffix)]


def densify(model: onnx.ModelProto, *, min_bytes: int | None = None) -> Densified:
    """Decode every packed weight with numpy (see ``Densified``). With ``min_bytes``, every other initializer of at
    least that many bytes moves to ``weights`` too, so the model proto shrinks to the graph."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    weights: dict[str, np.ndarray] = {}

    def keep(name: str, array: np.ndarray) -> TensorProto:
        weights[name] = array
        return _external(name, array, PLACEHOLDER_LOCATION, 0)

    _strip_decoders(out, min_bytes, keep)
    return Densified(out, weights)


def write_dense(path: str | Path, folder: str | Path, *, min_bytes: int = 1 << 16) -> Path:
    """Decode a packed model file with numpy into a dense model in ``folder``: ``model.onnx`` (the graph) and
    ``weights.bin`` (every initializer of ``min_bytes`` or more, 64-byte aligned). Weights are decoded and written
    one at a time, so the memory held is the packed model plus one weight. ONNX Runtime then loads the dense file
    as it loads any dense export: this is how ``sparse_deploy.runtime`` opens packed exports by default, since
    ONNX Runtime's own constant folding of the decode subgraphs holds every intermediate until it ends."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(path))
    with open(folder / DENSE_DATA_FILE, "wb") as fh:

        def write(name: str, array: np.ndarray) -> TensorProto:
            offset = fh.tell()
            padding = (-offset) % 64
            fh.write(b"\0" * padding)
            fh.write(np.ascontiguousarray(array).data)
            return _external(name, array, DENSE_DATA_FILE, offset + padding)

        _strip_decoders(model, min_bytes, write)
    onnx.save(model, str(folder / "model.onnx"))
    return folder / "model.onnx"


def _external(name: str, array: np.ndarray, location: str, offset: int) -> TensorProto:
    tensor = TensorProto(name=name, dims=array.shape, data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(array.nbytes))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def _strip_decoders(model: onnx.ModelProto, min_bytes: int | None, put) -> None:
    """In place: remove the decode subgraphs; each packed weight is decoded with numpy and handed to
    ``put(name, array) -> TensorProto``, which returns the initializer that takes its place. With ``min_bytes``,
    every other in-proto initializer of at least that many bytes goes through ``put`` as well."""
    names = packed_names(model)
    prefixes = tuple(f"{name}.packed." for name in names) + (f"{_SHARED}.",)
    decode = {node.output[0] for node in model.graph.node if node.output[0].startswith(prefixes)} | set(names)
    nodes = [node for node in model.graph.node if node.output[0] not in decode]
    kept = [put(name, read_packed(model, name)) for name in names]
    for init in model.graph.initializer:
        if init.name.startswith(prefixes):
            continue
        if min_bytes is not None and init.data_location != TensorProto.EXTERNAL and _tensor_bytes(init) >= min_bytes:
            kept.append(put(init.name, numpy_helper.to_array(init)))
        else:
            kept.append(init)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def _lut() -> np.ndarray:
    """[256, 8] uint8: bit j of byte value b."""
    return ((np.arange(256, dtype=np.uint16)[:, None] >> np.arange(8)) & 1).astype(np.uint8)


class _Builder:
    """Collects the initializers and nodes of the decode subgraphs; shared constants are added once."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self._names: set[str] = set()

    def const(self, name: str, array: np.ndarray) -> str:
        if name not in self._names:
            self._names.add(name)
            self.inits.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=f"{output}/{op}", **attrs))
        return output

    def decode(self, name: str, weight: np.ndarray, chunk_elems: int) -> None:
        rows, cols = weight.shape
        lut = self.const(f"{_SHARED}.lut", _lut())
        axis0 = self.const(f"{_SHARED}.axis0", np.array(0, np.int32))
        parts = []
        for k, ((bits, values), (start, stop)) in enumerate(zip(pack(weight, chunk_elems),
                                                               chunk_rows(rows, cols, chunk_elems))):
            n, prefix = (stop - start) * cols, f"{name}.packed.{k}"
            byte = self.node("Cast", [self.const(f"{prefix}.bits", bits)], f"{prefix}.byte", to=TensorProto.INT32)
            spread = self.node("Gather", [lut, byte], f"{prefix}.spread", axis=0)  # [n/8, 8] uint8: bits of each byte
            flat = self.const(f"{_SHARED}.len.{bits.size * 8}", np.array([bits.size * 8], np.int64))
            mask = self.node("Reshape", [spread, flat], f"{prefix}.mask8")  # [8·⌈n/8⌉]
            if bits.size * 8 != n:  # drop the last byte's padding bits: [n]
                mask = self.node("Slice", [mask, self.const(f"{_SHARED}.zero64", np.zeros(1, np.int64)),
                                           self.const(f"{_SHARED}.len.{n}", np.array([n], np.int64))], f"{prefix}.mask")
            mask = self.node("Cast", [mask], f"{prefix}.mask32", to=TensorProto.INT32)  # [n] 0/1
            rank = self.node("CumSum", [mask, axis0], f"{prefix}.rank")  # [n] nonzeros up to here: 1-based rank
            index = self.node("Mul", [rank, mask], f"{prefix}.index")  # [n] 0 where pruned → the leading zero
            values = self.const(f"{prefix}.values", values)
            parts.append(self.node("GatherElements", [values, index], f"{prefix}.weights", axis=0))  # [n]
        flat = parts[0] if len(parts) == 1 else self.node("Concat", parts, f"{name}.packed.flat", axis=0)  # [R·C]
        self.node("Reshape", [flat, self.const(f"{name}.packed.shape", np.array([rows, cols], np.int64))], name)


def opset_version(model: onnx.ModelProto) -> int:
    """The model's default-domain opset (0 when it imports none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def encode(
    model: onnx.ModelProto, encodings: Iterable[TensorEncoding], *, chunk_elems: int = DEFAULT_CHUNK_ELEMS
) -> onnx.ModelProto:
    """A copy of ``model`` with each listed initializer stored as its record's ``encoding`` says."""
    chosen: Mapping[str, str] = {rec.name: rec.encoding for rec in encodings if rec.encoding != "dense"}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if not chosen:
        return out
    opset = opset_version(out)
    if opset < PACKED_MIN_OPSET and "packed" in chosen.values():
        raise ExportError(f"the packed encoding needs opset >= {PACKED_MIN_OPSET}, the model has {opset}")
    builder = _Builder()
    kept: list[TensorProto] = []
    for init in out.graph.initializer:
        encoding = chosen.get(init.name)
        if encoding is None:
            kept.append(init)
            continue
        weight = numpy_helper.to_array(init)
        if encoding == "packed":
            builder.decode(init.name, weight, chunk_elems)
        elif encoding == "coo":
            out.graph.sparse_initializer.append(to_coo(init.name, weight))
        else:
            raise ExportError(f"unknown encoding {encoding!r} for {init.name}; choose one of {', '.join(ENCODINGS)}")
    missing = set(chosen) - {init.name for init in out.graph.initializer}
    if missing:
        raise ExportError(f"no initializers named {sorted(missing)} in the model")
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept + builder.inits)
    nodes = builder.nodes + list(out.graph.node)  # the decode nodes read only initializers: put them first
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def to_coo(name: str, weight: np.ndarray) -> onnx.SparseTensorProto:
    """ONNX COO: values [nnz] and INT64 linear indices [nnz] into the row-major flattened weight."""
    flat = weight.reshape(-1)
    indices = np.flatnonzero(flat).astype(np.int64)  # [nnz]
    return helper.make_sparse_tensor(
        numpy_helper.from_array(flat[indices], name), numpy_helper.from_array(indices, f"{name}.coo_indices"),
        list(weight.shape),
    )


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data held by the model's dense and sparse initializers."""
    dense = sum(_tensor_bytes(init) for init in model.graph.initializer)
    sparse = sum(_tensor_bytes(s.values) + _tensor_bytes(s.indices) for s in model.graph.sparse_initializer)
    return dense + sparse


def _tensor_bytes(tensor: TensorProto) -> int:
    """Bytes of data the proto holds itself (external data, not loaded, counts 0)."""
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    if tensor.data_location == TensorProto.EXTERNAL:
        return 0
    itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return math.prod(tensor.dims) * itemsize
