"""ONNX export of the deploy graph: uint8 RGB NHWC ``image`` in, L2-normalised ``descriptor`` out.

Uses the torch.export-based exporter (``dynamo=True``), which folds timm's TF-"same" padding into
the convolutions and emits a clean, dynamic-batch graph; onnxsim simplifies it further when
installed. Normalisation is inside the graph, so camera frames go straight in.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from rdcd.errors import RdcdError
from rdcd.fsutil import atomic_path
from rdcd.model import DeployModel, reparameterize

log = logging.getLogger(__name__)

#: torch's exporter implements opset 18 and newer; the contract requires >= 17.
DEFAULT_OPSET = 18


def export_onnx(student: torch.nn.Module, path: str | os.PathLike, size: int, opset: int = DEFAULT_OPSET,
                simplify: bool = True, metadata: dict[str, str] | None = None) -> Path:
    """Export ``student`` (float NCHW [0,1] -> descriptor) as a uint8 NHWC ONNX model at ``path``."""
    import onnx

    path = Path(path)
    model = DeployModel(reparameterize(student.eval())).eval()
    example = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8)
    with atomic_path(path) as tmp:
        try:
            torch.onnx.export(model, (example,), str(tmp), dynamo=True, opset_version=opset,
                              input_names=["image"], output_names=["descriptor"], external_data=False,
                              dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1, max=4096)}},
                              verbose=False)
        except Exception as exc:
            raise RdcdError(f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
        proto = onnx.load(str(tmp))
        if simplify:
            proto = _simplify(proto)
        _check_io(proto)
        meta = {"rdcd.input_size": str(size), "producer": "rdcd", **(metadata or {})}
        del proto.metadata_props[:]
        for k, v in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v if isinstance(v, str) else json.dumps(v)
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
        simplified, ok = onnxsim.simplify(proto)
    except Exception as exc:  # onnxsim failures must not lose the export
        log.warning("onnxsim failed (%s): keeping the unsimplified graph", exc)
        return proto
    return simplified if ok else proto


def _check_io(proto) -> None:
    inp, out = proto.graph.input[0], proto.graph.output[0]
    if inp.name != "image" or inp.type.tensor_type.elem_type != 2:  # 2 = UINT8
        raise RdcdError(f"exported graph input is {inp.name} (type {inp.type.tensor_type.elem_type}), expected uint8 image")
    if out.name != "descriptor":
        raise RdcdError(f"exported graph output is {out.name}, expected descriptor")
    dim0 = inp.type.tensor_type.shape.dim[0]
    if not dim0.dim_param:
        raise RdcdError("exported graph lost its dynamic batch dimension")
