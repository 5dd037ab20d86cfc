"""Packed weights onto the native sparse kernels: an in-memory graph rewrite, done when a session is created.

A portable export rebuilds each packed weight with a decode subgraph of standard ops that feeds a MatMul or Gemm
(``sparse_deploy.formats.packed``). When the native library loads (``kernels.availability()``), each such pair
becomes one node of the ``ai.sparse_deploy`` domain:

    decode(bits, values) ─► W [K, N] ─► MatMul(X, W) (─► Add(bias [N]))      ⇒  SparseMatMul(X, mask, values, row_ptr, bias?)
    Gemm(X, W [N, K], C [N], transB=1)                                       ⇒  SparseMatMul(X, mask, values, row_ptr, C)
    DynamicQuantizeLinear(X) ─► MatMulInteger(xq, Wq [K, N], xzp, 0) ─► Cast ─► Mul(·, xs · ws [N])
                                                                             ⇒  SparseMatMulInt8(X, mask, values, row_ptr, ws)

The op's weight is W [N, K] (out x in): a MatMul's [K, N] weight is transposed when packed (one pass of the native
library over the stored nonzeros); a weight stored as [N, K] (Gemm, transB=1) goes to the kernels as stored (its
values are the op's values); neither is decoded to a dense array. ONNX Runtime folds nothing. Opened from a file
(``formats.onnx_file.read_graph``), the proto holds the graph only: the packed weights are read one at a time from
the file, and the other large tensors stay in the file for ONNX Runtime to map. The kernels' arrays (``shared``) go
to the session without a copy (``SessionOptions.add_initializer``; the session keeps them, see ``feed``). Packed
weights that stay dense (another consumer, ``auto`` chose dense, a pattern the ops do not cover) are decoded (by
the native library when it loads, else numpy) and written to a temporary file that ONNX Runtime maps (``Spill``),
or else handed over as arrays (``arrays``), which ONNX Runtime copies. Needs numpy and onnx only (onnxruntime in ``feed``).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sparse_deploy.formats.packed import PLACEHOLDER_LOCATION, Loader, Stored, packed_names, read_parts, strip_decoders
from sparse_deploy.formats.packed import unpack as unpack_numpy
from sparse_deploy.runtime.kernels import DOMAIN, OP_FP32, OP_INT8  # the native library's op contract (numpy only)

__all__ = ["DOMAIN", "OP_FP32", "OP_INT8", "Fed", "Rewritten", "Site", "Spill", "feed", "find_sites", "materialize",
           "rewrite"]
MIN_EXTERNAL_BYTES = 1 << 16  # initializers of this size or more go to the session as arrays, not in the proto


@dataclass(frozen=True)
class Site:
    """A packed weight and the node that consumes it, in a form one sparse node can replace."""

    weight: str  # the packed weight's name in the file
    node: str  # the consumer's output name (unique in the graph)
    op: str  # OP_FP32 or OP_INT8
    transpose: bool  # the file's weight is [K, N]: the op's W is its transpose
    shape: tuple[int, int]  # the op's W: (N, K)
    nnz: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / max(1, math.prod(self.shape))

    @property
    def dtype(self) -> str:
        return "int8" if self.op == OP_INT8 else "fp32"


@dataclass
class Rewritten:
    """The rewritten graph (``model``: nodes and small initializers; large ones are placeholders) and the arrays
    behind its placeholders, to pass as the session's external initializers."""

    model: onnx.ModelProto
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    shared: dict[str, np.ndarray] = field(default_factory=dict)  # kernel arrays the session uses in place
    sparse: tuple[Site, ...] = ()  # sites now running a sparse node
    dense: tuple[str, ...] = ()  # packed weights left dense


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    uses: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            uses.setdefault(name, []).append(node)
    return uses


def _packed_shape_nnz(model: onnx.ModelProto, name: str, load: Loader) -> tuple[tuple[int, int], int]:
    inits = {init.name: init for init in model.graph.initializer if init.name.startswith(f"{name}.packed.")}
    rows, cols = (int(d) for d in load(inits[f"{name}.packed.shape"]))
    chunks = [init for key, init in inits.items() if key.endswith(".values")]
    return (rows, cols), sum(math.prod(init.dims) - 1 for init in chunks)  # each chunk's values lead with a 0


