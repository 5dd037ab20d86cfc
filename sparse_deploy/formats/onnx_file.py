"""An ONNX file's graph without its large tensors: what the runtime reads before rewriting packed weights.

``onnx.load`` reads the whole file into bytes and parses it into a message that holds every weight again, so a
model file costs twice its size in memory while it loads. ``read_graph`` walks the protobuf wire format of the
memory-mapped file instead: every initializer whose ``raw_data`` (field 9 of TensorProto, inside GraphProto field
5, inside ModelProto field 7) holds ``min_bytes`` or more becomes external data that points at those bytes in the
file itself, so only the graph and the small tensors are parsed. ``tensor_array`` reads one such tensor (or any
external tensor of the folder) into a fresh array, and ONNX Runtime can read the rest from the file itself.
numpy and onnx only.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sparse_deploy.errors import InvalidInputError

_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9


def _varint(buf, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise InvalidInputError("truncated protobuf varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise InvalidInputError("malformed protobuf varint")


def _fields(buf, start: int, stop: int):
    """(field number, field start, value start, field end) of each field in buf[start:stop]."""
    pos = start
    while pos < stop:
        begin = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, end = _varint(buf, pos)
        elif wire == 1:
            end = pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            end = pos + length
        elif wire == 5:
            end = pos + 4
        else:
            raise InvalidInputError(f"unsupported protobuf wire type {wire}")
        if end > stop:
            raise InvalidInputError("truncated protobuf field")
        yield number, begin, pos, end
        pos = end


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_graph(path: str | Path, *, min_bytes: int = 1 << 16) -> onnx.ModelProto:
    """The model of ``path`` with every inline tensor of ``min_bytes`` or more left in the file as external data
    (location: the file's own name). Memory: the graph and the small tensors only."""
    path = Path(path)
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _read(buf, path.name, min_bytes)
    except ValueError as exc:  # an empty file cannot be mapped
        raise InvalidInputError(f"{path} is not an ONNX model: {exc}") from None


def _read(buf, location: str, min_bytes: int) -> onnx.ModelProto:
    top, graph_parts = [], []
    big: dict[int, tuple[int, int]] = {}  # initializer index -> (offset, length) of its raw_data in the file
    for number, begin, value, end in _fields(buf, 0, len(buf)):
        if number != _MODEL_GRAPH:
            top.append(buf[begin:end])
            continue
        index = 0
        for g_number, g_begin, g_value, g_end in _fields(buf, value, end):
            if g_number != _GRAPH_INITIALIZER:
                graph_parts.append(buf[g_begin:g_end])
                continue
            kept, raw = [], None
            for t_number, t_begin, t_value, t_end in _fields(buf, g_value, g_end):
                if t_number == _TENSOR_RAW_DATA and t_end - t_value >= min_bytes:
                    raw = (t_value, t_end - t_value)
                else:
                    kept.append(buf[t_begin:t_end])
            if raw is None:
                graph_parts.append(buf[g_begin:g_end])
            else:
                body = b"".join(kept)
                graph_parts.append(_encode_varint(_GRAPH_INITIALIZER << 3 | 2) + _encode_varint(len(body)) + body)
                big[index] = raw
            index += 1
    model = onnx.ModelProto()
    model.ParseFromString(b"".join(top))
    model.graph.ParseFromString(b"".join(graph_parts))
    for index, (offset, length) in big.items():
        tensor = model.graph.initializer[index]
        tensor.data_location = TensorProto.EXTERNAL
        for key, val in (("location", location), ("offset", str(offset)), ("length", str(length))):
            tensor.external_data.add(key=key, value=val)
    return model


def external_location(tensor: TensorProto) -> dict[str, str] | None:
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    return {entry.key: entry.value for entry in tensor.external_data}


def tensor_array(tensor: TensorProto, folder: str | Path) -> np.ndarray:
    """The tensor's data as a fresh array: read from its external file in ``folder`` when it has one (the proto is
    left as it is), else from the proto."""
    info = external_location(tensor)
    if info is None:
        return numpy_helper.to_array(tensor)
    folder = Path(folder).resolve()
    file = (folder / info["location"]).resolve()
    if folder not in file.parents:
        raise InvalidInputError(f"external data {info['location']!r} of {tensor.name} lies outside {folder}")
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims, dtype=np.int64))
    length = int(info.get("length", count * dtype.itemsize))
    if length != count * dtype.itemsize:
        raise InvalidInputError(f"{tensor.name}: external data of {length} bytes for {count} x {dtype}")
    array = np.fromfile(file, dtype=dtype, count=count, offset=int(info.get("offset", 0)))
    if array.size != count:
        raise InvalidInputError(f"{tensor.name}: {file.name} ends before its data")
    return array.reshape(tuple(tensor.dims))
