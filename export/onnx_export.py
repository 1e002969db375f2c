"""ONNX export of the deploy graph: uint8 RGB NHWC ``image`` in, L2-normalised ``descriptor`` out.

Uses the torch.export-based exporter (``dynamo=True``), which folds timm's TF-"same" padding into
the convolutions and emits a clean, dynamic-batch graph; onnxsim simplifies it further when
installed. Models holding TorchScript (a user's SSCD teacher) go through the TorchScript-based
exporter instead. Normalisation is inside the graph, so camera frames go straight in.

The uint8 input is cast to float before anything else touches it (only a ``Cast`` reads
``image``): TensorRT accepts uint8 network inputs only as the input of a cast.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from rdcd.errors import RdcdError
from rdcd.fsutil import atomic_path
from rdcd.model import DeployModel, reparameterize

log = logging.getLogger(__name__)

#: torch's exporter implements opset 18 and newer; the contract requires >= 17.
DEFAULT_OPSET = 18
MAX_BATCH = 4096


def default_metadata(student: nn.Module, size: int) -> dict[str, str]:
    """``rdcd.*`` metadata from a student's config (dim, backbone, preprocessing at ``size``)."""
    import dataclasses

    meta = {"rdcd.input_size": str(size)}
    cfg = getattr(student, "config", None)
    if cfg is not None and dataclasses.is_dataclass(cfg) and hasattr(cfg, "preprocess"):
        cfg = dataclasses.replace(cfg, input_size=size)
        meta.update({"rdcd.dim": str(cfg.dim), "rdcd.backbone": cfg.backbone,
                     "rdcd.preprocess": json.dumps(cfg.preprocess().to_dict(), sort_keys=True)})
    return meta


def _has_torchscript(module: nn.Module) -> bool:
    return any(isinstance(m, torch.jit.ScriptModule) for m in module.modules())


def export_onnx(student: torch.nn.Module, path: str | os.PathLike, size: int, opset: int = DEFAULT_OPSET,
                simplify: bool = True, metadata: dict[str, str] | None = None, legacy: bool | None = None) -> Path:
    """Export ``student`` (float NCHW [0,1] -> descriptor) as a uint8 NHWC ONNX model at ``path``.

    ``metadata`` is added to (and overrides) the ``rdcd.*`` keys derived from the student's config.
    ``legacy`` picks the TorchScript-based exporter (default: only when the model holds TorchScript).
    """
    import onnx

    path = Path(path)
    model = DeployModel(reparameterize(student.eval())).eval()
    legacy = _has_torchscript(model) if legacy is None else legacy
    example = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8)
    with atomic_path(path) as tmp:
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                if legacy:  # trace first: the exporter refuses ScriptModules nested in a Python module
                    traced = torch.jit.trace(model, (example,), check_trace=False)
                    torch.onnx.export(traced, (example,), str(tmp), dynamo=False, opset_version=opset,
                                      input_names=["image"], output_names=["descriptor"],
                                      dynamic_axes={"image": {0: "batch"}, "descriptor": {0: "batch"}})
                else:
                    torch.onnx.export(model, (example,), str(tmp), dynamo=True, opset_version=opset,
                                      input_names=["image"], output_names=["descriptor"], external_data=False,
                                      dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}},
                                      verbose=False)
        except Exception as exc:
            raise RdcdError(f"ONNX export failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}") from None
        proto = onnx.load(str(tmp))
        if simplify:
            proto = _simplify(proto)
        _cast_input_first(proto)
        _check_io(proto)
        meta = {**default_metadata(student, size), "producer": "rdcd", **(metadata or {})}
        del proto.metadata_props[:]
        for k, v in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v if isinstance(v, str) else json.dumps(v)
        proto.producer_name = "rdcd"
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    return path


def _simplify(proto):
    try:
        import onnxsim
    except ImportError:
        log.info("onnxsim not installed: keeping the exporter's optimised graph")
        return proto
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            simplified, ok = onnxsim.simplify(proto)
    except Exception as exc:  # onnxsim failures must not lose the export
        log.warning("onnxsim failed (%s): keeping the unsimplified graph", exc)
        return proto
    return simplified if ok else proto


def _cast_input_first(proto) -> None:
    """Make a float ``Cast`` the only reader of the uint8 input (``Shape`` nodes read the cast)."""
    from onnx import NodeProto, TensorProto

    g = proto.graph
    name = g.input[0].name
    idx = [i for i, n in enumerate(g.node) if name in n.input and n.op_type == "Cast"
           and any(a.name == "to" and a.i == TensorProto.FLOAT for a in n.attribute)]
    if not idx:
        log.warning("the exported graph does not cast %r first; TensorRT may reject the uint8 input", name)
        return
    nodes = []
    for n in g.node:  # copies: messages taken out of a cleared repeated field are not safe to reuse
        c = NodeProto()
        c.CopyFrom(n)
        nodes.append(c)
    cast = nodes.pop(idx[0])
    cast_out = cast.output[0]
    for n in nodes:
        if name not in n.input:
            continue
        if n.op_type == "Shape":
            n.input[:] = [cast_out if i == name else i for i in n.input]
        elif n.op_type != "Cast":
            log.warning("%s node %s reads the uint8 input directly; TensorRT may reject it", n.op_type, n.name)
    del g.node[:]
    g.node.extend([cast] + nodes)  # the cast reads only the graph input: first keeps the order topological


def _check_io(proto) -> None:
    inp, out = proto.graph.input[0], proto.graph.output[0]
    if inp.name != "image" or inp.type.tensor_type.elem_type != 2:  # 2 = UINT8
        raise RdcdError(f"exported graph input is {inp.name} (type {inp.type.tensor_type.elem_type}), expected uint8 image")
    if out.name != "descriptor":
        raise RdcdError(f"exported graph output is {out.name}, expected descriptor")
    dim0 = inp.type.tensor_type.shape.dim[0]
    if not dim0.dim_param:
        raise RdcdError("exported graph lost its dynamic batch dimension")
