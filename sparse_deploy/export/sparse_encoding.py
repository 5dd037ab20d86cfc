"""Sparse encodings of pruned weights inside an ONNX ModelProto: ``packed``, ``coo`` and ``dense``.

``packed``: a bit per weight (uint8, eight weights per byte, least significant bit first, each row padded to
whole bytes), the nonzero values in row-major order behind one leading zero, and an int32 offset per row (the
number of nonzeros before it). A subgraph of standard ops rebuilds the dense weight in chunks of rows:

    bits [r, ⌈C/8⌉, 1] ─BitShift(0..7)─BitwiseAnd(1)─► [r, ⌈C/8⌉, 8] ─Reshape/Slice─► mask [r, C] ─Cast int32─►
    CumSum(axis 1) + offset [r, 1] ─► 1-based index of each nonzero, × mask ─► Gather(values) ─► W rows [r, C]

and a Concat of the chunks gives the weight under its original name. Everything is computed from initializers,
so ONNX Runtime constant-folds it when the session is created; the int32 arithmetic and row chunks keep the
folding's working set to a few bytes per weight of one chunk.

``coo``: ONNX's ``sparse_initializer`` (linear INT64 indices, as the checker demands; ONNX Runtime densifies
it at load). ``dense``: the initializer as exported.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
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
PACKED_MIN_OPSET = 11  # BitShift, CumSum
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


def packed_nbytes(shape: tuple[int, ...], itemsize: int, nnz: int) -> int:
    """Bytes of the packed encoding: bits [R, ⌈C/8⌉] + values [nnz + 1] + int32 row offsets [R]."""
    rows, cols = shape
    return rows * ((cols + 7) // 8) + (nnz + 1) * itemsize + rows * 4


def coo_nbytes(itemsize: int, nnz: int) -> int:
    """Bytes of an ONNX sparse_initializer: values [nnz] + INT64 linear indices [nnz]."""
    return nnz * (itemsize + 8)


def weight_names(model: onnx.ModelProto) -> list[str]:
    """Initializers that are weight matrices: 2-D float or int8 tensors fed to a MatMul/Gemm as input B.

    Found from the graph itself, since exporters store Linear weights transposed or under generated names."""
    inits = {init.name: init for init in model.graph.initializer}
    graph_inputs = {inp.name for inp in model.graph.input}
    names: list[str] = []
    for node in model.graph.node:
        slot = _WEIGHT_CONSUMERS.get(node.op_type)
        if slot is None or len(node.input) <= slot:
            continue
        init = inits.get(node.input[slot])
        if (
            init is not None
            and init.name not in graph_inputs
            and init.name not in names
            and len(init.dims) == 2
            and init.data_type in _WEIGHT_DTYPES
        ):
            names.append(init.name)
    return names


def describe(name: str, array: np.ndarray, encoding: str = "dense") -> TensorEncoding:
    nnz = int(np.count_nonzero(array))
    itemsize = array.dtype.itemsize
    return TensorEncoding(
        name=name, shape=tuple(array.shape), dtype=str(array.dtype), nnz=nnz, encoding=encoding,
        dense_bytes=array.size * itemsize,
        packed_bytes=packed_nbytes(array.shape, itemsize, nnz),
        coo_bytes=coo_nbytes(itemsize, nnz),
    )


def plan(
    model: onnx.ModelProto,
    mode: EncodingMode,
    *,
    min_sparsity: float = 0.25,
    pruned: Iterable[str] = (),
) -> tuple[TensorEncoding, ...]:
    """Choose an encoding for every weight matrix of ``model``.

    A weight is encoded only when it is actually sparse: its measured zero fraction is at least ``min_sparsity``,
    or it is named in ``pruned`` (from the checkpoint's manifest) and has zeros. ``auto`` takes the smallest of
    dense, packed and coo per tensor; ``coo`` may be larger than dense (the caller warns)."""
    pruned = set(pruned)
    inits = {init.name: init for init in model.graph.initializer}
    records = []
    for name in weight_names(model):
        rec = describe(name, numpy_helper.to_array(inits[name]))
        sparse = rec.sparsity >= min_sparsity or (name in pruned and rec.nnz < math.prod(rec.shape))
        if not sparse or mode == "dense":
            choice = "dense"
        elif mode == "auto":
            sizes = {"dense": rec.dense_bytes, "packed": rec.packed_bytes, "coo": rec.coo_bytes}
            choice = min(sizes, key=sizes.__getitem__)
        else:
            choice = mode
        records.append(TensorEncoding(**{**rec.__dict__, "encoding": choice}))
    return tuple(records)


def pack(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bits [R, ⌈C/8⌉] uint8, values [nnz + 1] with a leading 0, row offsets [R, 1] int32) of a 2-D weight."""
    mask = weight != 0  # [R, C]
    bits = np.packbits(mask, axis=1, bitorder="little")  # [R, ⌈C/8⌉], bit j of byte b = column 8b + j
    values = np.concatenate([np.zeros(1, weight.dtype), weight[mask]])  # [nnz + 1], row-major order
    counts = mask.sum(axis=1, dtype=np.int64)  # [R] nonzeros per row
    if counts.sum() >= np.iinfo(np.int32).max:
        raise ExportError(f"a weight of shape {weight.shape} has too many nonzeros for int32 indices")
    offsets = (np.cumsum(counts) - counts).astype(np.int32)[:, None]  # [R, 1] nonzeros before each row
    return bits, values, offsets


def unpack(bits: np.ndarray, values: np.ndarray, offsets: np.ndarray, cols: int) -> np.ndarray:
    """The numpy reference of the decode subgraph: the dense weight [R, C]."""
    mask = np.unpackbits(bits, axis=1, count=cols, bitorder="little").astype(np.int32)  # [R, C]
    index = (np.cumsum(mask, axis=1, dtype=np.int32) + offsets) * mask  # [R, C] 1-based, 0 where pruned
    return values[index]


class _Builder:
    """Collects the initializers and nodes of the decode subgraphs; shared constants are added once."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
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
        bits, values, offsets = pack(weight)
        nbytes = bits.shape[1]
        values_name = self.const(f"{name}.packed.values", values)
        shifts = self.const(f"{_SHARED}.shifts", np.arange(8, dtype=np.uint8))  # [8]
        one = self.const(f"{_SHARED}.one", np.ones(1, np.uint8))
        step = max(1, chunk_elems // cols)
        parts = []
        for k, start in enumerate(range(0, rows, step)):
            stop = min(rows, start + step)
            r, prefix = stop - start, f"{name}.packed.{k}"
            chunk_bits = self.const(f"{prefix}.bits", bits[start:stop, :, None])  # [r, ⌈C/8⌉, 1]
            chunk_offsets = self.const(f"{prefix}.offsets", offsets[start:stop])  # [r, 1]
            # [r, ⌈C/8⌉, 8] uint8: bit j of every byte, then 0/1
            spread = self.node("BitShift", [chunk_bits, shifts], f"{prefix}.shifted", direction="RIGHT")
            if self.opset >= 18:
                spread = self.node("BitwiseAnd", [spread, one], f"{prefix}.bit")
            else:
                spread = self.node("Mod", [spread, self.const(f"{_SHARED}.two", np.full(1, 2, np.uint8))], f"{prefix}.bit")
            shape = self.const(f"{_SHARED}.shape.{r}x{nbytes * 8}", np.array([r, nbytes * 8], np.int64))
            mask = self.node("Reshape", [spread, shape], f"{prefix}.mask8")  # [r, 8·⌈C/8⌉]
            if nbytes * 8 != cols:  # drop each row's padding bits: [r, C]
                mask = self.node("Slice", [
                    mask, self.const(f"{_SHARED}.zero64", np.zeros(1, np.int64)),
                    self.const(f"{_SHARED}.cols.{cols}", np.array([cols], np.int64)),
                    self.const(f"{_SHARED}.axis1", np.ones(1, np.int64)),
                ], f"{prefix}.mask")
            mask = self.node("Cast", [mask], f"{prefix}.mask32", to=TensorProto.INT32)  # [r, C] int32
            axis = self.const(f"{_SHARED}.axis1_32", np.array(1, np.int32))
            index = self.node("CumSum", [mask, axis], f"{prefix}.rank")  # [r, C] nonzeros so far in the row
            index = self.node("Add", [index, chunk_offsets], f"{prefix}.global")  # [r, C] 1-based in values
            index = self.node("Mul", [index, mask], f"{prefix}.index")  # [r, C] 0 → the leading zero value
            out = name if stop == rows and k == 0 else f"{prefix}.rows"
            parts.append(self.node("Gather", [values_name, index], out, axis=0))  # [r, C] weight rows
        if len(parts) > 1:
            self.node("Concat", parts, name, axis=0)  # [R, C]


def _opset(model: onnx.ModelProto) -> int:
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
    opset = _opset(out)
    if opset < PACKED_MIN_OPSET and "packed" in chosen.values():
        raise ExportError(f"the packed encoding needs opset >= {PACKED_MIN_OPSET}, the model has {opset}")
    builder = _Builder(opset)
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
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return math.prod(tensor.dims) * itemsize
