"""Facts about an ONNX model that the quantizers need: its weight layers by PyTorch module name, the
quantization units of the fallback loop, the float head/tail nodes, and what a QDQ model contains
(:func:`check_qdq`). No torch here."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from rdcd.errors import MissingDependency, RdcdError


def load_onnx():
    """The ``onnx`` module, or a clear error naming the extra to install."""
    try:
        import onnx
    except ImportError:
        raise MissingDependency("onnx", "pip install 'rdcd[onnx]'") from None
    return onnx


LAYER_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
#: ops of the pooling / normalisation tail that never get quantized (GeM is x**3 -> mean -> x**(1/3))
TAIL_KEEP_OPS = ("Conv", "Gemm", "MatMul", "Add")
ACTIVATION_OPS = ("Clip", "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh")
#: ops ONNX Runtime's QDQ quantizer handles besides the weight layers (their inputs/outputs get Q/DQ)
OTHER_QUANT_OPS = ("Add", "Mul", "Sub", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool", "Resize",
                   "Softmax", "Sigmoid", "HardSigmoid", "HardSwish", "Clip", "Relu", "LeakyRelu", "Tanh",
                   "MatMul", "ReduceMean", "Split", "Pad")
#: module names of the deploy wrapper around the student (DeployModel.student; "net": exports before one wrapper)
WRAPPER_PREFIXES = ("student", "net", "model", "module")


def weight_layer_name(initializer: str) -> str:
    """``student.backbone.blocks.0.0.conv_dw.weight`` -> ``backbone.blocks.0.0.conv_dw`` (the Student module)."""
    name = initializer
    while name.split(".", 1)[0] in WRAPPER_PREFIXES and "." in name:
        name = name.split(".", 1)[1]
    if name.endswith(".weight"):
        name = name[: -len(".weight")]
    return name


def layer_nodes(model) -> dict[str, str]:
    """Ordered {layer name: ONNX node name} of the weight layers (Conv/Gemm/MatMul with a constant weight)."""
    inits = {i.name for i in model.graph.initializer}
    out: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type in LAYER_OPS and len(node.input) > 1 and node.input[1] in inits:
            out[weight_layer_name(node.input[1])] = node.name
    return out


def quant_units(model, float_node_names: Sequence[str] = ()) -> dict[str, list[str]]:
    """The units the fallback loop can keep in float: {name: ONNX node names}, in graph order.

    A weight layer (named by its module) together with the activation that reads only its output (the
    Clip/ReLU that QDQ folds into the layer's quantizer), and every other quantizable op (residual Add,
    Mul, Concat, pooling; named by its node), so that excluding every unit gives back the float model.
    An op of the second kind also lists the weight layers that produce its inputs: their outputs carry the
    Q/DQ pair that makes its input noise, and excluding the op alone would leave that pair in place.
    """
    inits = {i.name for i in model.graph.initializer}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    skip = set(float_node_names)
    by_name = {n.name: n for n in model.graph.node}
    layer_names = {n.name for n in model.graph.node
                   if n.op_type in LAYER_OPS and len(n.input) > 1 and n.input[1] in inits}
    units: dict[str, list[str]] = {}
    grouped: set[str] = set()
    for node in model.graph.node:
        if node.name in skip or node.name in grouped:
            continue
        if node.op_type in LAYER_OPS and len(node.input) > 1 and node.input[1] in inits:
            nodes = [node.name]
            users = consumers.get(node.output[0], [])
            if len(users) == 1 and users[0].op_type in ACTIVATION_OPS and users[0].name not in skip:
                nodes.append(users[0].name)
            grouped.update(nodes)
            units[weight_layer_name(node.input[1])] = nodes
        elif node.op_type in OTHER_QUANT_OPS:
            grouped.add(node.name)
            units[node.name] = [node.name]
    owner = {n: u for u, nodes in units.items() if nodes[0] in layer_names for n in nodes}
    producer = {o: n.name for n in model.graph.node for o in n.output}
    for unit, nodes in units.items():
        if nodes[0] in layer_names:
            continue
        node = by_name[nodes[0]]
        for i in node.input:
            feeding = owner.get(producer.get(i, ""))
            if feeding is not None:
                nodes.extend(n for n in units[feeding] if n not in nodes)
    return units


def float_nodes(model, keep_tail_float: bool = True) -> list[str]:
    """Nodes that stay float: the uint8 input head (Cast, scaling, normalisation) and the GeM/L2 tail."""
    nodes = list(model.graph.node)
    layer_idx = [i for i, n in enumerate(nodes) if n.op_type in LAYER_OPS]
    if not layer_idx:
        raise RdcdError("the ONNX model has no Conv/Gemm/MatMul layer to quantize")
    head = [n.name for n in nodes[: layer_idx[0]]]
    tail: list[str] = []
    if keep_tail_float:
        last_conv = max((i for i, n in enumerate(nodes) if n.op_type in ("Conv", "ConvTranspose")),
                        default=layer_idx[0])
        conv_outputs = {o for n in nodes if n.op_type in ("Conv", "ConvTranspose") for o in n.output}
        for n in nodes[last_conv + 1:]:
            if n.op_type in TAIL_KEEP_OPS:
                continue
            if n.op_type in ("Clip", "Relu") and n.input and n.input[0] in conv_outputs:
                continue  # the activation of the last conv is part of the backbone
            tail.append(n.name)
    return [n for n in head + tail if n]


def scalarize_head(model) -> int:
    """Replace uniform per-channel constants of the float head (lite0 normalises with mean = std = 0.5 for
    all channels) by scalars: the same arithmetic, but once ONNX Runtime's NHWC int8 layout moves the input
    transpose past these ops, a [1,3,1,1] constant becomes a last-axis-of-3 broadcast that cost ~17 % of the
    INT8 run time on this CPU; a scalar broadcast costs nothing. Returns how many inputs were replaced."""
    from onnx import numpy_helper

    nodes = list(model.graph.node)
    first = next((i for i, n in enumerate(nodes) if n.op_type in LAYER_OPS), 0)
    inits = {i.name: i for i in model.graph.initializer}
    replaced = 0
    for node in nodes[:first]:
        if node.op_type not in ("Mul", "Sub", "Div", "Add"):
            continue
        for k, name in enumerate(node.input):
            if name not in inits:
                continue
            a = numpy_helper.to_array(inits[name])
            if a.size > 1 and np.all(a == a.flat[0]):
                new = numpy_helper.from_array(np.array(a.flat[0], dtype=a.dtype), name=f"{name}__scalar_{node.name}")
                model.graph.initializer.append(new)
                node.input[k] = new.name
                replaced += 1
    return replaced


def ensure_node_names(model) -> None:
    """QDQ tools address nodes by name: give unnamed nodes a stable one."""
    seen = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def check_qdq(path: str | os.PathLike) -> dict:
    """Facts about a QDQ model: node counts, per-channel weight scales, input dtype, activation zero points."""
    onnx = load_onnx()
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    q = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    producer = {o: n for n in m.graph.node for o in n.output}
    per_channel = 0
    weight_dq = 0
    for n in dq:
        init = inits.get(n.input[0])
        if init is not None and init.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            weight_dq += 1
            scale = inits.get(n.input[1])
            if scale is not None and numpy_helper.to_array(scale).size > 1:
                per_channel += 1
    quantized_layers = sum(1 for n in m.graph.node if n.op_type in LAYER_OPS and len(n.input) > 1
                           and getattr(producer.get(n.input[1]), "op_type", "") == "DequantizeLinear")
    act_zp = set()
    act_types = set()
    for n in q:
        if len(n.input) > 2 and n.input[2] in inits:
            zp = numpy_helper.to_array(inits[n.input[2]])
            act_types.add(str(zp.dtype))
            act_zp.update(np.unique(zp).tolist())
    inp = m.graph.input[0]
    return {"quantize_linear": len(q), "dequantize_linear": len(dq), "weight_dequantize": weight_dq,
            "per_channel_weights": per_channel, "input_name": inp.name,
            "input_dtype": onnx.TensorProto.DataType.Name(inp.type.tensor_type.elem_type),
            "activation_dtypes": sorted(act_types), "activation_zero_points": sorted(act_zp)[:8],
            "quantized_layers": quantized_layers, "opset": max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")),
                                                           default=0)}
