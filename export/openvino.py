"""OpenVINO IR export (Intel CPUs, iGPUs and NPUs) with OpenVINO's own converter. No torch here.

``openvino.convert_model`` reads the exported ONNX file directly, so the IR keeps the uint8 NHWC
``image`` input with the normalisation inside, and the ``descriptor`` output. ``fp32`` keeps
FP32 weights; ``fp16`` compresses weights to FP16 (``compress_to_fp16``; half the size, what GPU
and NPU plugins run natively; CPUs decompress them).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from rdcd.errors import MissingDependency, RdcdError
from rdcd.fsutil import temp_prefix

log = logging.getLogger(__name__)

def convert(onnx_path: str | os.PathLike, xml_path: str | os.PathLike, precision: str = "fp32",
            metadata: dict[str, str] | None = None) -> Path:
    """Write the IR ``xml_path`` and its ``.bin`` (each atomically, the ``.bin`` first); return ``xml_path``."""
    try:
        import openvino as ov
    except ImportError:
        raise MissingDependency("openvino", "pip install openvino") from None
    if precision not in ("fp32", "fp16"):
        raise RdcdError(f"OpenVINO IR precision must be fp32 or fp16, not {precision!r}")
    xml_path = Path(xml_path)
    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as exc:
        raise RdcdError(f"OpenVINO conversion failed: {str(exc).strip().splitlines()[0]}") from None
    inp, out = model.input(0), model.output(0)
    if inp.get_element_type() != ov.Type.u8 or "image" not in inp.get_names():
        raise RdcdError(f"OpenVINO model input is {inp.get_names()} {inp.get_element_type()}, expected uint8 'image'")
    if "descriptor" not in out.get_names():
        raise RdcdError(f"OpenVINO model output is {out.get_names()}, expected 'descriptor'")
    for key, value in (metadata or {}).items():
        model.set_rt_info(str(value), ["rdcd", key.removeprefix("rdcd.")])
    model.set_rt_info(precision, ["rdcd", "precision"])
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=temp_prefix(xml_path.stem), suffix=".tmp", dir=xml_path.parent) as tmp:
        tmp_xml = Path(tmp) / xml_path.name
        ov.save_model(model, str(tmp_xml), compress_to_fp16=(precision == "fp16"))
        # the .xml finds its weights by file name: move the pair, the weights first
        os.replace(tmp_xml.with_suffix(".bin"), xml_path.with_suffix(".bin"))
        os.replace(tmp_xml, xml_path)
    return xml_path
