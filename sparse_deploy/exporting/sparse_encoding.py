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
The layout itself (``pack``, ``unpack``, ``read_packed``, ``densify``, ``write_dense``) lives in
``sparse_deploy.formats.packed``, which the runtime reads without importing export. ``write_dense`` decodes the
packed weights with numpy instead, one at a time, into a dense model file that ONNX
Runtime loads like any dense export (the runtime's default way to open packed exports); ``densify`` does the same
in memory.

``coo``: ONNX's ``sparse_initializer`` (linear INT64 indices, as the checker demands; ONNX Runtime densifies
it at load). ``dense``: the initializer as exported.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sparse_deploy.errors import ExportError
from sparse_deploy.formats.packed import (  # noqa: F401  (re-exported: the packed layout's home is formats/)
    DEFAULT_CHUNK_ELEMS, SHARED_PREFIX, Densified, bit_table, chunk_rows, densify, pack, packed_names, read_packed,
    tensor_bytes, unpack, write_dense,
)

Encoding = Literal["packed", "coo", "dense"]
EncodingMode = Literal["packed", "coo", "dense", "auto"]
ENCODINGS: tuple[str, ...] = ("packed", "coo", "dense")

# Operators whose input 1 is a weight matrix that pruning may have sparsified.
_WEIGHT_CONSUMERS = {"MatMul": 1, "Gemm": 1, "MatMulInteger": 1}
_WEIGHT_DTYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT8)
PACKED_MIN_OPSET = 11  # CumSum, GatherElements
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # protobuf files stop at 2 GB; keep headroom for the graph itself


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
        lut = self.const(f"{SHARED_PREFIX}.lut", bit_table())
        axis0 = self.const(f"{SHARED_PREFIX}.axis0", np.array(0, np.int32))
        parts = []
        for k, ((bits, values), (start, stop)) in enumerate(zip(pack(weight, chunk_elems),
                                                               chunk_rows(rows, cols, chunk_elems))):
            n, prefix = (stop - start) * cols, f"{name}.packed.{k}"
            byte = self.node("Cast", [self.const(f"{prefix}.bits", bits)], f"{prefix}.byte", to=TensorProto.INT32)
            spread = self.node("Gather", [lut, byte], f"{prefix}.spread", axis=0)  # [n/8, 8] uint8: bits of each byte
            flat = self.const(f"{SHARED_PREFIX}.len.{bits.size * 8}", np.array([bits.size * 8], np.int64))
            mask = self.node("Reshape", [spread, flat], f"{prefix}.mask8")  # [8·⌈n/8⌉]
            if bits.size * 8 != n:  # drop the last byte's padding bits: [n]
                mask = self.node("Slice", [mask, self.const(f"{SHARED_PREFIX}.zero64", np.zeros(1, np.int64)),
                                           self.const(f"{SHARED_PREFIX}.len.{n}", np.array([n], np.int64))], f"{prefix}.mask")
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
    dense = sum(tensor_bytes(init) for init in model.graph.initializer)
    sparse = sum(tensor_bytes(s.values) + tensor_bytes(s.indices) for s in model.graph.sparse_initializer)
    return dense + sparse