def find_sites(model: onnx.ModelProto, *, int8: bool = True, load: Loader = numpy_helper.to_array) -> list[Site]:
    """The packed weights of ``model`` whose single consumer one sparse node can replace."""
    uses = _consumers(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    inits = {init.name: init for init in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    sites = []
    for name in packed_names(model):
        users = uses.get(name, [])
        if len(users) != 1 or name in outputs:
            continue
        node = users[0]
        (rows, cols), nnz = _packed_shape_nnz(model, name, load)
        if node.op_type == "MatMul" and node.input[1] == name:
            sites.append(Site(name, node.output[0], OP_FP32, True, (cols, rows), nnz))
        elif node.op_type == "Gemm" and node.input[1] == name:
            a = _attrs(node)
            if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
                continue
            trans = not a.get("transB", 0)
            n = cols if trans else rows
            sites.append(Site(name, node.output[0], OP_FP32, trans, (n, rows if trans else cols), nnz))
        elif int8 and node.op_type == "MatMulInteger" and node.input[1] == name \
                and _int8_chain(node, uses, producers, inits, load) is not None:
            sites.append(Site(name, node.output[0], OP_INT8, True, (cols, rows), nnz))
    return sites


def _int8_chain(node, uses, producers, inits, load: Loader = numpy_helper.to_array):
    """(X, weight scale, the final Mul) of DynamicQuantizeLinear → MatMulInteger → Cast → Mul(·, xs · ws), with a
    zero weight zero point; None when the graph has another shape."""
    quant = producers.get(node.input[0])
    if quant is None or quant.op_type != "DynamicQuantizeLinear" or len(node.input) < 4:
        return None
    zp = inits.get(node.input[3])
    if zp is None or np.any(load(zp)):
        return None
    cast = uses.get(node.output[0], [])
    if len(cast) != 1 or cast[0].op_type != "Cast":
        return None
    mul = uses.get(cast[0].output[0], [])
    if len(mul) != 1 or mul[0].op_type != "Mul":
        return None
    scale_in = next((i for i in mul[0].input if i != cast[0].output[0]), None)
    scales = producers.get(scale_in)
    if scales is None or scales.op_type != "Mul" or quant.output[1] not in scales.input:
        return None
    w_scale = next((i for i in scales.input if i != quant.output[1]), None)
    if w_scale not in inits or len(inits[w_scale].dims) != 1:
        return None
    return quant.input[0], w_scale, mul[0]


def rewrite(
    model: onnx.ModelProto,
    pack: Callable[[Site, np.ndarray | Stored, np.ndarray | None], list[np.ndarray]] | None,
    keep: Callable[[Site], bool] = lambda site: True,
    *,
    int8: bool = True,
    min_bytes: int | None = MIN_EXTERNAL_BYTES,
    load: Loader = numpy_helper.to_array,
    shared_location: str | None = None,
    fuse_transposes: bool = False,
    spill: Callable[[str, np.ndarray], TensorProto] | None = None,
    unpack: Callable[[list, tuple[int, int]], np.ndarray] = unpack_numpy,
) -> Rewritten:
    """In place: every packed weight is read once; where ``keep(site)`` holds, its consumer becomes a sparse node
    whose weight inputs are ``pack(site, W, scale [N] or None)`` (mask, values, row_ptr[, scale]), W being the
    decoded [N, K] array, or the stored chunks (``Stored``) when the file holds W as [N, K] and fp32; the other
    packed weights stay dense (all of them when ``pack`` is None: no native library). Initializers of ``min_bytes``
    or more in the proto leave it for ``arrays``; those left in the file (external) stay there. ``load`` reads one
    initializer. With ``shared_location`` (the model file's name), the kernels' arrays go to ``shared``, behind
    placeholders that name that file (ONNX Runtime checks that it exists, and reads nothing from it). With
    ``fuse_transposes``, MatMul(X, Transpose(W)) of a large initializer W becomes FusedMatMul(X, W, transB=1), so
    that ONNX Runtime does not fold a transposed copy of W (a tied LM head). With ``spill`` (a ``Spill``), the
    arrays that would go to ``arrays`` (decoded weights left dense) are written through it instead. ``unpack``
    decodes those (``formats.packed.unpack``'s contract; ``kernels.unpack`` is the native one)."""
    sites = {site.weight: site for site in find_sites(model, int8=int8, load=load)
             if pack is not None and keep(site)}
    uses = _consumers(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    inits = {init.name: init for init in model.graph.initializer}
    chains = {name: _int8_chain(uses[name][0], uses, producers, inits, load)
              for name, site in sites.items() if site.op == OP_INT8}
    scales = {name: load(inits[chain[1]]).astype(np.float32) for name, chain in chains.items()}
    arrays: dict[str, np.ndarray] = {}
    shared: dict[str, np.ndarray] = {}
    packed_inputs: dict[str, list[str]] = {}

    def decode(name: str) -> Stored:
        return Stored(*read_parts(model, name, load))

    def put(name: str, stored: np.ndarray | Stored) -> TensorProto:
        site = sites.get(name)
        if site is None:
            array = unpack(stored.parts, stored.shape) if isinstance(stored, Stored) else stored
            if spill is not None:
                return spill(name, array)
            arrays[name] = array
            return _placeholder(name, array)
        weight = stored  # the stored chunks: pack repacks them without decoding
        if not isinstance(stored, Stored):
            weight = np.ascontiguousarray(stored.T) if site.transpose else stored  # [N, K]
        del stored
        names = [f"{name}.sparse.{part}" for part in ("mask", "values", "row_ptr", "scale")]
        parts = pack(site, weight, scales.get(name))
        del weight
        packed_inputs[name] = names[: len(parts)]
        for part_name, part in zip(names, parts):
            (shared if shared_location else arrays)[part_name] = part
        return _placeholder(names[0], parts[0], shared_location)  # the others are added below

    packed = packed_names(model)
    strip_decoders(model, min_bytes, put, decode)
    parts = shared if shared_location else arrays
    extra = [_placeholder(n, parts[n], shared_location) for names in packed_inputs.values() for n in names[1:]]
    model.graph.initializer.extend(extra)
    _replace_nodes(model, sites, packed_inputs, chains)
    if fuse_transposes:
        _fuse_transposes(model, min_bytes or MIN_EXTERNAL_BYTES)
    _drop_dead(model)
    _ensure_domain(model, bool(sites))
    return Rewritten(model, arrays, shared, tuple(sites.values()), tuple(n for n in packed if n not in sites))


class Spill:
    """Arrays written one at a time to a temporary file in the model's folder, each becoming external data that
    ONNX Runtime maps from it (64 KiB aligned): a decoded weight left dense then costs ONNX Runtime's prepacked copy
    only, where an array handed over in memory is copied first. ``remove`` once the session exists."""

    ALIGN = 1 << 16

    def __init__(self, folder: str | Path):
        fd, path = tempfile.mkstemp(prefix=".sparse-deploy-dense-", suffix=".bin", dir=str(folder))
        self.path = Path(path)
        self._fh = os.fdopen(fd, "wb")

    @classmethod
    def open(cls, folder: str | Path) -> Spill | None:
        """A spill file in ``folder``, or None where the folder is not writable."""
        try:
            return cls(folder)
        except OSError:
            return None

    def __call__(self, name: str, array: np.ndarray) -> TensorProto:
        offset = self._fh.tell()
        offset += self._fh.write(b"\0" * ((-offset) % self.ALIGN))
        self._fh.write(np.ascontiguousarray(array).data)
        tensor = TensorProto(name=name, dims=array.shape, data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(array.nbytes))):
            tensor.external_data.add(key=key, value=value)
        return tensor

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


@dataclass
class Fed:
    """What a session created from ``feed``'s options reads: ``copied`` until it is created, ``shared`` as long as
    it lives (keep it on the session object)."""

    copied: list = field(default_factory=list)
    shared: list = field(default_factory=list)


def feed(done: Rewritten, options, folder: str | None = None) -> Fed:
    """Hand ``done``'s arrays to an ``onnxruntime.SessionOptions``: ``arrays`` as external initializers (ONNX
    Runtime copies them when the session is created), ``shared`` as initializers it uses in place. ``folder``:
    where the model's external data lies (the model is then created from bytes)."""
    import onnxruntime as ort

    if folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    names = list(done.arrays)
    fed = Fed([ort.OrtValue.ortvalue_from_numpy(done.arrays[n]) for n in names])
    if names:
        options.add_external_initializers(names, fed.copied)
    for name, array in done.shared.items():
        value = ort.OrtValue.ortvalue_from_numpy(array)
        options.add_initializer(name, value)
        fed.shared += [value, array]
    return fed


def _fuse_transposes(model: onnx.ModelProto, min_bytes: int) -> None:
    """MatMul(X, Transpose(W)) of a 2-D initializer W of ``min_bytes`` or more -> FusedMatMul(X, W, transB=1)."""
    big = {init.name for init in model.graph.initializer if len(init.dims) == 2
           and math.prod(init.dims) * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize >= min_bytes}
    uses = _consumers(model)
    outputs = {o.name for o in model.graph.output}
    fused = False
    for node in model.graph.node:
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or node.input[0] not in big:
            continue
        if tuple(_attrs(node).get("perm", (1, 0))) != (1, 0) or node.output[0] in outputs:
            continue
        users = uses.get(node.output[0], [])
        if not users or any(u.op_type != "MatMul" or u.domain not in ("", "ai.onnx") or list(u.input).count(
                node.output[0]) != 1 or u.input[1] != node.output[0] for u in users):
            continue
        for user in users:
            fused_node = helper.make_node("FusedMatMul", [user.input[0], node.input[0]], list(user.output),
                                          name=f"{user.name or user.output[0]}/transB", domain="com.microsoft",
                                          transB=1, alpha=1.0)
            user.CopyFrom(fused_node)
        fused = True
    if fused and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _replace_nodes(model, sites, packed_inputs, chains) -> None:
    inits = {init.name: init for init in model.graph.initializer}
    uses = _consumers(model)
    nodes, skip = [], set()
    for node in model.graph.node:
        if node.output[0] in skip:
            continue
        site = next((sites[i] for i in node.input[1:2] if i in sites and node.output[0] == sites[i].node), None)
        if site is None:
            nodes.append(node)
            continue
        inputs = [node.input[0], *packed_inputs[site.weight]]
        output = node.output[0]
        if site.op == OP_INT8:
            x, _, mul = chains[site.weight]
            inputs[0], output = x, mul.output[0]
            cast = uses[node.output[0]][0]
            skip |= {cast.output[0], mul.output[0]}
        elif node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            bias = inits.get(node.input[2])
            if bias is not None and tuple(bias.dims) == (site.shape[0],) and bias.data_type == TensorProto.FLOAT:
                inputs.append(node.input[2])
            else:  # a computed or broadcast C: added after the op
                output = f"{output}.sparse"
                nodes.append(helper.make_node(site.op, inputs, [output], name=f"{site.weight}/{site.op}",
                                              domain=DOMAIN))
                nodes.append(helper.make_node("Add", [output, node.input[2]], [node.output[0]],
                                              name=f"{site.weight}/bias"))
                continue
        else:  # MatMul → Add(bias [N]): fold the bias into the op
            add = uses.get(output, [])
            if len(add) == 1 and add[0].op_type == "Add":
                other = next((i for i in add[0].input if i != output), None)
                if other in inits and tuple(inits[other].dims) == (site.shape[0],) \
                        and inits[other].data_type == TensorProto.FLOAT:
                    inputs.append(other)
                    output = add[0].output[0]
                    skip.add(add[0].output[0])
        nodes.append(helper.make_node(site.op, inputs, [output], name=f"{site.weight}/{site.op}", domain=DOMAIN))
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _drop_dead(model: onnx.ModelProto) -> None:
    """Remove nodes and initializers nothing reads any more (the activation quantizer of an int8 site)."""
    outputs = {o.name for o in model.graph.output}
    while True:
        read = {i for node in model.graph.node for i in node.input} | outputs
        live = [node for node in model.graph.node if any(o in read for o in node.output)]
        if len(live) == len(model.graph.node):
            break
        del model.graph.node[:]
        model.graph.node.extend(live)
    read = {i for node in model.graph.node for i in node.input} | outputs
    kept = [init for init in model.graph.initializer if init.name in read]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def _ensure_domain(model: onnx.ModelProto, used: bool) -> None:
    if used and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))


