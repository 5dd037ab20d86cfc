"""The packed sparse layout: the file format of pruned weights inside an exported ONNX model. numpy and onnx only.

For each chunk of whole rows of a weight [R, C], the model holds two initializers, ``{name}.packed.{k}.bits``
(a bit per weight of the flattened chunk, uint8, least significant bit first) and ``{name}.packed.{k}.values`` (the
chunk's nonzero values in row-major order behind one leading zero), plus ``{name}.packed.shape`` ([R, C], int64).
Export writes them together with a subgraph of standard ops that rebuilds the dense weight (see
``sparse_deploy.exporting.sparse_encoding``); this module is the reader and writer every stage shares:
``pack``/``unpack`` (numpy reference), ``read_packed`` (one weight of a model), ``densify`` and ``write_dense``
(the decode subgraphs replaced by the decoded arrays), and ``decoder_nodes`` (which nodes belong to a decode).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sparse_deploy.errors import ExportError, InvalidInputError

Loader = Callable[[TensorProto], np.ndarray]

SHARED_PREFIX = "sparse_deploy.packed"  # constants shared by all decode subgraphs (the bit lookup table, ...)
DEFAULT_CHUNK_ELEMS = 1 << 26  # 256 MB int32 per folded node; ONNX Runtime does not fold outputs over 1 GB


def chunk_rows(rows: int, cols: int, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> list[tuple[int, int]]:
    """Row ranges of the decode chunks: about ``chunk_elems`` weights each, a multiple of 8 rows (so every chunk
    but the last holds a whole number of bytes of bits)."""
    step = max(8, chunk_elems // max(1, cols) // 8 * 8)
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


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


def chunk_spans(parts: list[tuple[np.ndarray, np.ndarray]], shape: tuple[int, int]
                ) -> Iterator[tuple[np.ndarray, np.ndarray, int, int]]:
    """``pack``'s chunks as (bits, nonzeros, start, n): the chunk covers elements [start, start + n) of the flattened
    [R, C] (every chunk but the last fills whole bytes), its nonzeros in row-major order after the leading zero."""
    total, start = shape[0] * shape[1], 0
    for k, (bits, values) in enumerate(parts):
        n = total - start if k == len(parts) - 1 else bits.size * 8
        yield bits, values[1:], start, n
        start += n


def unpack(parts: list[tuple[np.ndarray, np.ndarray]], shape: tuple[int, int]) -> np.ndarray:
    """The numpy reference of the decode subgraph: the dense weight [R, C] from ``pack``'s chunks."""
    out = np.zeros(shape[0] * shape[1], dtype=parts[0][1].dtype)
    for bits, nonzeros, start, n in chunk_spans(parts, shape):
        mask = np.unpackbits(bits, count=n, bitorder="little").view(bool)  # [n]
        out[start : start + n][mask] = nonzeros
    return out.reshape(shape)


def read_parts(model: onnx.ModelProto, name: str, load: Loader = numpy_helper.to_array
               ) -> tuple[list[tuple[np.ndarray, np.ndarray]], tuple[int, int]]:
    """The stored chunks of the packed weight ``name`` (as ``pack`` returns them) and its shape [R, C]; ``load``
    reads one initializer (``formats.onnx_file.tensor_array`` for tensors left in the file)."""
    inits = {init.name: init for init in model.graph.initializer}
    shape = inits.get(f"{name}.packed.shape")
    if shape is None:
        raise InvalidInputError(f"{name} is not a packed weight of this model")
    parts, k = [], 0
    while f"{name}.packed.{k}.bits" in inits:
        parts.append((load(inits[f"{name}.packed.{k}.bits"]), load(inits[f"{name}.packed.{k}.values"])))
        k += 1
    rows, cols = (int(d) for d in load(shape))
    return parts, (rows, cols)


