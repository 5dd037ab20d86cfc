"""int8 weight quantization after pruning, on ONNX Runtime's integer MatMul kernels.

Every MatMul whose weight is a constant gets per-output-channel symmetric 7-bit weights (scale = max|w|/64 per
column of B, values in [-64, 64] stored as int8, zero point 0, so pruned zeros stay exactly 0; 7 bits so that CPUs
without VNNI cannot saturate, see ``sparse_deploy.grids``) and dynamically quantized uint8 activations; ONNX
Runtime fuses the result into DynamicQuantizeMatMul / MatMulIntegerToFloat. Gemm weights are first rewritten as
MatMul (+ Add for the bias), and a MatMul reading a transposed initializer (a tied LM head) gets its own
transposed copy, so that both are quantized too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sparse_deploy import grids
from sparse_deploy.errors import ExportError

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


def quantize_int8(prepared: onnx.ModelProto, untied: tuple[str, ...] = (), given: dict | None = None
                  ) -> QuantizeResult:
    """7-bit symmetric per-output-channel weights (``grids.INT8_SCHEME``) for every MatMul with a constant 2-D
    float weight of a model that went through ``prepare_int8``, written as the graph ONNX Runtime's dynamic
    quantizer emits (DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul), which it fuses into its integer
    kernels. The same file is right on every x86 CPU: see ``sparse_deploy.grids`` for why 7 bits.

    ``given``: ONNX weight name -> ``checkpoint.WeightGrid`` of a checkpoint pruned with ``--bits 8``; those
    weights keep the solver's scales (its integers, not a second rounding) after a check that they lie on them."""
    out = onnx.ModelProto()
    out.CopyFrom(prepared)
    graph = out.graph
    inits = {init.name: init for init in graph.initializer}
    targets = _float_weight_matmuls(graph, inits)
    taken = {name for node in graph.node for name in (*node.input, *node.output)} | set(inits) \
        | {v.name for v in (*graph.input, *graph.output)}
    new_names = {f"{node.input[1]}{suffix}" for node in targets for suffix in (QUANT_SUFFIX, "_scale", "_zero_point")}
    if new_names & taken:
        raise ExportError(f"the graph already has tensors named {sorted(new_names & taken)[:3]}; cannot quantize it")
    weights = sorted({node.input[1] for node in targets})
    added = []
    for name in weights:
        B = numpy_helper.to_array(inits[name])  # [K, N]: MatMul's B, so output channels are its columns
        scales = grids.int8_scales(B.T) if name not in (given or {}) else solver_scales(name, B.T, given[name], 8)
        q = grids.quantize(B.T, scales, bits=8).T  # [K, N] int8 in [-64, 64]
        added += [numpy_helper.from_array(np.ascontiguousarray(q), name + QUANT_SUFFIX),
                  numpy_helper.from_array(scales, name + "_scale"),
                  numpy_helper.from_array(np.zeros(scales.shape, np.int8), name + "_zero_point")]
    target_ids = {id(node) for node in targets}
    nodes, quantized_inputs = [], set()
    for k, node in enumerate(graph.node):
        if id(node) not in target_ids:
            nodes.append(node)
            continue
        x, w, y = node.input[0], node.input[1], node.output[0]
        prefix = node.name or f"sparse_deploy.matmul.{k}"
        xq, xs, xz = f"{x}_quantized", f"{x}_scale", f"{x}_zero_point"
        if x not in quantized_inputs:  # one DynamicQuantizeLinear per activation, before its first MatMul
            if {xq, xs, xz} & taken:
                raise ExportError(f"the graph already has a tensor named {xq!r}; cannot quantize it")
            nodes.append(helper.make_node("DynamicQuantizeLinear", [x], [xq, xs, xz], name=f"{prefix}.quantize_x"))
            quantized_inputs.add(x)
        scale = f"{prefix}.scales_mul"
        nodes += [
            helper.make_node("Mul", [xs, w + "_scale"], [scale], name=f"{prefix}.scales"),
            helper.make_node("MatMulInteger", [xq, w + QUANT_SUFFIX, xz, w + "_zero_point"], [f"{y}.int32"],
                             name=f"{prefix}.integer"),
            helper.make_node("Cast", [f"{y}.int32"], [f"{y}.float"], name=f"{prefix}.cast", to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", [f"{y}.float", scale], [y], name=f"{prefix}.rescale"),
        ]
    _splice(graph, nodes, added, replaced=set(weights))
    return QuantizeResult(model=out, quantized=tuple(weights), untied=untied)


def solver_scales(name: str, W: np.ndarray, grid, bits: int, group_size: int | None = None) -> np.ndarray:
    """The scales the solver chose for W [N, K] (prune --bits; [N] for int8, [N, groups] for int4), after checking
    that they are for this grid and every value of W lies on them: export writes the solver's integers."""
    if grid.bits != bits:
        raise ExportError(f"{name} was quantized to {grid.bits} bits by prune --bits {grid.bits}; export it with "
                          f"--quantize int{grid.bits}")
    if bits == 4 and grid.group_size != group_size:
        raise ExportError(f"{name} was quantized in groups of {grid.group_size} by prune; export it with "
                          f"--group-size {grid.group_size}")
    if grid.zero_points is not None:
        raise ExportError(f"{name} was quantized with zero points (prune --asymmetric); the int4 export writes the "
                          f"symmetric grid only: prune with --symmetric")
    scales = np.asarray(grid.scales, np.float32)
    expected = (W.shape[0],) if bits == 8 else (W.shape[0], -(-W.shape[1] // group_size))
    if scales.shape != expected:
        raise ExportError(f"{name}: the checkpoint's int{bits} scales have shape {scales.shape}, expected {expected};"
                          f" the scales file does not belong to these weights")
    gs = None if bits == 8 else group_size
    if not grids.on_grid(W, scales, bits=bits, group_size=gs):
        back = grids.dequantize(grids.quantize(W, scales, bits=bits, group_size=gs), scales, group_size=gs)
        step = np.abs(scales)[:, None] if bits == 8 else np.repeat(np.abs(scales), gs, axis=1)[:, : W.shape[1]]
        worst = float(np.max(np.abs(W - back) / np.maximum(step, 1e-30)))
        raise ExportError(f"{name}: weights are off the solver's int{bits} grid by up to {worst:.3g} of a step; "
                          f"the checkpoint's weights were changed after prune --bits {bits}")
    return scales


INT4_SUFFIX = "_Q4"  # the packed 4-bit weight of MatMulNBits is named <float name> + this
INT4_ACCURACY_LEVEL = 4  # int8 activations in the kernel (what onnxruntime-genai's model builder writes)


def pack_int4(B: np.ndarray, group_size: int, scales: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MatMul's B [K, N] float32 -> MatMulNBits' (B_q uint8 [N, ceil(K / G), G / 2], scales float32 [N · ceil(K / G)]).

    Symmetric groups of G input columns per output channel (``grids.int4_scales``): nibble = q + 8 with q in
    [-8, 7] (the default zero point 8, so no zero_points input), two per byte, the lower index in the low nibble.
    K is zero padded to whole groups; padded nibbles hold 8 (= 0.0) and the kernel ignores them. ``scales``
    [N, blocks]: the solver's (prune --bits 4, checked by ``solver_scales``) instead of the grid's own."""
    if group_size % 2 or group_size < 16:
        raise ValueError(f"MatMulNBits needs an even block size of at least 16, got {group_size}")
    W = np.ascontiguousarray(B.T)  # [N, K]
    n, k = W.shape
    if scales is None:
        scales, _ = grids.int4_scales(W, group_size)  # [N, blocks]
    blocks = scales.shape[1]
    nibbles = np.full((n, blocks * group_size), 8, np.uint8)
    nibbles[:, :k] = (grids.quantize(W, scales, bits=4, group_size=group_size).astype(np.int16) + 8).astype(np.uint8)
    packed = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).astype(np.uint8)  # [N, blocks · G / 2]
    return packed.reshape(n, blocks, group_size // 2), scales.reshape(-1)


def unpack_int4(packed: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    """The inverse view: MatMulNBits' (B_q [N, blocks, G / 2], scales [N · blocks]) -> B [K, N] float32 as the kernel
    multiplies it, (nibble - 8) · scale."""
    n, blocks, half = packed.shape
    flat = packed.reshape(n, blocks * half)
    nibbles = np.empty((n, blocks * half * 2), np.int16)
    nibbles[:, 0::2] = flat & 0x0F
    nibbles[:, 1::2] = flat >> 4
    q = (nibbles - 8)[:, :k]
    return grids.dequantize(q, scales.reshape(n, blocks), group_size=half * 2).T


def quantize_int4(prepared: onnx.ModelProto, untied: tuple[str, ...] = (), group_size: int = 32,
                  given: dict | None = None) -> QuantizeResult:
    """4-bit symmetric weights in groups of ``group_size`` input columns for every MatMul with a constant 2-D float
    weight of a model that went through ``prepare_int8``: each becomes a ``com.microsoft`` MatMulNBits node (bits 4,
    block_size = group_size, accuracy_level 4, no zero_points input: ONNX Runtime's default zero point 8).
    ``given``: as for ``quantize_int8``, the solver's grids of a checkpoint pruned with ``--bits 4``."""
    out = onnx.ModelProto()
    out.CopyFrom(prepared)
    graph = out.graph
    inits = {init.name: init for init in graph.initializer}
    targets = _float_weight_matmuls(graph, inits)
    weights = sorted({node.input[1] for node in targets})
    taken = {name for node in graph.node for name in (*node.input, *node.output)} | set(inits)
    clash = {f"{w}{suffix}" for w in weights for suffix in (INT4_SUFFIX, "_scales")} & taken
    if clash:
        raise ExportError(f"the graph already has tensors named {sorted(clash)[:3]}; cannot quantize it")
    shapes, added = {}, []
    for name in weights:
        B = numpy_helper.to_array(inits[name])  # [K, N]
        solver = None if name not in (given or {}) else solver_scales(name, B.T, given[name], 4, group_size)
        packed, scales = pack_int4(B, group_size, solver)
        shapes[name] = B.shape
        added += [numpy_helper.from_array(packed, name + INT4_SUFFIX),
                  numpy_helper.from_array(scales, name + "_scales")]
    target_ids = {id(node) for node in targets}
    nodes = []
    for k, node in enumerate(graph.node):
        if id(node) not in target_ids:
            nodes.append(node)
            continue
        w = node.input[1]
        rows, cols = shapes[w]
        nodes.append(helper.make_node(
            "MatMulNBits", [node.input[0], w + INT4_SUFFIX, w + "_scales"], [node.output[0]],
            name=f"{node.name or f'sparse_deploy.matmul.{k}'}.nbits", domain="com.microsoft",
            K=rows, N=cols, bits=4, block_size=group_size, accuracy_level=INT4_ACCURACY_LEVEL,
        ))
    _splice(graph, nodes, added, replaced=set(weights))
    if not any(op.domain == "com.microsoft" for op in out.opset_import):
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return QuantizeResult(model=out, quantized=tuple(weights), untied=untied)


def _splice(graph: onnx.GraphProto, nodes: list, added: list, replaced: set[str]) -> None:
    """Make ``nodes`` the graph's nodes and add the ``added`` initializers; a ``replaced`` float weight stays only
    if a node still reads it (e.g. a tied embedding that a Gather also uses)."""
    used = {name for node in nodes for name in node.input}
    kept = [init for init in graph.initializer if init.name in used or init.name not in replaced]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + added)


def _float_weight_matmuls(graph: onnx.GraphProto, inits: dict) -> list[onnx.NodeProto]:
    """The MatMul nodes whose weight (input 1) is a constant 2-D float initializer: what int8 and int4 quantize."""
    targets = [
        node for node in graph.node
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2
        and inits[node.input[1]].data_type == onnx.TensorProto.FLOAT
    ]
    if not targets:
        raise ExportError("the model has no MatMul with a constant float weight to quantize")
    return targets