def _placeholder(name: str, array: np.ndarray, location: str | None = None) -> TensorProto:
    """An initializer whose data the session receives from elsewhere. ``location``: an existing file that ONNX
    Runtime is never meant to read (offset past any real file, so a read would fail rather than return bytes)."""
    tensor = TensorProto(name=name, dims=array.shape, data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
    tensor.data_location = TensorProto.EXTERNAL
    offset = str(1 << 50) if location else "0"
    for key, value in (("location", location or PLACEHOLDER_LOCATION), ("offset", offset),
                       ("length", str(array.nbytes))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def uses_custom_ops(model_or_nodes: onnx.ModelProto | Iterable[onnx.NodeProto]) -> bool:
    nodes = model_or_nodes.graph.node if isinstance(model_or_nodes, onnx.ModelProto) else model_or_nodes
    return any(node.domain == DOMAIN for node in nodes)


def materialize(rewritten: Rewritten) -> onnx.ModelProto:
    """The rewritten model with its arrays back inside the proto (for writing a custom-op file)."""
    model = rewritten.model
    arrays = {**rewritten.arrays, **rewritten.shared}
    kept = [numpy_helper.from_array(arrays[init.name], init.name)
            if init.data_location == TensorProto.EXTERNAL and init.name in arrays else init
            for init in model.graph.initializer]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model