@dataclass(frozen=True)
class Stored:
    """A packed weight as the file stores it: ``pack``'s chunks and the shape [R, C]."""

    parts: list[tuple[np.ndarray, np.ndarray]]
    shape: tuple[int, int]

    def dense(self) -> np.ndarray:
        return unpack(self.parts, self.shape)

    def mask_bits(self) -> np.ndarray:
        """The bits of all chunks as one bit stream over the flattened [R, C] (every chunk but the last fills whole
        bytes), at least R * C bits."""
        return np.concatenate([bits for bits, _ in self.parts]) if len(self.parts) > 1 else self.parts[0][0]

    def nonzeros(self) -> np.ndarray:
        """The nonzero values in row-major order (a view when there is one chunk)."""
        if len(self.parts) == 1:
            return self.parts[0][1][1:]
        return np.concatenate([values[1:] for _, values in self.parts])


def read_packed(model: onnx.ModelProto, name: str, load: Loader = numpy_helper.to_array) -> np.ndarray:
    """Decode the packed weight ``name`` of an encoded model with numpy (what ONNX Runtime's folding computes)."""
    return unpack(*read_parts(model, name, load))


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


def decoder_prefixes(names: list[str]) -> tuple[str, ...]:
    """Name prefixes of the initializers and node outputs that belong to the decode subgraphs of ``names``."""
    return tuple(f"{name}.packed." for name in names) + (f"{SHARED_PREFIX}.",)


def decoder_outputs(model: onnx.ModelProto, names: list[str]) -> set[str]:
    """Outputs of the nodes that rebuild the packed weights ``names`` (the weights' own names included)."""
    prefixes = decoder_prefixes(names)
    return {node.output[0] for node in model.graph.node if node.output[0].startswith(prefixes)} | set(names)


def densify(model: onnx.ModelProto, *, min_bytes: int | None = None) -> Densified:
    """Decode every packed weight with numpy (see ``Densified``). With ``min_bytes``, every other initializer of at
    least that many bytes moves to ``weights`` too, so the model proto shrinks to the graph."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    weights: dict[str, np.ndarray] = {}

    def keep(name: str, array: np.ndarray) -> TensorProto:
        weights[name] = array
        return _external(name, array, PLACEHOLDER_LOCATION, 0)

    strip_decoders(out, min_bytes, keep)
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

        strip_decoders(model, min_bytes, write)
    onnx.save(model, str(folder / "model.onnx"))
    return folder / "model.onnx"


def _external(name: str, array: np.ndarray, location: str, offset: int) -> TensorProto:
    tensor = TensorProto(name=name, dims=array.shape, data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(array.nbytes))):
        tensor.external_data.add(key=key, value=value)
    return tensor


def strip_decoders(model: onnx.ModelProto, min_bytes: int | None, put, read=None) -> None:
    """In place: remove the decode subgraphs; each packed weight is decoded with numpy and handed to
    ``put(name, array) -> TensorProto``, which returns the initializer that takes its place. With ``min_bytes``,
    every other in-proto initializer of at least that many bytes goes through ``put`` as well. ``read(name)``
    replaces ``read_packed`` (what ``put`` receives for a packed weight is then whatever it returns)."""
    names = packed_names(model)
    prefixes = decoder_prefixes(names)
    decode = decoder_outputs(model, names)
    nodes = [node for node in model.graph.node if node.output[0] not in decode]
    by_name = {init.name: init for init in model.graph.initializer}
    kept = []
    for name in names:  # each weight's packed data is dropped from the proto once decoded: memory stays ~flat
        kept.append(put(name, read(name) if read is not None else read_packed(model, name)))
        for key in [n for n in by_name if n.startswith(f"{name}.packed.") and not n.endswith(".shape")]:
            by_name[key].ClearField("raw_data")
    for init in model.graph.initializer:
        if init.name.startswith(prefixes):
            continue
        if min_bytes is not None and init.data_location != TensorProto.EXTERNAL and tensor_bytes(init) >= min_bytes:
            kept.append(put(init.name, numpy_helper.to_array(init)))
            init.ClearField("raw_data")
        else:
            kept.append(init)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def bit_table() -> np.ndarray:
    """[256, 8] uint8: bit j of byte value b."""
    return ((np.arange(256, dtype=np.uint16)[:, None] >> np.arange(8)) & 1).astype(np.uint8)


def tensor_bytes(tensor: TensorProto) -> int:
    """Bytes of data the proto holds itself (external data, not loaded, counts 0)."""
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    if tensor.data_location == TensorProto.EXTERNAL:
        return 0
    itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return math.prod(tensor.dims) * itemsize
