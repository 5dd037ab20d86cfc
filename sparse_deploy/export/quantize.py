"""int8 weight quantization after pruning, on ONNX Runtime's integer MatMul kernels.

Every MatMul whose weight is a constant gets per-output-channel symmetric int8 weights (scale = max|w|/127 per
column of B, zero point 0, so pruned zeros stay exactly 0) and dynamically quantized uint8 activations; ONNX
Runtime fuses the result into DynamicQuantizeMatMul / MatMulIntegerToFloat. Gemm weights are first rewritten as
MatMul (+ Add for the bias), and a MatMul reading a transposed initializer (a tied LM head) gets its own
transposed copy, so that both are quantized too.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sparse_deploy.errors import ExportError
from sparse_deploy.export.onnx_export import quiet_libraries
from sparse_deploy.export.sparse_encoding import EXTERNAL_DATA_THRESHOLD, initializer_bytes

QUANT_SUFFIX = "_quantized"  # onnxruntime.quantization names the int8 weight <float name> + this
INTEGER_KERNELS = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger")


@dataclass(frozen=True)
class QuantizeResult:
    model: onnx.ModelProto
    quantized: tuple[str, ...]  # names of the float weights that now have an int8 "<name>_quantized" initializer
    untied: tuple[str, ...]  # initializers given a transposed copy so their MatMul could be quantized


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def gemm_to_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """Gemm(A, B, C) with a constant 2-D B, alpha = beta = 1 and no transA → MatMul(A, B' [in, out]) + Add(C).

    ONNX Runtime's dynamic quantization only covers MatMul; the weight is stored as B' = Bᵀ when transB = 1."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {init.name: init for init in out.graph.initializer}
    uses: dict[str, int] = {}
    for node in out.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    nodes, added, dropped = [], [], set()
    for node in out.graph.node:
        attrs = _attrs(node) if node.op_type == "Gemm" else {}
        weight = inits.get(node.input[1]) if node.op_type == "Gemm" else None
        if weight is None or len(weight.dims) != 2 or attrs.get("transA", 0) \
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            nodes.append(node)
            continue
        W = numpy_helper.to_array(weight)  # [out, in] when transB, else [in, out]
        B = np.ascontiguousarray(W.T) if attrs.get("transB", 0) else W  # [in, out]
        name = weight.name if uses[weight.name] == 1 else f"{weight.name}.matmul"
        if name == weight.name:
            dropped.add(weight.name)
        added.append(numpy_helper.from_array(B, name))
        has_bias = len(node.input) > 2 and node.input[2] != ""
        product = f"{node.output[0]}.matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product], name=f"{node.name}.matmul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}.bias"))
    kept = [init for init in out.graph.initializer if init.name not in dropped]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept + added)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def untie_transposed(model: onnx.ModelProto) -> tuple[onnx.ModelProto, tuple[str, ...]]:
    """MatMul(A, Transpose(E)) with a constant 2-D E (a tied LM head reads the embedding so) → MatMul(A, Eᵀ),
    with Eᵀ stored as its own initializer, so that the quantizer sees a constant weight."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {init.name: init for init in out.graph.initializer}
    transposes = {
        node.output[0]: node for node in out.graph.node
        if node.op_type == "Transpose" and node.input[0] in inits and len(inits[node.input[0]].dims) == 2
        and tuple(_attrs(node).get("perm", (1, 0))) == (1, 0)
    }
    untied: list[str] = []
    for node in out.graph.node:
        if node.op_type == "MatMul" and node.input[1] in transposes:
            source = transposes[node.input[1]].input[0]
            name = f"{source}.transposed"
            if source not in untied:
                E = numpy_helper.to_array(inits[source])  # [vocab, hidden]
                E_t = np.ascontiguousarray(E.T)  # [hidden, vocab]
                out.graph.initializer.append(numpy_helper.from_array(E_t, name))
                untied.append(source)
            node.input[1] = name
    needed = {name for node in out.graph.node for name in node.input} | {o.name for o in out.graph.output}
    keep = [node for node in out.graph.node if node.output[0] not in transposes or node.output[0] in needed]
    del out.graph.node[:]
    out.graph.node.extend(keep)
    return out, tuple(untied)


def prepare_int8(model: onnx.ModelProto) -> tuple[onnx.ModelProto, tuple[str, ...]]:
    """Gemm → MatMul and untied LM-head copies (see module doc); returns the model and the untied initializers."""
    return untie_transposed(gemm_to_matmul(model))


def quantize_int8(prepared: onnx.ModelProto, untied: tuple[str, ...] = (),
                  tmp_dir: str | Path | None = None) -> QuantizeResult:
    """Per-output-channel symmetric int8 weights for every MatMul with a constant float weight of a model that
    went through ``prepare_int8``. The quantizer's model-sized temporary files go under ``tmp_dir`` (export passes
    its staging folder, so a killed run leaves nothing in the system's temporary folder)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    inits = {init.name: init for init in prepared.graph.initializer}
    targets = [
        node for node in prepared.graph.node
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2
        and inits[node.input[1]].data_type == onnx.TensorProto.FLOAT
    ]
    if not targets:
        raise ExportError("the model has no MatMul with a constant float weight to quantize")
    for k, node in enumerate(targets):
        node.name = node.name or f"sparse_deploy.matmul.{k}"
    large = initializer_bytes(prepared) > EXTERNAL_DATA_THRESHOLD
    with tempfile.TemporaryDirectory(prefix="sparse_deploy_int8_", dir=tmp_dir) as tmp, quiet_libraries():
        path = Path(tmp) / "quantized.onnx"
        quantize_dynamic(
            prepared, path, op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=False,
            weight_type=QuantType.QInt8, nodes_to_quantize=[node.name for node in targets],
            use_external_data_format=large,
            extra_options={"WeightSymmetric": True, "MatMulConstBOnly": True},
        )
        quantized = onnx.load(path)
    names = {init.name for init in quantized.graph.initializer}
    done = tuple(node.input[1] for node in targets if node.input[1] + QUANT_SUFFIX in names)
    if len(done) != len(targets):
        missing = sorted({node.input[1] for node in targets} - set(done))
        raise ExportError(f"onnxruntime did not quantize the weights {missing[:5]}")
    return QuantizeResult(model=quantized, quantized=done, untied=untied)

